// CUDA kernels of rel_aggregate (forward and the three gradients).
//
// Same ownership scheme and plan as the CPU kernels (rel_aggregate_kernels.h): every output
// element and every partial is owned by one thread (or, for the edge-weight gradient, one warp)
// that accumulates in a fixed order, so results are deterministic with no atomics. The forward
// walks the CSR by destination, the input gradient the CSC by source, the relation gradient the
// edges grouped by relation, each in two passes: the pieces of long rows, each into a partial,
// then the rows, walked whole or folding their pieces' partials in order. No thread group walks
// more than the plan's chunk size (times the batch, for the shared table's relation gradient).
//
// Row kernels: a fixed group of threads owns one output row (one node or relation, or piece, of
// one batch element, or of all for the shared table) and splits its channels, VEC at a time with
// 16-byte loads and stores where the row width and every base pointer allow it. All threads of a
// group walk the same edges, so the edge arrays are broadcast loads, read several edges ahead of
// the gathers (walk_edges), and each thread keeps one accumulator per channel it owns: the
// per-channel order of operations is the same as with one thread per element, so the vector width
// changes no result. Groups are numbered item = row * B + b: the B groups of one node run side by
// side and share its edge list and, for a shared table, the relation rows it gathers.
//
// Sums use add_rn (__fadd_rn / __dadd_rn) so nvcc cannot contract `acc += a * b` into an FMA: the
// forward, input and relation gradients then round like the CPU kernels, operation for operation.
// Only the edge-weight gradient differs from the CPU in summation order (a warp tree).
#include "../rel_aggregate_kernels.h"

#include <ATen/DeviceGuard.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>

namespace gfmrag_fast {
namespace {

constexpr int kBlockThreads = 256;  // a multiple of the warp size (the edge-weight kernel needs it)
constexpr int kWarpSize = 32;
constexpr int kRowBlockThreads = 128;  // row kernels: at least this many threads per block ...
constexpr int kMaxRowThreads = 256;    // ... and at most this many threads per row (they loop)
constexpr int64_t kMaxGridBlocks = std::numeric_limits<int32_t>::max();  // grid.x limit

// Launch shape for one thread per work item; every kernel goes through here so tuning is local.
dim3 grid_for(int64_t num_threads) {
  const int64_t blocks = (num_threads + kBlockThreads - 1) / kBlockThreads;
  TORCH_CHECK(blocks > 0 && blocks <= std::numeric_limits<int32_t>::max(),
              "rel_aggregate: cannot launch ", num_threads, " CUDA threads in one grid");
  return dim3(static_cast<unsigned int>(blocks));
}

// Launch shape of a row kernel: `rows` rows of `vectors` vectors each. A row gets the smallest
// power of two of threads >= its vectors up to a warp, else a whole number of warps up to
// kMaxRowThreads; small rows are packed several to a block. Rows past the grid are reached by
// a grid-stride loop, so any B * N fits.
struct RowLaunch { dim3 grid; int block; int threads_per_row; };

RowLaunch row_launch(int64_t rows, int64_t vectors) {
  TORCH_INTERNAL_ASSERT(rows > 0 && vectors > 0);
  int64_t per_row = 1;
  if (vectors <= kWarpSize) {
    while (per_row < vectors) per_row *= 2;
  } else {
    per_row = std::min<int64_t>(kMaxRowThreads, (vectors + kWarpSize - 1) / kWarpSize * kWarpSize);
  }
  const int64_t rows_per_block = std::max<int64_t>(1, kRowBlockThreads / per_row);
  const int64_t blocks = std::min((rows + rows_per_block - 1) / rows_per_block, kMaxGridBlocks);
  return {dim3(static_cast<unsigned int>(blocks)), static_cast<int>(rows_per_block * per_row),
          static_cast<int>(per_row)};
}

// 16 bytes of scalar_t per vector; 1 where a row width or a base pointer forbids it (a contiguous
// tensor may still start at an odd element of its storage).
template <typename scalar_t>
constexpr int kVecWidth = 16 / static_cast<int>(sizeof(scalar_t));

bool can_vectorize(int64_t dim, int vec, std::initializer_list<const void*> pointers) {
  if (dim % vec != 0) return false;
  return std::all_of(pointers.begin(), pointers.end(),
                     [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; });
}

// Calls f(std::integral_constant<int, V>{}) with V = kVecWidth<scalar_t> or 1.
template <typename scalar_t, typename F>
void with_vector_width(bool vectorize, F&& f) {
  if (vectorize) f(std::integral_constant<int, kVecWidth<scalar_t>>{});
  else f(std::integral_constant<int, 1>{});
}

// V consecutive elements, aligned so that one load moves them (two for 8 x int32).
template <typename T, int V>
struct alignas(sizeof(T) * V < 16 ? sizeof(T) * V : 16) Pack { T v[V]; };

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) { return *reinterpret_cast<const Pack<T, V>*>(p); }
template <int V, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& value) { *reinterpret_cast<Pack<T, V>*>(p) = value; }

