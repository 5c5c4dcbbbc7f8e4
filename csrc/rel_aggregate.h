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
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <type_traits>

namespace gfmrag_fast {

enum class Message : int { DistMult = 0, TransE = 1 };
enum class Aggregate : int { Sum = 0, Mean = 1, Max = 2, Min = 3 };

// Indices into the Tensor[] graph argument. Every array is int32.
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
  kEdgeSrc,      // [E]      source node, original order (edge_index[1])
  kEdgeDst,      // [E]      destination node, original order (edge_index[0])
  kEdgeType,     // [E]      relation, original order
  kNumGraphFields
};

// What the forward saves for the backward ("aux"):
//   sum      -> empty int32 tensor [0]
//   mean     -> int32 [N], number of unmasked in-edges of each node
//   max/min  -> int32 [B, N, d], original id of the edge that won, -1 where no edge exists
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
};

Message parse_message(std::string_view message);
Aggregate parse_aggregate(std::string_view aggregate);

// One shared input check for every kernel of the op family; errors name the argument and the
// expected shape. Every tensor must live on x's device. The graph arrays' values are checked
// (O(E), a device->host copy on CUDA) unless these arrays passed that check before.
RelAggregateArgs check_rel_aggregate_inputs(const at::Tensor& x,                       // [B, N, d]
                                            const at::Tensor& relation,                // [R, d] | [B, R, d]
                                            at::TensorList graph,                      // GraphField order
                                            const std::optional<at::Tensor>& edge_weight,  // [E]
                                            const std::optional<at::Tensor>& edge_mask,    // [E] bool
                                            std::string_view message,
                                            std::string_view aggregate);

// The backward ops' checks: the forward's, plus grad_out (like x) and the saved aux.
RelAggregateArgs check_rel_aggregate_backward_inputs(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& relation, const at::Tensor& aux,
    at::TensorList graph, const std::optional<at::Tensor>& edge_weight,
    const std::optional<at::Tensor>& edge_mask, std::string_view message, std::string_view aggregate);

// The forward's aux output, uninitialised, shaped for the aggregation (see above).
at::Tensor empty_aux(const at::Tensor& x, const RelAggregateArgs& args);

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
