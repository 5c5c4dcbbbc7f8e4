// Relation-conditioned message aggregation: shared declarations.
//
// For every destination node v, batch element b and channel c:
//
//   out[b, v, c] = AGG_{e : dst(e) = v, !mask[e]}  w[e] * MSG(x[b, src(e), c], rel[(b,) type(e), c])
//
// with MSG = x * rel (distmult) or x + rel (transe) and AGG = sum | mean | max | min. Messages are
// gathered from src = edge_index[1] and summed into dst = edge_index[0] (GFM-RAG's convention). A
// node with no unmasked in-edge gets 0. mean divides by the number of unmasked in-edges.
//
// The graph arrives as the prepared int32 arrays of gfmrag_fast.ops.RelGraph, passed as one
// Tensor[] in the order of GraphField. The shared input check below checks the arrays' values the
// first time it sees them (array_checks.h), so the kernels may index memory with them.
//
// x, the output, grad_out, grad_x and the max/min aux are [B, N, d] (batch major), or [N, B, d]
// with node_major: one node's B rows then lie side by side, and a gathered edge reads one
// contiguous B * d block instead of B rows N * d apart.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <type_traits>

namespace gfmrag_fast {

enum class Message : int { DistMult = 0, TransE = 1 };
enum class Aggregate : int { Sum = 0, Mean = 1, Max = 2, Min = 3 };

// Indices into the Tensor[] graph argument. Every array is int32.
//
// Three edge lists: by destination (the forward walks it), by source (the input gradient) and by
// relation (the relation gradient). Each row of a list (a node, or a relation) is walked whole by
// one thread group, unless the plan cut it into pieces (RelGraph's chunk_size): then every piece
// is walked by a group of its own that writes a partial result, and the row's group folds the
// partials in piece order (rel_aggregate_kernels.h).
enum GraphField : int {
  kDstPtr = 0,   // [N + 1]  CSR by destination: edges of node v at dst_ptr[v] .. dst_ptr[v + 1]
  kDstSrc,       // [E]      source node of each edge, CSR order
  kDstType,      // [E]      relation of each edge, CSR order
  kDstEid,       // [E]      original edge id of each edge, CSR order
  kSrcPtr,       // [N + 1]  CSC by source
  kSrcDst,       // [E]      destination node of each edge, CSC order
  kSrcType,      // [E]      relation of each edge, CSC order
  kSrcEid,       // [E]      original edge id, CSC order
  kRelPtr,       // [R + 1]  edges grouped by relation
  kRelEid,       // [E]      original edge id, relation order
  kRelSrc,       // [E]      source node, relation order
  kRelDst,       // [E]      destination node, relation order
  kEdgeSrc,      // [E]      source node, original order (edge_index[1])
  kEdgeDst,      // [E]      destination node, original order (edge_index[0])
  kEdgeType,     // [E]      relation, original order
  kDstPiecePtr,  // [N + 1]  pieces of each row of the CSR: dst_piece_ptr[v] .. dst_piece_ptr[v + 1]
  kDstPieceBegin,  // [S_dst] first CSR position of each piece
  kDstPieceEnd,    // [S_dst] one past its last
  kSrcPiecePtr,    // [N + 1]  the same for the CSC
  kSrcPieceBegin,  // [S_src]
  kSrcPieceEnd,    // [S_src]
  kRelPiecePtr,    // [R + 1]  and for the relation order
  kRelPieceBegin,  // [S_rel]
  kRelPieceEnd,    // [S_rel]
  kNumGraphFields
};

// One edge list with its plan: kPtr, then the piece arrays, are at these offsets.
enum class EdgeList : int { Dst = 0, Src = 1, Rel = 2 };
constexpr int kListPtr[3] = {kDstPtr, kSrcPtr, kRelPtr};
constexpr int kListEid[3] = {kDstEid, kSrcEid, kRelEid};
constexpr int kListPiecePtr[3] = {kDstPiecePtr, kSrcPiecePtr, kRelPiecePtr};

// What the forward saves for the backward ("aux"):
//   sum      -> empty int32 tensor [0]
//   mean     -> int32 [N], number of unmasked in-edges of each node
//   max/min  -> int32 shaped like x, original id of the edge that won, -1 where no edge exists
struct RelAggregateArgs {
  Message message;
  Aggregate aggregate;
  int64_t batch;          // B
  int64_t num_nodes;      // N
  int64_t dim;            // d
  int64_t num_relations;  // R (all relation types, inverses included)
  int64_t num_edges;      // E
  bool per_query;         // relation is [B, R, d] rather than [R, d]
  bool has_weight;
  bool has_mask;
  bool node_major;        // x is [N, B, d]
  int64_t node_stride;    // elements between x[b, v] and x[b, v + 1]: d, or B * d when node major
  int64_t batch_stride;   // elements between x[b, v] and x[b + 1, v]: N * d, or d
};

Message parse_message(std::string_view message);
Aggregate parse_aggregate(std::string_view aggregate);

// One shared input check for every kernel of the op family; errors name the argument and the
// expected shape. Every tensor must live on x's device. The graph arrays' values are checked
// (O(E), a device->host copy on CUDA) unless these arrays passed that check before.
RelAggregateArgs check_rel_aggregate_inputs(const at::Tensor& x,  // [B, N, d] | [N, B, d] (node_major)
                                            const at::Tensor& relation,                // [R, d] | [B, R, d]
                                            at::TensorList graph,                      // GraphField order
                                            const std::optional<at::Tensor>& edge_weight,  // [E]
                                            const std::optional<at::Tensor>& edge_mask,    // [E] bool
                                            std::string_view message,
                                            std::string_view aggregate,
                                            bool node_major);

// The part of that check that concerns the graph arrays alone, for ops without x (the balance
// report): every array on `device`; returns E.
int64_t check_graph(at::TensorList graph, const at::Device& device);

// The backward ops' checks: the forward's, plus grad_out (like x) and the saved aux.
RelAggregateArgs check_rel_aggregate_backward_inputs(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& relation, const at::Tensor& aux,
    at::TensorList graph, const std::optional<at::Tensor>& edge_weight,
    const std::optional<at::Tensor>& edge_mask, std::string_view message, std::string_view aggregate,
    bool node_major);

// An edge array (edge_weight or edge_mask, [E] in original edge order) in the order `list` walks
// the edges: one gather per call, so that the kernels read it sequentially. Undefined if absent.
at::Tensor in_walk_order(const std::optional<at::Tensor>& edge_array, at::TensorList graph, EdgeList list);

// The mean's aux: [N] int32, the number of unmasked in-edges of each node (a scan, no kernel).
at::Tensor unmasked_in_degree(at::TensorList graph, const at::Tensor& mask_in_dst_order);

// The forward's aux output (see above): the mean's counted, max/min's uninitialised for the
// kernel to write. mask_in_dst_order is in_walk_order(edge_mask, graph, EdgeList::Dst).
at::Tensor forward_aux(const at::Tensor& x, at::TensorList graph, const at::Tensor& mask_in_dst_order,
                       const RelAggregateArgs& args);

// Which gradient a backward op computes, and its uninitialised output.
enum class Grad { X, Relation, EdgeWeight };
at::Tensor empty_grad(Grad which, const at::Tensor& x, const at::Tensor& relation, const RelAggregateArgs& args);

}  // namespace gfmrag_fast

namespace gfmrag_fast {

// Calls f(std::integral_constant<Message, M>{}, std::integral_constant<Aggregate, A>{}) so that
// kernels are compiled once per (message, aggregate) with no branch in the channel loop.
template <typename F>
void dispatch_message_aggregate(Message message, Aggregate aggregate, F&& f) {
  auto with_aggregate = [&](auto message_constant) {
    switch (aggregate) {
      case Aggregate::Sum:
        return f(message_constant, std::integral_constant<Aggregate, Aggregate::Sum>{});
      case Aggregate::Mean:
        return f(message_constant, std::integral_constant<Aggregate, Aggregate::Mean>{});
      case Aggregate::Max:
        return f(message_constant, std::integral_constant<Aggregate, Aggregate::Max>{});
      case Aggregate::Min:
        return f(message_constant, std::integral_constant<Aggregate, Aggregate::Min>{});
    }
  };
  if (message == Message::DistMult) {
    with_aggregate(std::integral_constant<Message, Message::DistMult>{});
  } else {
    with_aggregate(std::integral_constant<Message, Message::TransE>{});
  }
}

}  // namespace gfmrag_fast