// Calls f(row, c) for every row of this thread's group and every vector it owns in that row, c
// being the vector's first channel. `threads_per_row` divides blockDim.x (see row_launch).
template <int V, typename F>
__device__ __forceinline__ void for_each_row_vector(int64_t rows, int64_t dim, int threads_per_row, F&& f) {
  const int rows_per_block = blockDim.x / threads_per_row;
  const int group = threadIdx.x / threads_per_row;
  const int lane = threadIdx.x - group * threads_per_row;
  const int64_t step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + group; row < rows; row += step) {
    for (int64_t c = static_cast<int64_t>(lane) * V; c < dim; c += static_cast<int64_t>(threads_per_row) * V) {
      f(row, c);
    }
  }
}

// Calls f(item, i, slot, c) for every thread group `item` of pass P of a plan (piece or row
// i = item / per_row, slot = item % per_row, per_row = shape.groups_per_row) and each of its
// vectors of V channels starting at channel c.
template <int V, typename F>
__device__ __forceinline__ void for_each_group(const ListPlan& plan, const WorkShape& shape, Pass pass, int64_t dim,
                                               int threads_per_row, F&& f) {
  for_each_row_vector<V>(pass_groups(plan, shape, pass), dim, threads_per_row, [&](int64_t item, int64_t c) {
    const int64_t i = item / shape.groups_per_row;
    f(item, i, item - i * shape.groups_per_row, c);
  });
}

__device__ __forceinline__ int64_t thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

template <typename acc_t, int V>
__device__ __forceinline__ void fill(acc_t (&acc)[V], acc_t value) {
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = value;
}

// acc[j] += message_grad(g[j], other[j], s), only where edge e won for max/min.
template <Message M, bool kExtremum, typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void add_message_grads(acc_t (&acc)[V], const Pack<scalar_t, V>& g,
                                                  const Pack<scalar_t, V>& other, const Pack<int32_t, V>& sel,
                                                  int32_t e, acc_t s) {
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const acc_t t = message_grad<M>(static_cast<acc_t>(g.v[j]), static_cast<acc_t>(other.v[j]), s);
    if constexpr (kExtremum) {
      if (sel.v[j] == e) acc[j] = add_rn(acc[j], t);
    } else {
      acc[j] = add_rn(acc[j], t);
    }
  }
}

// acc[j] += partial[j]: one piece's partial sums folded into its row.
template <typename acc_t, int V>
__device__ __forceinline__ void add_partial(acc_t (&acc)[V], const acc_t* partial) {
  const Pack<acc_t, V> p = load_pack<V>(partial);
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = add_rn(acc[j], p.v[j]);
}

