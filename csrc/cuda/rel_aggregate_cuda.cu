// CUDA kernels of rel_aggregate (forward and the three gradients).
//
// Same ownership scheme as the CPU kernels: every output element is owned by one thread (or, for
// the edge-weight gradient, one warp) that accumulates in a fixed order, so results are
// deterministic with no atomics. The forward walks the CSR by destination, the input gradient the
// CSC by source, the relation gradient the edges grouped by relation.
//
// Row kernels (forward, input and relation gradients): a fixed group of threads owns one output
// row (one node of one batch element, or one relation) and splits its channels, VEC at a time
// with 16-byte loads and stores where the row width and every base pointer allow it. All threads
// of a group walk the same edge list, so the graph arrays are broadcast loads, and each thread
// keeps one accumulator per channel it owns: the per-channel order of operations is the same as
// with one thread per element, so the vector width changes no result. Rows are numbered node
// major (row = node * B + b): the B rows of one node run side by side and share its edge list and,
// for a shared table, the relation rows it gathers, which then come from L2.
//
// Sums use __fadd_rn / __dadd_rn so nvcc cannot contract `acc += a * b` into an FMA: the forward,
// input and relation gradients then round like the CPU kernels, operation for operation. Only the
// edge-weight gradient differs from the CPU in summation order (a warp tree instead of a loop).
#include "../rel_aggregate.h"

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

__device__ __forceinline__ int64_t thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <Aggregate A, typename acc_t>
__device__ __forceinline__ bool wins(acc_t candidate, acc_t best) {
  // NaN wins so that it propagates, as torch's amax/amin do.
  if constexpr (A == Aggregate::Max) return candidate > best || candidate != candidate;
  else return candidate < best || candidate != candidate;
}

template <Message M, typename acc_t>
__device__ __forceinline__ acc_t message_of(acc_t x, acc_t r) {
  if constexpr (M == Message::DistMult) return x * r;
  else return x + r;
}

// d out[b, v, c] / d message[b, e, c] for an unmasked edge e into v, without the selection of
// max/min: 1 for sum and max/min, 1 / in-degree for mean.
// acc[j] += s * g[j] (* other[j] for distmult): a message's derivative in x (other = the relation
// row) or in the relation (other = the x row), only where edge e won for max/min.
template <Message M, bool kExtremum, typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void add_message_grads(acc_t (&acc)[V], const Pack<scalar_t, V>& g,
                                                  const Pack<scalar_t, V>& other, const Pack<int32_t, V>& sel,
                                                  int32_t e, acc_t s) {
#pragma unroll
  for (int j = 0; j < V; ++j) {
    acc_t t = static_cast<acc_t>(g.v[j]) * s;
    if constexpr (M == Message::DistMult) t *= static_cast<acc_t>(other.v[j]);
    if constexpr (kExtremum) {
      if (sel.v[j] == e) acc[j] = add_rn(acc[j], t);
    } else {
      acc[j] = add_rn(acc[j], t);
    }
  }
}

template <Aggregate A, typename acc_t>
__device__ __forceinline__ acc_t reduce_scale(const int32_t* aux, int32_t v) {
  if constexpr (A == Aggregate::Mean) return acc_t(1) / static_cast<acc_t>(aux[v]);
  else return acc_t(1);
}

// Inputs shared by every kernel, as raw device pointers; passed to kernels by value.
template <typename scalar_t>
struct Inputs {
  const scalar_t* x;         // [B, N, d]
  const scalar_t* relation;  // [R, d] | [B, R, d]
  const scalar_t* weight;    // [E] or nullptr
  const bool* mask;          // [E] or nullptr
  const int32_t* aux;        // see rel_aggregate.h; nullptr in the forward
  const int32_t* graph[kNumGraphFields];
  int64_t batch, num_nodes, dim, num_relations, num_edges;
  bool per_query;

