// CPU kernels of rel_aggregate (forward and the three gradients).
//
// Every output row is owned by one thread and accumulated in a fixed order, so results are
// deterministic and no locks or atomics are needed: the forward walks the CSR by destination, the
// input gradient the CSC by source (the transposed graph), the relation gradient the edges grouped
// by relation, the edge-weight gradient one edge at a time. Rows are split into chunks of roughly
// equal edge count so hub nodes do not leave one thread with most of the work.
#include "../rel_aggregate.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace gfmrag_fast {
namespace {

// Calls fn(row_begin, row_end) on chunks of [0, num_rows) of roughly equal cost, cost of a row
// being its edge count plus one.
template <typename F>
void parallel_rows_balanced(const int32_t* ptr, int64_t num_rows, const F& fn) {
  if (num_rows == 0) return;
  const int64_t total = static_cast<int64_t>(ptr[num_rows]) + num_rows;
  const int64_t num_chunks =
      std::max<int64_t>(1, std::min<int64_t>(num_rows, at::get_num_threads() * 8));
  std::vector<int64_t> bounds(num_chunks + 1);
  bounds[0] = 0;
  bounds[num_chunks] = num_rows;
  for (int64_t i = 1; i < num_chunks; ++i) {
    const int64_t target = total * i / num_chunks;
    // First row whose cumulative cost ptr[row] + row reaches target.
    int64_t lo = bounds[i - 1], hi = num_rows;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (static_cast<int64_t>(ptr[mid]) + mid < target) lo = mid + 1; else hi = mid;
    }
    bounds[i] = lo;
  }
  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      if (bounds[chunk] < bounds[chunk + 1]) fn(bounds[chunk], bounds[chunk + 1]);
    }
  });
}

template <Aggregate A, typename acc_t>
inline bool wins(acc_t candidate, acc_t best) {
  // NaN wins so that it propagates, as torch's amax/amin do.
  if constexpr (A == Aggregate::Max) return candidate > best || candidate != candidate;
  else return candidate < best || candidate != candidate;
}

template <Message M, typename acc_t>
inline acc_t message_of(acc_t x, acc_t r) {
  if constexpr (M == Message::DistMult) return x * r;
  else return x + r;
}

// Inputs shared by every kernel, as raw pointers.
template <typename scalar_t>
struct Inputs {
  const scalar_t* x;         // [B, N, d]
  const scalar_t* relation;  // [R, d] | [B, R, d]
  const scalar_t* weight;    // [E] or nullptr
  const bool* mask;          // [E] or nullptr
  const int32_t* aux;        // see rel_aggregate.h
  const int32_t* graph[kNumGraphFields];
  RelAggregateArgs a;

  const scalar_t* relation_of(int64_t b) const {
    return relation + (a.per_query ? b * a.num_relations * a.dim : 0);
  }
  bool removed(int32_t e) const { return mask != nullptr && mask[e]; }
  template <typename acc_t>
  acc_t weight_of(int32_t e) const { return weight ? static_cast<acc_t>(weight[e]) : acc_t(1); }
};

template <typename scalar_t>
Inputs<scalar_t> make_inputs(const at::Tensor& x, const at::Tensor& relation, const at::Tensor* aux,
                             at::TensorList graph, const std::optional<at::Tensor>& edge_weight,
                             const std::optional<at::Tensor>& edge_mask, const RelAggregateArgs& a) {
  Inputs<scalar_t> in{};
  in.x = x.data_ptr<scalar_t>();
  in.relation = relation.data_ptr<scalar_t>();
  in.weight = edge_weight ? edge_weight->data_ptr<scalar_t>() : nullptr;
  in.mask = edge_mask ? edge_mask->data_ptr<bool>() : nullptr;
  in.aux = aux ? aux->data_ptr<int32_t>() : nullptr;
  for (int i = 0; i < kNumGraphFields; ++i) in.graph[i] = graph[i].data_ptr<int32_t>();
  in.a = a;
  return in;
}