template <typename acc_t, int V>
__device__ __forceinline__ void store_partial(acc_t* partial, const acc_t (&acc)[V]) {
  Pack<acc_t, V> p;
#pragma unroll
  for (int j = 0; j < V; ++j) p.v[j] = acc[j];
  store_pack<V>(partial, p);
}

template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void store_result(scalar_t* out, const acc_t (&acc)[V]) {
  Pack<scalar_t, V> res;
#pragma unroll
  for (int j = 0; j < V; ++j) res.v[j] = static_cast<scalar_t>(acc[j]);
  store_pack<V>(out, res);
}

// The end of a group of a gradient kernel (whose rows are sums), at channels [c, c + V): in the
// pieces pass it walks piece i into its partial sums; in the rows pass it walks row i whole, or
// folds the partials of the row's pieces in piece order, and stores the row at `out`. The group
// is number `slot` of the `per_row` groups of its piece or row; partial is [pieces, per_row, D].
template <Pass P, typename scalar_t, typename acc_t, int V, typename Walk>
__device__ __forceinline__ void sum_group(const ListPlan& plan, int64_t i, int64_t slot, int64_t per_row,
                                          acc_t* partial, int64_t D, int64_t c, const Walk& walk,
                                          acc_t (&acc)[V], scalar_t* out) {
  if constexpr (P == Pass::Pieces) {
    walk(piece_edges(plan, i));
    store_partial(partial + (i * per_row + slot) * D + c, acc);
  } else {
    if (walked_whole(plan, i)) {
      walk(row_edges(plan, i));
    } else {
      for (int32_t p = plan.piece_ptr[i]; p < plan.piece_ptr[i + 1]; ++p) {
        add_partial(acc, partial + (p * per_row + slot) * D + c);
      }
    }
    store_result(out, acc);
  }
}

// Inputs shared by every kernel, as raw device pointers; passed to kernels by value. Tensors
// shaped like x are addressed through at(b, v), which knows the layout.
template <typename scalar_t>
struct Inputs {
  const scalar_t* x;         // [B, N, d] | [N, B, d]
  const scalar_t* relation;  // [R, d] | [B, R, d]
  const scalar_t* weight;    // [E] in the walk order of the kernel's edge list, or nullptr
  const bool* mask;          // [E] the same, or nullptr
  const int32_t* aux;        // see rel_aggregate.h; the mean's in-degrees in the forward too
  const int32_t* graph[kNumGraphFields];
  int64_t batch, num_nodes, dim, num_relations, num_edges, node_stride, batch_stride;
  bool per_query;

  __device__ int64_t at(int64_t b, int64_t v) const { return b * batch_stride + v * node_stride; }
  __device__ const scalar_t* relation_of(int64_t b) const {
    return relation + (per_query ? b * num_relations * dim : 0);
  }
  // Edge k of a list: node and other from the list's arrays (WalkedEdge), eid for max/min.
  template <typename acc_t, bool kWithEid>
  __device__ WalkedEdge<acc_t> edge(int32_t k, const int32_t* __restrict__ node, const int32_t* __restrict__ other,
                                    const int32_t* __restrict__ eid) const {
    return {node[k], other[k], kWithEid ? eid[k] : 0, weight ? static_cast<acc_t>(weight[k]) : acc_t(1),
            mask != nullptr && mask[k]};
  }
};

template <typename scalar_t>
Inputs<scalar_t> make_inputs(const at::Tensor& x, const at::Tensor& relation, const at::Tensor& aux,
                             at::TensorList graph, const at::Tensor& weight, const at::Tensor& mask,
                             const RelAggregateArgs& a) {
  Inputs<scalar_t> in{};
  in.x = x.const_data_ptr<scalar_t>();
  in.relation = relation.const_data_ptr<scalar_t>();
  in.weight = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
  in.mask = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  in.aux = aux.const_data_ptr<int32_t>();
  for (int i = 0; i < kNumGraphFields; ++i) in.graph[i] = graph[i].const_data_ptr<int32_t>();
  in.batch = a.batch;
  in.num_nodes = a.num_nodes;
  in.dim = a.dim;
  in.num_relations = a.num_relations;
  in.num_edges = a.num_edges;
  in.node_stride = a.node_stride;
  in.batch_stride = a.batch_stride;
  in.per_query = a.per_query;
  return in;
}