  __device__ const scalar_t* relation_of(int64_t b) const {
    return relation + (per_query ? b * num_relations * dim : 0);
  }
  __device__ bool removed(int32_t e) const { return mask != nullptr && mask[e]; }
  template <typename acc_t>
  __device__ acc_t weight_of(int32_t e) const {
    return weight ? static_cast<acc_t>(weight[e]) : acc_t(1);
  }
};

template <typename scalar_t>
Inputs<scalar_t> make_inputs(const at::Tensor& x, const at::Tensor& relation, const at::Tensor* aux,
                             at::TensorList graph, const std::optional<at::Tensor>& edge_weight,
                             const std::optional<at::Tensor>& edge_mask, const RelAggregateArgs& a) {
  Inputs<scalar_t> in{};
  in.x = x.const_data_ptr<scalar_t>();
  in.relation = relation.const_data_ptr<scalar_t>();
  in.weight = edge_weight ? edge_weight->const_data_ptr<scalar_t>() : nullptr;
  in.mask = edge_mask ? edge_mask->const_data_ptr<bool>() : nullptr;
  in.aux = aux ? aux->const_data_ptr<int32_t>() : nullptr;
  for (int i = 0; i < kNumGraphFields; ++i) in.graph[i] = graph[i].const_data_ptr<int32_t>();
  in.batch = a.batch;
  in.num_nodes = a.num_nodes;
  in.dim = a.dim;
  in.num_relations = a.num_relations;
  in.num_edges = a.num_edges;
  in.per_query = a.per_query;
  return in;
}

// count[v] = number of unmasked in-edges of v: the mean's aux.
__global__ void in_degree_kernel(const int32_t* ptr, const int32_t* eid, const bool* mask,
                                 int64_t num_nodes, int32_t* count) {
  const int64_t v = thread_index();
  if (v >= num_nodes) return;
  int32_t n = 0;
  for (int32_t k = ptr[v]; k < ptr[v + 1]; ++k) {
    if (mask == nullptr || !mask[eid[k]]) ++n;
  }
  count[v] = n;
}

// One row per (v, b); `arg` is the max/min aux [B, N, d], untouched otherwise.
template <typename scalar_t, Message M, Aggregate A, int V>
__global__ void forward_kernel(const Inputs<scalar_t> in, scalar_t* out, int32_t* arg, int threads_per_row) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kExtremum = A == Aggregate::Max || A == Aggregate::Min;
  const int64_t N = in.num_nodes, D = in.dim, B = in.batch;
  const int32_t* ptr = in.graph[kDstPtr];
  const int32_t* src = in.graph[kDstSrc];
  const int32_t* type = in.graph[kDstType];
  const int32_t* eid = in.graph[kDstEid];
  for_each_row_vector<V>(B * N, D, threads_per_row, [&](int64_t row, int64_t c) {
    const int64_t v = row / B, b = row - v * B;
    const scalar_t* xb = in.x + b * N * D + c;
    const scalar_t* rb = in.relation_of(b) + c;
    acc_t acc[V];
    int32_t best[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      acc[j] = 0;
      best[j] = -1;
    }
    int32_t n = 0;
    const int32_t end = ptr[v + 1];
    for (int32_t k = ptr[v]; k < end; ++k) {
      const int32_t e = eid[k];
      if (in.removed(e)) continue;
      ++n;
      const acc_t w = in.template weight_of<acc_t>(e);
      const Pack<scalar_t, V> xs = load_pack<V>(xb + static_cast<int64_t>(src[k]) * D);
      const Pack<scalar_t, V> rs = load_pack<V>(rb + static_cast<int64_t>(type[k]) * D);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const acc_t m = w * message_of<M>(static_cast<acc_t>(xs.v[j]), static_cast<acc_t>(rs.v[j]));
        if constexpr (kExtremum) {
          if (best[j] < 0 || wins<A>(m, acc[j])) {
            acc[j] = m;
            best[j] = e;
          }
        } else {
          acc[j] = add_rn(acc[j], m);
        }
      }
    }
    const int64_t o = (b * N + v) * D + c;
    Pack<scalar_t, V> res;
    if constexpr (kExtremum) {
      Pack<int32_t, V> won;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        res.v[j] = static_cast<scalar_t>(best[j] < 0 ? acc_t(0) : acc[j]);
        won.v[j] = best[j];
      }
      store_pack<V>(arg + o, won);
    } else {
      const acc_t scale = (A == Aggregate::Mean && n > 0) ? acc_t(1) / acc_t(n) : acc_t(1);
#pragma unroll
      for (int j = 0; j < V; ++j) res.v[j] = static_cast<scalar_t>(acc[j] * scale);
    }
    store_pack<V>(out + o, res);
  });
}