template <typename scalar_t, Message M, Aggregate A>
void forward_kernel(const Inputs<scalar_t>& in, scalar_t* out, int32_t* arg, int32_t* count) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = in.a.batch, N = in.a.num_nodes, D = in.a.dim;
  const int32_t* ptr = in.graph[kDstPtr];
  const int32_t* src = in.graph[kDstSrc];
  const int32_t* type = in.graph[kDstType];
  const int32_t* eid = in.graph[kDstEid];
  constexpr bool kExtremum = A == Aggregate::Max || A == Aggregate::Min;
  parallel_rows_balanced(ptr, N, [&](int64_t row_begin, int64_t row_end) {
    std::vector<acc_t> acc(D);
    std::vector<int32_t> best(kExtremum ? D : 0);
    for (int64_t v = row_begin; v < row_end; ++v) {
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t* xb = in.x + b * N * D;
        const scalar_t* rb = in.relation_of(b);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        if constexpr (kExtremum) std::fill(best.begin(), best.end(), -1);
        int32_t n = 0;
        for (int32_t k = ptr[v]; k < ptr[v + 1]; ++k) {
          const int32_t e = eid[k];
          if (in.removed(e)) continue;
          ++n;
          const acc_t w = in.template weight_of<acc_t>(e);
          const scalar_t* xs = xb + static_cast<int64_t>(src[k]) * D;
          const scalar_t* rr = rb + static_cast<int64_t>(type[k]) * D;
          for (int64_t c = 0; c < D; ++c) {
            const acc_t m = w * message_of<M>(static_cast<acc_t>(xs[c]), static_cast<acc_t>(rr[c]));
            if constexpr (kExtremum) {
              if (best[c] < 0 || wins<A>(m, acc[c])) {
                acc[c] = m;
                best[c] = e;
              }
            } else {
              acc[c] += m;
            }
          }
        }
        scalar_t* o = out + (b * N + v) * D;
        if constexpr (kExtremum) {
          int32_t* ov = arg + (b * N + v) * D;
          for (int64_t c = 0; c < D; ++c) {
            o[c] = static_cast<scalar_t>(best[c] < 0 ? acc_t(0) : acc[c]);
            ov[c] = best[c];
          }
        } else {
          const acc_t scale = (A == Aggregate::Mean && n > 0) ? acc_t(1) / acc_t(n) : acc_t(1);
          for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(acc[c] * scale);
        }
        if (A == Aggregate::Mean && b == 0) count[v] = n;
      }
    }
  });
}

// d out[b, v, c] / d message[b, e, c] for an unmasked edge e into v, without the selection of
// max/min: 1 for sum and max/min, 1 / in-degree for mean.
template <Aggregate A, typename acc_t>
inline acc_t reduce_scale(const int32_t* aux, int32_t v) {
  if constexpr (A == Aggregate::Mean) return acc_t(1) / static_cast<acc_t>(aux[v]);
  else return acc_t(1);
}