constexpr bool is_extremum(Aggregate A) { return A == Aggregate::Max || A == Aggregate::Min; }

// Pass P of the forward: one group per (piece, b) into partial [S, B, d] (and partial_arg), or per
// (node, b) into out and, for max/min, arg (x's layout).
template <typename scalar_t, Message M, Aggregate A, int V, Pass P>
__global__ void forward_kernel(const Inputs<scalar_t> in, const ListPlan plan, const WorkShape shape, scalar_t* out,
                               int32_t* arg, at::opmath_type<scalar_t>* partial, int32_t* partial_arg,
                               int threads_per_row) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kExtremum = is_extremum(A);
  const int64_t B = in.batch, D = in.dim;
  const int32_t* src = in.graph[kDstSrc];
  const int32_t* type = in.graph[kDstType];
  const int32_t* eid = in.graph[kDstEid];
  // shape = {B, 1}: one group per (piece or row i, b)
  for_each_group<V>(plan, shape, P, D, threads_per_row, [&](int64_t item, int64_t i, int64_t b, int64_t c) {
    const bool counting = c == 0;
    if (counting) GFMRAG_FAST_COUNT_GROUP(Kernel::Forward, P, item);
    const scalar_t* xb = in.x + in.at(b, 0) + c;
    const scalar_t* rb = in.relation_of(b) + c;
    acc_t acc[V];
    int32_t best[V];
    fill(acc, acc_t(0));
#pragma unroll
    for (int j = 0; j < V; ++j) best[j] = -1;
    const auto walk = [&](EdgeRange range) {
      const auto load = [&](int32_t k) { return in.template edge<acc_t, kExtremum>(k, src, type, eid); };
      walk_edges(range.begin, range.end, load, [&](const WalkedEdge<acc_t>& e) {
        if (counting) GFMRAG_FAST_COUNT_VISIT(Kernel::Forward, P, item);
        if (e.removed) return;
        const Pack<scalar_t, V> xs = load_pack<V>(xb + e.node * in.node_stride);
        const Pack<scalar_t, V> rs = load_pack<V>(rb + static_cast<int64_t>(e.other) * D);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const acc_t m = e.weight * message_of<M>(static_cast<acc_t>(xs.v[j]), static_cast<acc_t>(rs.v[j]));
          if constexpr (kExtremum) keep_extremum<A>(acc[j], best[j], m, e.eid);
          else acc[j] = add_rn(acc[j], m);
        }
      });
    };
    if constexpr (P == Pass::Pieces) {
      walk(piece_edges(plan, i));
      store_partial(partial + item * D + c, acc);
      if constexpr (kExtremum) {
        Pack<int32_t, V> won;
#pragma unroll
        for (int j = 0; j < V; ++j) won.v[j] = best[j];
        store_pack<V>(partial_arg + item * D + c, won);
      }
    } else {
      if (walked_whole(plan, i)) {
        walk(row_edges(plan, i));
      } else {
        for (int32_t p = plan.piece_ptr[i]; p < plan.piece_ptr[i + 1]; ++p) {
          const int64_t o = (p * B + b) * D + c;
          if constexpr (kExtremum) {
            const Pack<acc_t, V> pm = load_pack<V>(partial + o);
            const Pack<int32_t, V> pe = load_pack<V>(partial_arg + o);
#pragma unroll
            for (int j = 0; j < V; ++j) keep_partial_extremum<A>(acc[j], best[j], pm.v[j], pe.v[j]);
          } else {
            add_partial(acc, partial + o);
          }
        }
      }
      const int32_t n = A == Aggregate::Mean ? in.aux[i] : 0;
      const int64_t o = in.at(b, i) + c;
      Pack<scalar_t, V> res;
#pragma unroll
      for (int j = 0; j < V; ++j) res.v[j] = static_cast<scalar_t>(finish_forward<A>(acc[j], best[j], n));
      store_pack<V>(out + o, res);
      if constexpr (kExtremum) {
        Pack<int32_t, V> won;
#pragma unroll
        for (int j = 0; j < V; ++j) won.v[j] = best[j];
        store_pack<V>(arg + o, won);
      }
    }
  });
}