// One row per (u, b), walking the out-edges of u.
template <typename scalar_t, Message M, Aggregate A, int V>
__global__ void backward_x_kernel(const Inputs<scalar_t> in, const scalar_t* grad_out, scalar_t* grad_x,
                                  int threads_per_row) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kExtremum = A == Aggregate::Max || A == Aggregate::Min;
  const int64_t N = in.num_nodes, D = in.dim, B = in.batch;
  const int32_t* ptr = in.graph[kSrcPtr];
  const int32_t* dst = in.graph[kSrcDst];
  const int32_t* type = in.graph[kSrcType];
  const int32_t* eid = in.graph[kSrcEid];
  for_each_row_vector<V>(B * N, D, threads_per_row, [&](int64_t row, int64_t c) {
    const int64_t u = row / B, b = row - u * B;
    const scalar_t* rb = in.relation_of(b) + c;
    const scalar_t* gb = grad_out + b * N * D + c;             // grad_out and the max/min aux
    const int32_t* sb = kExtremum ? in.aux + b * N * D + c : nullptr;
    acc_t acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0;
    const int32_t end = ptr[u + 1];
    for (int32_t k = ptr[u]; k < end; ++k) {
      const int32_t e = eid[k];
      if (in.removed(e)) continue;
      const int32_t v = dst[k];
      const acc_t scale = in.template weight_of<acc_t>(e) * reduce_scale<A, acc_t>(in.aux, v);
      const Pack<scalar_t, V> gs = load_pack<V>(gb + static_cast<int64_t>(v) * D);
      Pack<scalar_t, V> rs;
      if constexpr (M == Message::DistMult) rs = load_pack<V>(rb + static_cast<int64_t>(type[k]) * D);
      Pack<int32_t, V> sel;
      if constexpr (kExtremum) sel = load_pack<V>(sb + static_cast<int64_t>(v) * D);
      add_message_grads<M, kExtremum>(acc, gs, rs, sel, e, scale);
    }
    Pack<scalar_t, V> res;
#pragma unroll
    for (int j = 0; j < V; ++j) res.v[j] = static_cast<scalar_t>(acc[j]);
    store_pack<V>(grad_x + (b * N + u) * D + c, res);
  });
}

