// What the CPU and the CUDA kernels of rel_aggregate share, element by element, so that they
// compute the same operations in the same order (the CUDA emulator checks them bit for bit): the
// messages and their derivatives, the max/min rule, the mean's scale, the edge loop, and the work
// plan (which thread group walks which edges; the balance report reads it the same way).
#pragma once

#include "rel_aggregate.h"
#include "rounded_arith.h"

#include <c10/macros/Macros.h>

#include <cstdint>

// The CUDA emulator (tools/cuda_emulator) counts the edges each thread group visits; elsewhere
// these are no-ops. `pass` is 0 for a piece's group, 1 for a row's; `item` numbers the groups of
// that pass.
#ifndef GFMRAG_FAST_COUNT_GROUP
#define GFMRAG_FAST_COUNT_GROUP(kernel, pass, item) ((void)0)
#define GFMRAG_FAST_COUNT_VISIT(kernel, pass, item) ((void)0)
#endif

namespace gfmrag_fast {

// --- the arithmetic ----------------------------------------------------------------------------

template <Message M, typename acc_t>
C10_HOST_DEVICE inline acc_t message_of(acc_t x, acc_t r) {
  if constexpr (M == Message::DistMult) return x * r;
  else return x + r;
}

// d message / d x (other = the relation row) or d message / d relation (other = the x row), times
// the incoming gradient g and the edge's scale s.
template <Message M, typename acc_t>
C10_HOST_DEVICE inline acc_t message_grad(acc_t g, acc_t other, acc_t s) {
  acc_t t = g * s;
  if constexpr (M == Message::DistMult) t *= other;
  return t;
}

template <Aggregate A, typename acc_t>
C10_HOST_DEVICE inline bool wins(acc_t candidate, acc_t best) {
  // NaN wins so that it propagates, as torch's amax/amin do.
  if constexpr (A == Aggregate::Max) return candidate > best || candidate != candidate;
  else return candidate < best || candidate != candidate;
}

// Folds candidate m of edge e into the running max/min (a, best); best < 0: nothing yet, so the
// first candidate always wins and no sentinel value (which a message could equal) is needed.
// Branch-free, so that the CPU's channel loop vectorises. Folding a row piece by piece gives the
// same (a, best) as folding it edge by edge: the rule keeps the earliest of equal candidates.
template <Aggregate A, typename acc_t>
C10_HOST_DEVICE inline void keep_extremum(acc_t& a, int32_t& best, acc_t m, int32_t e) {
  const bool take = best < 0 || wins<A>(m, a);
  a = take ? m : a;
  best = take ? e : best;
}

// A piece's partial (m, e) folded into its row's running max/min; e < 0: the piece had no edge.
template <Aggregate A, typename acc_t>
C10_HOST_DEVICE inline void keep_partial_extremum(acc_t& a, int32_t& best, acc_t m, int32_t e) {
  const bool take = e >= 0 && (best < 0 || wins<A>(m, a));
  a = take ? m : a;
  best = take ? e : best;
}

// The forward's result from its accumulator: max/min give 0 where no edge won; mean divides the
// sum by the number n of unmasked in-edges.
template <Aggregate A, typename acc_t>
C10_HOST_DEVICE inline acc_t finish_forward(acc_t a, int32_t best, int32_t n) {
  if constexpr (A == Aggregate::Max || A == Aggregate::Min) {
    return best < 0 ? acc_t(0) : a;
  } else {
    const acc_t scale = (A == Aggregate::Mean && n > 0) ? acc_t(1) / acc_t(n) : acc_t(1);
    return a * scale;
  }
}

// d out[b, v, c] / d message[b, e, c] for an unmasked edge e into v, without the selection of
// max/min: 1 for sum and max/min, 1 / in-degree for mean (count = the mean's aux).
template <Aggregate A, typename acc_t>
C10_HOST_DEVICE inline acc_t reduce_scale(const int32_t* count, int32_t v) {
  if constexpr (A == Aggregate::Mean) return acc_t(1) / static_cast<acc_t>(count[v]);
  else return acc_t(1);
}

// --- the edge loop -----------------------------------------------------------------------------

// On the GPU, edge positions whose arrays are read ahead of the gathers they feed: kEdgesAhead
// independent loads are in flight before the first gather waits for its index. A CPU core's
// out-of-order window does that by itself (grouping measured 10-15 % slower there); the CPU kernels
// prefetch the gathered rows a few edges ahead instead.
constexpr int kEdgesAhead = 4;

#ifdef __CUDACC__
#define GFMRAG_FAST_UNROLL _Pragma("unroll")
#else
#define GFMRAG_FAST_UNROLL
#endif

// Always inlined on the CPU: the loop and the lambdas it calls must be compiled into each
// target clone of its caller (cpu/cpu_clones.h), not once for the baseline.
#ifdef __CUDACC__
#define GFMRAG_FAST_WALK_INLINE C10_HOST_DEVICE inline
#else
#define GFMRAG_FAST_WALK_INLINE C10_ALWAYS_INLINE
#endif

// visit(load(k)) for k = begin .. end - 1 in order (on the GPU, and in the CUDA emulator that runs
// its code on the CPU, loading kEdgesAhead edges at a time).
template <typename Load, typename Visit>
GFMRAG_FAST_WALK_INLINE void walk_edges(int32_t begin, int32_t end, const Load& load, const Visit& visit) {
  int32_t k = begin;
#if defined(__CUDA_ARCH__) || defined(GFMRAG_FAST_CUDA_EMULATOR)
  for (; k + kEdgesAhead <= end; k += kEdgesAhead) {
    decltype(load(k)) edge[kEdgesAhead];
    GFMRAG_FAST_UNROLL
    for (int j = 0; j < kEdgesAhead; ++j) edge[j] = load(k + j);
    GFMRAG_FAST_UNROLL
    for (int j = 0; j < kEdgesAhead; ++j) visit(edge[j]);
  }
#endif
  for (; k < end; ++k) visit(load(k));
}

// One edge as the kernels walk it: every field read from an array in walk order.
template <typename acc_t>
struct WalkedEdge {
  int32_t node;   // the node whose row is gathered: source (forward), destination (gradients)
  int32_t other;  // the relation (forward, input gradient), or the source (relation gradient)
  int32_t eid;   // original id, for max/min only
  acc_t weight;
  bool removed;
};

// --- the work plan -----------------------------------------------------------------------------

enum class Kernel : int { Forward = 0, GradX = 1, GradRelation = 2, GradEdgeWeight = 3 };
constexpr int kNumKernels = 4;

// One edge list and its pieces (rel_aggregate.h), as raw pointers.
struct ListPlan {
  const int32_t* ptr;          // [rows + 1]
  const int32_t* piece_ptr;    // [rows + 1]
  const int32_t* piece_begin;  // [pieces]
  const int32_t* piece_end;    // [pieces]
  int64_t rows;
  int64_t pieces;
};

C10_HOST_DEVICE inline bool walked_whole(const ListPlan& plan, int64_t row) {
  return plan.piece_ptr[row] == plan.piece_ptr[row + 1];
}

// The edge positions [begin, end) a piece's group walks, and those of a row walked whole.
struct EdgeRange {
  int32_t begin;
  int32_t end;
};
C10_HOST_DEVICE inline EdgeRange piece_edges(const ListPlan& plan, int64_t piece) {
  return {plan.piece_begin[piece], plan.piece_end[piece]};
}
C10_HOST_DEVICE inline EdgeRange row_edges(const ListPlan& plan, int64_t row) {
  return {plan.ptr[row], plan.ptr[row + 1]};
}

// How a kernel's thread groups cover the batch: each piece and each row of its edge list gets
// `groups_per_row` groups (one per batch element, or one in all), and each group walks its edges
// for `batch_loop` batch elements. The relation gradient of a shared table sums over the batch,
// so one group per row loops over it; everything else is one group per (row, b). Groups are
// numbered item = row * groups_per_row + b, so the B groups of one node run side by side and
// share its edge list.
struct WorkShape {
  int64_t groups_per_row;
  int64_t batch_loop;
};

inline WorkShape work_shape(Kernel kernel, int64_t batch, bool per_query) {
  if (kernel == Kernel::GradRelation && !per_query) return {1, batch};
  if (kernel == Kernel::GradEdgeWeight) return {1, batch};  // one group (a warp) per edge
  return {batch, 1};
}

// A kernel runs in two passes over its plan: first one group per (piece, b), writing partials,
// then one per (row, b), walking the row or folding its pieces' partials. Groups of a pass:
enum class Pass : int { Pieces = 0, Rows = 1 };
C10_HOST_DEVICE inline int64_t pass_groups(const ListPlan& plan, const WorkShape& shape, Pass pass) {
  return (pass == Pass::Pieces ? plan.pieces : plan.rows) * shape.groups_per_row;
}

// The plan of `list` in the prepared arrays (host code; pointers into the arrays' device).
inline ListPlan list_plan(at::TensorList graph, EdgeList list) {
  const int l = static_cast<int>(list);
  const int pieces = kListPiecePtr[l];
  return {graph[kListPtr[l]].const_data_ptr<int32_t>(), graph[pieces].const_data_ptr<int32_t>(),
          graph[pieces + 1].const_data_ptr<int32_t>(), graph[pieces + 2].const_data_ptr<int32_t>(),
          graph[kListPtr[l]].size(0) - 1, graph[pieces + 1].size(0)};
}

constexpr Kernel kernel_of(Grad grad) {
  return grad == Grad::X ? Kernel::GradX : grad == Grad::Relation ? Kernel::GradRelation : Kernel::GradEdgeWeight;
}

// A gradient kernel's edge weights and mask in the order it walks its edge list; undefined for
// the edge-weight gradient, which walks the edges in original order (no reordering needed).
struct WalkOrderArrays {
  at::Tensor weight;
  at::Tensor mask;
};
inline EdgeList list_of(Kernel kernel) {
  switch (kernel) {
    case Kernel::Forward:
      return EdgeList::Dst;
    case Kernel::GradX:
      return EdgeList::Src;
    default:
      return EdgeList::Rel;
  }
}

inline WalkOrderArrays walk_order_arrays(Kernel kernel, const std::optional<at::Tensor>& edge_weight,
                                         const std::optional<at::Tensor>& edge_mask, at::TensorList graph) {
  if (kernel == Kernel::GradEdgeWeight) return {};
  return {in_walk_order(edge_weight, graph, list_of(kernel)), in_walk_order(edge_mask, graph, list_of(kernel))};
}

}  // namespace gfmrag_fast