// Pass P of the input gradient: one group per (piece, b) or (node u, b), walking u's out-edges.
template <typename scalar_t, Message M, Aggregate A, int V, Pass P>
__global__ void backward_x_kernel(const Inputs<scalar_t> in, const ListPlan plan, const WorkShape shape,
                                  const scalar_t* grad_out, scalar_t* grad_x, at::opmath_type<scalar_t>* partial,
                                  int threads_per_row) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kExtremum = is_extremum(A);
  const int64_t D = in.dim;
  const int32_t* dst = in.graph[kSrcDst];
  const int32_t* type = in.graph[kSrcType];
  const int32_t* eid = in.graph[kSrcEid];
  // shape = {B, 1}: one group per (piece or row i, b)
  for_each_group<V>(plan, shape, P, D, threads_per_row, [&](int64_t item, int64_t i, int64_t b, int64_t c) {
    const bool counting = c == 0;
    if (counting) GFMRAG_FAST_COUNT_GROUP(Kernel::GradX, P, item);
    const scalar_t* rb = in.relation_of(b) + c;
    const scalar_t* gb = grad_out + in.at(b, 0) + c;               // grad_out and the max/min aux
    const int32_t* sb = kExtremum ? in.aux + in.at(b, 0) + c : nullptr;
    acc_t acc[V];
    fill(acc, acc_t(0));
    const auto walk = [&](EdgeRange range) {
      const auto load = [&](int32_t k) { return in.template edge<acc_t, kExtremum>(k, dst, type, eid); };
      walk_edges(range.begin, range.end, load, [&](const WalkedEdge<acc_t>& e) {
        if (counting) GFMRAG_FAST_COUNT_VISIT(Kernel::GradX, P, item);
        if (e.removed) return;
        const acc_t scale = e.weight * reduce_scale<A, acc_t>(in.aux, e.node);
        const int64_t v = static_cast<int64_t>(e.node) * in.node_stride;
        const Pack<scalar_t, V> gs = load_pack<V>(gb + v);
        Pack<scalar_t, V> rs;
        if constexpr (M == Message::DistMult) rs = load_pack<V>(rb + static_cast<int64_t>(e.other) * D);
        Pack<int32_t, V> sel;
        if constexpr (kExtremum) sel = load_pack<V>(sb + v);
        add_message_grads<M, kExtremum>(acc, gs, rs, sel, e.eid, scale);
      });
    };
    sum_group<P>(plan, i, b, shape.groups_per_row, partial, D, c, walk, acc, grad_x + in.at(b, i) + c);
  });
}