template <typename scalar_t, Message M, Aggregate A>
void backward_x_kernel(const Inputs<scalar_t>& in, const scalar_t* grad_out, scalar_t* grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = in.a.batch, N = in.a.num_nodes, D = in.a.dim;
  const int32_t* ptr = in.graph[kSrcPtr];
  const int32_t* dst = in.graph[kSrcDst];
  const int32_t* type = in.graph[kSrcType];
  const int32_t* eid = in.graph[kSrcEid];
  constexpr bool kExtremum = A == Aggregate::Max || A == Aggregate::Min;
  parallel_rows_balanced(ptr, N, [&](int64_t row_begin, int64_t row_end) {
    std::vector<acc_t> acc(D);
    for (int64_t u = row_begin; u < row_end; ++u) {
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t* rb = in.relation_of(b);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int32_t k = ptr[u]; k < ptr[u + 1]; ++k) {
          const int32_t e = eid[k];
          if (in.removed(e)) continue;
          const int32_t v = dst[k];
          const acc_t scale = in.template weight_of<acc_t>(e) * reduce_scale<A, acc_t>(in.aux, v);
          const scalar_t* g = grad_out + (b * N + v) * D;
          const scalar_t* rr = rb + static_cast<int64_t>(type[k]) * D;
          const int32_t* sel = kExtremum ? in.aux + (b * N + v) * D : nullptr;
          for (int64_t c = 0; c < D; ++c) {
            acc_t t = static_cast<acc_t>(g[c]) * scale;
            if constexpr (M == Message::DistMult) t *= static_cast<acc_t>(rr[c]);
            if constexpr (kExtremum) {
              if (sel[c] == e) acc[c] += t;
            } else {
              acc[c] += t;
            }
          }
        }
        scalar_t* o = grad_x + (b * N + u) * D;
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

template <typename scalar_t, Message M, Aggregate A>
void backward_relation_kernel(const Inputs<scalar_t>& in, const scalar_t* grad_out,
                              scalar_t* grad_relation) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = in.a.batch, N = in.a.num_nodes, D = in.a.dim, R = in.a.num_relations;
  const int32_t* ptr = in.graph[kRelPtr];
  const int32_t* eid = in.graph[kRelEid];
  const int32_t* edge_src = in.graph[kEdgeSrc];
  const int32_t* edge_dst = in.graph[kEdgeDst];
  constexpr bool kExtremum = A == Aggregate::Max || A == Aggregate::Min;
  parallel_rows_balanced(ptr, R, [&](int64_t row_begin, int64_t row_end) {
    std::vector<acc_t> acc(D);
    for (int64_t r = row_begin; r < row_end; ++r) {
      // A shared relation table sums over the batch into one row; per-query tables get one each.
      const int64_t num_out = in.a.per_query ? B : 1;
      for (int64_t ob = 0; ob < num_out; ++ob) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const int64_t b_begin = in.a.per_query ? ob : 0;
        const int64_t b_end = in.a.per_query ? ob + 1 : B;
        for (int32_t k = ptr[r]; k < ptr[r + 1]; ++k) {
          const int32_t e = eid[k];
          if (in.removed(e)) continue;
          const int32_t u = edge_src[e];
          const int32_t v = edge_dst[e];
          const acc_t scale = in.template weight_of<acc_t>(e) * reduce_scale<A, acc_t>(in.aux, v);
          for (int64_t b = b_begin; b < b_end; ++b) {
            const scalar_t* g = grad_out + (b * N + v) * D;
            const scalar_t* xu = in.x + (b * N + u) * D;
            const int32_t* sel = kExtremum ? in.aux + (b * N + v) * D : nullptr;
            for (int64_t c = 0; c < D; ++c) {
              acc_t t = static_cast<acc_t>(g[c]) * scale;
              if constexpr (M == Message::DistMult) t *= static_cast<acc_t>(xu[c]);
              if constexpr (kExtremum) {
                if (sel[c] == e) acc[c] += t;
              } else {
                acc[c] += t;
              }
            }
          }
        }
        scalar_t* o = grad_relation + (ob * R + r) * D;
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

template <typename scalar_t, Message M, Aggregate A>
void backward_edge_weight_kernel(const Inputs<scalar_t>& in, const scalar_t* grad_out,
                                 scalar_t* grad_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = in.a.batch, N = in.a.num_nodes, D = in.a.dim;
  const int32_t* edge_src = in.graph[kEdgeSrc];
  const int32_t* edge_dst = in.graph[kEdgeDst];
  const int32_t* edge_type = in.graph[kEdgeType];
  constexpr bool kExtremum = A == Aggregate::Max || A == Aggregate::Min;
  at::parallel_for(0, in.a.num_edges, 256, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      if (in.removed(static_cast<int32_t>(e))) {
        grad_weight[e] = scalar_t(0);
        continue;
      }
      const int32_t u = edge_src[e];
      const int32_t v = edge_dst[e];
      acc_t total = 0;
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t* g = grad_out + (b * N + v) * D;
        const scalar_t* xu = in.x + (b * N + u) * D;
        const scalar_t* rr = in.relation_of(b) + static_cast<int64_t>(edge_type[e]) * D;
        const int32_t* sel = kExtremum ? in.aux + (b * N + v) * D : nullptr;
        for (int64_t c = 0; c < D; ++c) {
          const acc_t t = static_cast<acc_t>(g[c]) *
                          message_of<M>(static_cast<acc_t>(xu[c]), static_cast<acc_t>(rr[c]));
          if constexpr (kExtremum) {
            if (sel[c] == e) total += t;
          } else {
            total += t;
          }
        }
      }
      grad_weight[e] = static_cast<scalar_t>(total * reduce_scale<A, acc_t>(in.aux, v));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rel_aggregate_cpu(const at::Tensor& x, const at::Tensor& relation,
                                                     at::TensorList graph,
                                                     const std::optional<at::Tensor>& edge_weight,
                                                     const std::optional<at::Tensor>& edge_mask,
                                                     c10::string_view message,
                                                     c10::string_view aggregate) {
  const RelAggregateArgs a =
      check_rel_aggregate_inputs(x, relation, graph, edge_weight, edge_mask, message, aggregate);
  at::Tensor out = at::empty_like(x);
  at::Tensor aux;
  if (a.aggregate == Aggregate::Max || a.aggregate == Aggregate::Min) {
    aux = at::empty(x.sizes(), x.options().dtype(at::kInt));
  } else if (a.aggregate == Aggregate::Mean) {
    aux = at::zeros({a.num_nodes}, x.options().dtype(at::kInt));
  } else {
    aux = at::empty({0}, x.options().dtype(at::kInt));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rel_aggregate_cpu", [&] {
    const auto in = make_inputs<scalar_t>(x, relation, nullptr, graph, edge_weight, edge_mask, a);
    dispatch_message_aggregate(a.message, a.aggregate, [&](auto m, auto g) {
      forward_kernel<scalar_t, decltype(m)::value, decltype(g)::value>(
          in, out.data_ptr<scalar_t>(), aux.data_ptr<int32_t>(), aux.data_ptr<int32_t>());
    });
  });
  return {out, aux};
}

// The three gradients share their checks and dispatch; `which` picks the kernel.
enum class Grad { X, Relation, EdgeWeight };

template <Grad G>
at::Tensor rel_aggregate_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                      const at::Tensor& relation, const at::Tensor& aux,
                                      at::TensorList graph, const std::optional<at::Tensor>& edge_weight,
                                      const std::optional<at::Tensor>& edge_mask,
                                      c10::string_view message, c10::string_view aggregate) {
  const RelAggregateArgs a =
      check_rel_aggregate_inputs(x, relation, graph, edge_weight, edge_mask, message, aggregate);
  check_grad_out(grad_out, x);
  check_aux(aux, a);
  at::Tensor grad;
  if constexpr (G == Grad::X) grad = at::empty_like(x);
  else if constexpr (G == Grad::Relation) grad = at::empty_like(relation);
  else grad = at::empty({a.num_edges}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rel_aggregate_backward_cpu", [&] {
    const auto in = make_inputs<scalar_t>(x, relation, &aux, graph, edge_weight, edge_mask, a);
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    scalar_t* o = grad.data_ptr<scalar_t>();
    dispatch_message_aggregate(a.message, a.aggregate, [&](auto m, auto r) {
      constexpr Message M = decltype(m)::value;
      constexpr Aggregate A = decltype(r)::value;
      if constexpr (G == Grad::X) backward_x_kernel<scalar_t, M, A>(in, g, o);
      else if constexpr (G == Grad::Relation) backward_relation_kernel<scalar_t, M, A>(in, g, o);
      else backward_edge_weight_kernel<scalar_t, M, A>(in, g, o);
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(gfmrag_fast, CPU, m) {
  m.impl("rel_aggregate", &rel_aggregate_cpu);
  m.impl("rel_aggregate_backward_x", &rel_aggregate_backward_cpu<Grad::X>);
  m.impl("rel_aggregate_backward_relation", &rel_aggregate_backward_cpu<Grad::Relation>);
  m.impl("rel_aggregate_backward_edge_weight", &rel_aggregate_backward_cpu<Grad::EdgeWeight>);
}

}  // namespace gfmrag_fast