// One row per relation r of a shared table, summing over the batch inside the edge loop as the
// CPU kernel does; one per (r, b) of a per-query table.
template <typename scalar_t, Message M, Aggregate A, int V>
__global__ void backward_relation_kernel(const Inputs<scalar_t> in, const scalar_t* grad_out,
                                         scalar_t* grad_relation, int threads_per_row) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kExtremum = A == Aggregate::Max || A == Aggregate::Min;
  const int64_t N = in.num_nodes, D = in.dim, R = in.num_relations;
  const int64_t num_out = in.per_query ? in.batch : 1;
  const int32_t* ptr = in.graph[kRelPtr];
  const int32_t* eid = in.graph[kRelEid];
  const int32_t* edge_src = in.graph[kEdgeSrc];
  const int32_t* edge_dst = in.graph[kEdgeDst];
  for_each_row_vector<V>(num_out * R, D, threads_per_row, [&](int64_t row, int64_t c) {
    const int64_t r = row / num_out, ob = row - r * num_out;
    const int64_t b_begin = in.per_query ? ob : 0;
    const int64_t b_end = in.per_query ? ob + 1 : in.batch;
    acc_t acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0;
    const int32_t end = ptr[r + 1];
    for (int32_t k = ptr[r]; k < end; ++k) {
      const int32_t e = eid[k];
      if (in.removed(e)) continue;
      const int32_t u = edge_src[e];
      const int32_t v = edge_dst[e];
      const acc_t scale = in.template weight_of<acc_t>(e) * reduce_scale<A, acc_t>(in.aux, v);
      for (int64_t b = b_begin; b < b_end; ++b) {
        const int64_t o = (b * N + v) * D + c;  // grad_out and the max/min aux
        const Pack<scalar_t, V> gs = load_pack<V>(grad_out + o);
        Pack<scalar_t, V> xs;
        if constexpr (M == Message::DistMult) xs = load_pack<V>(in.x + (b * N + u) * D + c);
        Pack<int32_t, V> sel;
        if constexpr (kExtremum) sel = load_pack<V>(in.aux + o);
        add_message_grads<M, kExtremum>(acc, gs, xs, sel, e, scale);
      }
    }
    Pack<scalar_t, V> res;
#pragma unroll
    for (int j = 0; j < V; ++j) res.v[j] = static_cast<scalar_t>(acc[j]);
    store_pack<V>(grad_relation + (ob * R + r) * D + c, res);
  });
}