// Pass P of the relation gradient: per-query tables, one group per (piece or relation, b); a
// shared table, one group per piece or relation that sums over the batch inside the edge loop,
// as the CPU kernel does.
template <typename scalar_t, Message M, Aggregate A, int V, Pass P>
__global__ void backward_relation_kernel(const Inputs<scalar_t> in, const ListPlan plan, const WorkShape shape,
                                         const scalar_t* grad_out, scalar_t* grad_relation,
                                         at::opmath_type<scalar_t>* partial, int threads_per_row) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kExtremum = is_extremum(A);
  const int64_t D = in.dim, R = in.num_relations;
  const int64_t per_row = shape.groups_per_row;
  const int32_t* dst = in.graph[kRelDst];
  const int32_t* src = in.graph[kRelSrc];
  const int32_t* eid = in.graph[kRelEid];
  for_each_group<V>(plan, shape, P, D, threads_per_row, [&](int64_t item, int64_t i, int64_t ob, int64_t c) {
    const int64_t b_begin = ob * shape.batch_loop, b_end = b_begin + shape.batch_loop;
    const bool counting = c == 0;
    if (counting) GFMRAG_FAST_COUNT_GROUP(Kernel::GradRelation, P, item);
    acc_t acc[V];
    fill(acc, acc_t(0));
    const auto walk = [&](EdgeRange range) {
      const auto load = [&](int32_t k) { return in.template edge<acc_t, kExtremum>(k, dst, src, eid); };
      walk_edges(range.begin, range.end, load, [&](const WalkedEdge<acc_t>& e) {
        if (e.removed) {
          if (counting) {
            for (int64_t b = b_begin; b < b_end; ++b) GFMRAG_FAST_COUNT_VISIT(Kernel::GradRelation, P, item);
          }
          return;
        }
        const acc_t scale = e.weight * reduce_scale<A, acc_t>(in.aux, e.node);
        for (int64_t b = b_begin; b < b_end; ++b) {
          if (counting) GFMRAG_FAST_COUNT_VISIT(Kernel::GradRelation, P, item);
          const int64_t o = in.at(b, e.node) + c;  // grad_out and the max/min aux
          const Pack<scalar_t, V> gs = load_pack<V>(grad_out + o);
          Pack<scalar_t, V> xs;
          if constexpr (M == Message::DistMult) xs = load_pack<V>(in.x + in.at(b, e.other) + c);
          Pack<int32_t, V> sel;
          if constexpr (kExtremum) sel = load_pack<V>(in.aux + o);
          add_message_grads<M, kExtremum>(acc, gs, xs, sel, e.eid, scale);
        }
      });
    };
    sum_group<P>(plan, i, ob, per_row, partial, D, c, walk, acc, grad_relation + (ob * R + i) * D + c);
  });
}

// One warp per edge, in original edge order (no indirection): lanes stride over the channels of
// every batch row, then a fixed-shape shuffle tree combines them, so the sum order never depends
// on scheduling.
template <typename scalar_t, Message M, Aggregate A>
__global__ void backward_edge_weight_kernel(const Inputs<scalar_t> in, const bool* mask, const scalar_t* grad_out,
                                            scalar_t* grad_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kExtremum = is_extremum(A);
  const int64_t D = in.dim;
  const int64_t warp = thread_index() / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  // The edge is uniform across the warp, so whole warps leave together and the full-mask
  // shuffles below see all 32 lanes.
  if (warp >= in.num_edges) return;
  const int32_t e = static_cast<int32_t>(warp);
  if (lane == 0) GFMRAG_FAST_COUNT_GROUP(Kernel::GradEdgeWeight, Pass::Pieces, e);
  if (mask != nullptr && mask[e]) {
    if (lane == 0) grad_weight[e] = scalar_t(0);
    return;
  }
  const int32_t u = in.graph[kEdgeSrc][e];
  const int32_t v = in.graph[kEdgeDst][e];
  const int64_t type = in.graph[kEdgeType][e];

  acc_t total = 0;
  for (int64_t b = 0; b < in.batch; ++b) {
    if (lane == 0) GFMRAG_FAST_COUNT_VISIT(Kernel::GradEdgeWeight, Pass::Pieces, e);
    const scalar_t* g = grad_out + in.at(b, v);
    const scalar_t* xu = in.x + in.at(b, u);
    const scalar_t* rr = in.relation_of(b) + type * D;
    const int32_t* sel = kExtremum ? in.aux + in.at(b, v) : nullptr;
    for (int64_t c = lane; c < D; c += kWarpSize) {
      const acc_t t = static_cast<acc_t>(g[c]) * message_of<M>(static_cast<acc_t>(xu[c]), static_cast<acc_t>(rr[c]));
      if constexpr (kExtremum) {
        if (sel[c] == e) total = add_rn(total, t);
      } else {
        total = add_rn(total, t);
      }
    }
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    total = add_rn(total, __shfl_down_sync(0xffffffffu, total, offset));
  }
  if (lane == 0) grad_weight[e] = static_cast<scalar_t>(total * reduce_scale<A, acc_t>(in.aux, v));
}

// Calls f(std::integral_constant<Pass, P>{}, launch shape) for the passes of a plan that have
// groups, pieces first (the rows fold their partials).
template <typename F>
void for_each_pass(const ListPlan& plan, const WorkShape& shape, int64_t vectors, F&& f) {
  const int64_t pieces = pass_groups(plan, shape, Pass::Pieces);
  const int64_t rows = pass_groups(plan, shape, Pass::Rows);
  if (pieces > 0) f(std::integral_constant<Pass, Pass::Pieces>{}, row_launch(pieces, vectors));
  if (rows > 0) f(std::integral_constant<Pass, Pass::Rows>{}, row_launch(rows, vectors));
}

// Partial results of the pieces of a plan: [S, groups_per_row, d] accumulators.
at::Tensor empty_partials(const at::Tensor& x, const ListPlan& plan, const WorkShape& shape, int64_t dim,
                          at::ScalarType dtype) {
  return at::empty({plan.pieces, shape.groups_per_row, dim}, x.options().dtype(dtype));
}

std::tuple<at::Tensor, at::Tensor> rel_aggregate_cuda(const at::Tensor& x, const at::Tensor& relation,
                                                      at::TensorList graph,
                                                      const std::optional<at::Tensor>& edge_weight,
                                                      const std::optional<at::Tensor>& edge_mask,
                                                      c10::string_view message, c10::string_view aggregate,
                                                      bool node_major) {
  const RelAggregateArgs a =
      check_rel_aggregate_inputs(x, relation, graph, edge_weight, edge_mask, message, aggregate, node_major);
  const at::cuda::OptionalCUDAGuard guard(device_of(x));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor weight = in_walk_order(edge_weight, graph, EdgeList::Dst);
  const at::Tensor mask = in_walk_order(edge_mask, graph, EdgeList::Dst);
  at::Tensor out = at::empty_like(x);
  at::Tensor aux = forward_aux(x, graph, mask, a);  // the mean's in-degrees even when B * d == 0
  if (x.numel() == 0) return {out, aux};
  const bool extremum = a.aggregate == Aggregate::Max || a.aggregate == Aggregate::Min;
  int32_t* arg = extremum ? aux.mutable_data_ptr<int32_t>() : nullptr;
  const ListPlan plan = list_plan(graph, EdgeList::Dst);
  const WorkShape shape = work_shape(Kernel::Forward, a.batch, a.per_query);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rel_aggregate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = make_inputs<scalar_t>(x, relation, aux, graph, weight, mask, a);
    at::Tensor partial = empty_partials(x, plan, shape, a.dim, c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor partial_arg = extremum ? empty_partials(x, plan, shape, a.dim, at::kInt) : at::Tensor();
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    int32_t* pa = extremum ? partial_arg.mutable_data_ptr<int32_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const bool vectorize = can_vectorize(a.dim, kVecWidth<scalar_t>, {in.x, in.relation, o, arg, pp, pa});
    dispatch_message_aggregate(a.message, a.aggregate, [&](auto m, auto g) {
      with_vector_width<scalar_t>(vectorize, [&](auto vec) {
        constexpr int V = decltype(vec)::value;
        for_each_pass(plan, shape, a.dim / V, [&](auto pass, const RowLaunch& L) {
          forward_kernel<scalar_t, decltype(m)::value, decltype(g)::value, V, decltype(pass)::value>
              <<<L.grid, L.block, 0, stream>>>(in, plan, shape, o, arg, pp, pa, L.threads_per_row);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return {out, aux};
}

template <Grad G>
at::Tensor rel_aggregate_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                       const at::Tensor& relation, const at::Tensor& aux,
                                       at::TensorList graph, const std::optional<at::Tensor>& edge_weight,
                                       const std::optional<at::Tensor>& edge_mask,
                                       c10::string_view message, c10::string_view aggregate, bool node_major) {
  const RelAggregateArgs a = check_rel_aggregate_backward_inputs(grad_out, x, relation, aux, graph, edge_weight,
                                                                 edge_mask, message, aggregate, node_major);
  const at::cuda::OptionalCUDAGuard guard(device_of(x));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr Kernel K = kernel_of(G);
  at::Tensor grad = empty_grad(G, x, relation, a);
  // Row kernels for x and the relation table; one warp per edge for the edge weights, so that
  // every edge's entry is written even when B * d == 0.
  const int64_t work = K == Kernel::GradEdgeWeight ? a.num_edges : grad.numel();
  if (work == 0) return grad;
  const bool walks_list = K != Kernel::GradEdgeWeight;
  const WalkOrderArrays walked = walk_order_arrays(K, edge_weight, edge_mask, graph);
  const bool extremum = a.aggregate == Aggregate::Max || a.aggregate == Aggregate::Min;
  const ListPlan plan = list_plan(graph, list_of(K));
  const WorkShape shape = work_shape(K, a.batch, a.per_query);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rel_aggregate_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = make_inputs<scalar_t>(x, relation, aux, graph, walked.weight, walked.mask, a);
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    scalar_t* o = grad.mutable_data_ptr<scalar_t>();
    at::Tensor partial = walks_list ? empty_partials(x, plan, shape, a.dim, c10::CppTypeToScalarType<acc_t>::value)
                                    : at::Tensor();
    acc_t* pp = walks_list ? partial.mutable_data_ptr<acc_t>() : nullptr;
    const bool vectorize =
        can_vectorize(a.dim, kVecWidth<scalar_t>, {in.x, in.relation, g, o, pp, extremum ? in.aux : nullptr});
    dispatch_message_aggregate(a.message, a.aggregate, [&](auto m, auto r) {
      constexpr Message M = decltype(m)::value;
      constexpr Aggregate A = decltype(r)::value;
      if constexpr (K == Kernel::GradEdgeWeight) {
        backward_edge_weight_kernel<scalar_t, M, A><<<grid_for(a.num_edges * kWarpSize), kBlockThreads, 0, stream>>>(
            in, edge_mask ? edge_mask->const_data_ptr<bool>() : nullptr, g, o);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        with_vector_width<scalar_t>(vectorize, [&](auto vec) {
          constexpr int V = decltype(vec)::value;
          for_each_pass(plan, shape, a.dim / V, [&](auto pass, const RowLaunch& L) {
            constexpr Pass P = decltype(pass)::value;
            if constexpr (K == Kernel::GradX) {
              backward_x_kernel<scalar_t, M, A, V, P>
                  <<<L.grid, L.block, 0, stream>>>(in, plan, shape, g, o, pp, L.threads_per_row);
            } else {
              backward_relation_kernel<scalar_t, M, A, V, P>
                  <<<L.grid, L.block, 0, stream>>>(in, plan, shape, g, o, pp, L.threads_per_row);
            }
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(gfmrag_fast, CUDA, m) {
  m.impl("rel_aggregate", &rel_aggregate_cuda);
  m.impl("rel_aggregate_backward_x", &rel_aggregate_backward_cuda<Grad::X>);
  m.impl("rel_aggregate_backward_relation", &rel_aggregate_backward_cuda<Grad::Relation>);
  m.impl("rel_aggregate_backward_edge_weight", &rel_aggregate_backward_cuda<Grad::EdgeWeight>);
}

}  // namespace gfmrag_fast