// One warp per edge: lanes stride over the channels of every batch row, then a fixed-shape
// shuffle tree combines them, so the sum order never depends on scheduling.
template <typename scalar_t, Message M, Aggregate A>
__global__ void backward_edge_weight_kernel(const Inputs<scalar_t> in, const scalar_t* grad_out,
                                            scalar_t* grad_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kExtremum = A == Aggregate::Max || A == Aggregate::Min;
  const int64_t N = in.num_nodes, D = in.dim;
  const int64_t warp = thread_index() / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  // The edge is uniform across the warp, so whole warps leave together and the full-mask
  // shuffles below see all 32 lanes.
  if (warp >= in.num_edges) return;
  const int32_t e = static_cast<int32_t>(warp);
  if (in.removed(e)) {
    if (lane == 0) grad_weight[e] = scalar_t(0);
    return;
  }
  const int32_t u = in.graph[kEdgeSrc][e];
  const int32_t v = in.graph[kEdgeDst][e];
  const int64_t type = in.graph[kEdgeType][e];

  acc_t total = 0;
  for (int64_t b = 0; b < in.batch; ++b) {
    const scalar_t* g = grad_out + (b * N + v) * D;
    const scalar_t* xu = in.x + (b * N + u) * D;
    const scalar_t* rr = in.relation_of(b) + type * D;
    const int32_t* sel = kExtremum ? in.aux + (b * N + v) * D : nullptr;
    for (int64_t c = lane; c < D; c += kWarpSize) {
      const acc_t t = static_cast<acc_t>(g[c]) *
                      message_of<M>(static_cast<acc_t>(xu[c]), static_cast<acc_t>(rr[c]));
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

std::tuple<at::Tensor, at::Tensor> rel_aggregate_cuda(const at::Tensor& x, const at::Tensor& relation,
                                                      at::TensorList graph,
                                                      const std::optional<at::Tensor>& edge_weight,
                                                      const std::optional<at::Tensor>& edge_mask,
                                                      c10::string_view message,
                                                      c10::string_view aggregate) {
  const RelAggregateArgs a =
      check_rel_aggregate_inputs(x, relation, graph, edge_weight, edge_mask, message, aggregate);
  const at::cuda::OptionalCUDAGuard guard(device_of(x));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty_like(x);
  at::Tensor aux = empty_aux(x, a);
  if (a.aggregate == Aggregate::Mean) {
    // Its own kernel, so the degrees are written even when B * d == 0 and no forward thread runs.
    if (a.num_nodes > 0) {
      in_degree_kernel<<<grid_for(a.num_nodes), kBlockThreads, 0, stream>>>(
          graph[kDstPtr].const_data_ptr<int32_t>(), graph[kDstEid].const_data_ptr<int32_t>(),
          edge_mask ? edge_mask->const_data_ptr<bool>() : nullptr, a.num_nodes,
          aux.mutable_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (x.numel() == 0) return {out, aux};
  int32_t* arg =
      (a.aggregate == Aggregate::Max || a.aggregate == Aggregate::Min) ? aux.mutable_data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rel_aggregate_cuda", [&] {
    const auto in = make_inputs<scalar_t>(x, relation, nullptr, graph, edge_weight, edge_mask, a);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const bool vectorize = can_vectorize(a.dim, kVecWidth<scalar_t>, {in.x, in.relation, o, arg});
    dispatch_message_aggregate(a.message, a.aggregate, [&](auto m, auto g) {
      with_vector_width<scalar_t>(vectorize, [&](auto vec) {
        constexpr int V = decltype(vec)::value;
        const RowLaunch L = row_launch(a.batch * a.num_nodes, a.dim / V);
        forward_kernel<scalar_t, decltype(m)::value, decltype(g)::value, V>
            <<<L.grid, L.block, 0, stream>>>(in, o, arg, L.threads_per_row);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
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
                                       c10::string_view message, c10::string_view aggregate) {
  const RelAggregateArgs a = check_rel_aggregate_backward_inputs(grad_out, x, relation, aux, graph, edge_weight,
                                                                 edge_mask, message, aggregate);
  const at::cuda::OptionalCUDAGuard guard(device_of(x));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor grad = empty_grad(G, x, relation, a);
  // Row kernels for x and the relation table; one warp per edge for the edge weights, so that
  // every edge's entry is written even when B * d == 0.
  const int64_t work = G == Grad::EdgeWeight ? a.num_edges : grad.numel();
  if (work == 0) return grad;
  const bool extremum = a.aggregate == Aggregate::Max || a.aggregate == Aggregate::Min;
  // Rows of the gradient: (u, b) for x; r, or (r, b) for a per-query table.
  const int64_t rows = G == Grad::X ? a.batch * a.num_nodes : (a.per_query ? a.batch : 1) * a.num_relations;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rel_aggregate_backward_cuda", [&] {
    const auto in = make_inputs<scalar_t>(x, relation, &aux, graph, edge_weight, edge_mask, a);
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    scalar_t* o = grad.mutable_data_ptr<scalar_t>();
    const bool vectorize =
        can_vectorize(a.dim, kVecWidth<scalar_t>, {in.x, in.relation, g, o, extremum ? in.aux : nullptr});
    dispatch_message_aggregate(a.message, a.aggregate, [&](auto m, auto r) {
      constexpr Message M = decltype(m)::value;
      constexpr Aggregate A = decltype(r)::value;
      if constexpr (G == Grad::EdgeWeight) {
        backward_edge_weight_kernel<scalar_t, M, A>
            <<<grid_for(a.num_edges * kWarpSize), kBlockThreads, 0, stream>>>(in, g, o);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        with_vector_width<scalar_t>(vectorize, [&](auto vec) {
          constexpr int V = decltype(vec)::value;
          const RowLaunch L = row_launch(rows, a.dim / V);
          if constexpr (G == Grad::X) {
            backward_x_kernel<scalar_t, M, A, V><<<L.grid, L.block, 0, stream>>>(in, g, o, L.threads_per_row);
          } else {
            backward_relation_kernel<scalar_t, M, A, V>
                <<<L.grid, L.block, 0, stream>>>(in, g, o, L.threads_per_row);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
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
