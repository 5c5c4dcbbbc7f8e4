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

// Rows of x (or of grad_out) that the edge PREFETCH_DISTANCE positions ahead will read: the
// gathers are random accesses, and asking for them early hides most of their latency.
constexpr int32_t kPrefetchDistance = 4;

template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t dim) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < dim * static_cast<int64_t>(sizeof(scalar_t)); off += 64) {
    __builtin_prefetch(p + off);
  }
}

// acc[c] += w * MSG(x[c], r[c]) for c < dim. Restrict-qualified so the loop vectorises.
template <Message M, typename scalar_t, typename acc_t>
inline void add_messages(acc_t* __restrict__ acc, const scalar_t* __restrict__ x,
                         const scalar_t* __restrict__ r, acc_t w, int64_t dim) {
  for (int64_t c = 0; c < dim; ++c) {
    acc[c] += w * message_of<M>(static_cast<acc_t>(x[c]), static_cast<acc_t>(r[c]));
  }
}

// acc[c] += s * g[c] (* r[c] for distmult): the message's derivative in x, or in r with r := x.
template <Message M, typename scalar_t, typename acc_t>
inline void add_message_grads(acc_t* __restrict__ acc, const scalar_t* __restrict__ g,
                              const scalar_t* __restrict__ r, acc_t s, int64_t dim) {
  for (int64_t c = 0; c < dim; ++c) {
    if constexpr (M == Message::DistMult) {
      acc[c] += s * static_cast<acc_t>(g[c]) * static_cast<acc_t>(r[c]);
    } else {
      acc[c] += s * static_cast<acc_t>(g[c]);
    }
  }
}

// As add_message_grads, only for the channels where edge e won the max/min.
template <Message M, typename scalar_t, typename acc_t>
inline void add_selected_message_grads(acc_t* __restrict__ acc, const scalar_t* __restrict__ g,
                                       const scalar_t* __restrict__ r, const int32_t* __restrict__ sel,
                                       int32_t e, acc_t s, int64_t dim) {
  for (int64_t c = 0; c < dim; ++c) {
    acc_t t = s * static_cast<acc_t>(g[c]);
    if constexpr (M == Message::DistMult) t *= static_cast<acc_t>(r[c]);
    acc[c] += sel[c] == e ? t : acc_t(0);
  }
}

// lane[c] += g[c] * MSG(x[c], r[c]): the edge weight's derivative, channel by channel.
template <Message M, typename scalar_t, typename acc_t>
inline void add_products(acc_t* __restrict__ lane, const scalar_t* __restrict__ g,
                         const scalar_t* __restrict__ x, const scalar_t* __restrict__ r, int64_t dim) {
  for (int64_t c = 0; c < dim; ++c) {
    lane[c] += static_cast<acc_t>(g[c]) * message_of<M>(static_cast<acc_t>(x[c]), static_cast<acc_t>(r[c]));
  }
}

template <Message M, typename scalar_t, typename acc_t>
inline void add_selected_products(acc_t* __restrict__ lane, const scalar_t* __restrict__ g,
                                  const scalar_t* __restrict__ x, const scalar_t* __restrict__ r,
                                  const int32_t* __restrict__ sel, int32_t e, int64_t dim) {
  for (int64_t c = 0; c < dim; ++c) {
    const acc_t t = static_cast<acc_t>(g[c]) * message_of<M>(static_cast<acc_t>(x[c]), static_cast<acc_t>(r[c]));
    lane[c] += sel[c] == e ? t : acc_t(0);
  }
}

// Folds edge e's messages into the running max/min a and its winner bb. The first edge of a row
// always wins, so no sentinel value (which a message could equal) is needed; afterwards the
// update is a branch-free select so the loop vectorises.
template <Aggregate A, Message M, typename scalar_t, typename acc_t>
inline void keep_extremum(acc_t* __restrict__ a, int32_t* __restrict__ bb, const scalar_t* __restrict__ x,
                          const scalar_t* __restrict__ r, acc_t w, int32_t e, bool first, int64_t dim) {
  if (first) {
    for (int64_t c = 0; c < dim; ++c) {
      a[c] = w * message_of<M>(static_cast<acc_t>(x[c]), static_cast<acc_t>(r[c]));
      bb[c] = e;
    }
    return;
  }
  for (int64_t c = 0; c < dim; ++c) {
    const acc_t m = w * message_of<M>(static_cast<acc_t>(x[c]), static_cast<acc_t>(r[c]));
    const bool take = wins<A>(m, a[c]);
    a[c] = take ? m : a[c];
    bb[c] = take ? e : bb[c];
  }
}

template <typename scalar_t, Message M, Aggregate A>
void forward_kernel(const Inputs<scalar_t>& in, scalar_t* out, int32_t* arg, int32_t* count) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = in.a.batch, N = in.a.num_nodes, D = in.a.dim, E = in.a.num_edges;
  const int32_t* ptr = in.graph[kDstPtr];
  const int32_t* src = in.graph[kDstSrc];
  const int32_t* type = in.graph[kDstType];
  const int32_t* eid = in.graph[kDstEid];
  constexpr bool kExtremum = A == Aggregate::Max || A == Aggregate::Min;
  parallel_rows_balanced(ptr, N, [&](int64_t row_begin, int64_t row_end) {
    // One accumulator row per query: every edge's relation row is read once for the batch.
    std::vector<acc_t> acc(B * D);
    std::vector<int32_t> best(kExtremum ? B * D : 0);
    for (int64_t v = row_begin; v < row_end; ++v) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      if constexpr (kExtremum) std::fill(best.begin(), best.end(), -1);
      int32_t n = 0;
      for (int32_t k = ptr[v]; k < ptr[v + 1]; ++k) {
        if (k + kPrefetchDistance < E) {
          const int64_t ahead = static_cast<int64_t>(src[k + kPrefetchDistance]) * D;
          for (int64_t b = 0; b < B; ++b) prefetch_row(in.x + b * N * D + ahead, D);
        }
        const int32_t e = eid[k];
        if (in.removed(e)) continue;
        ++n;
        const acc_t w = in.template weight_of<acc_t>(e);
        const int64_t src_offset = static_cast<int64_t>(src[k]) * D;
        const int64_t type_offset = static_cast<int64_t>(type[k]) * D;
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t* xs = in.x + b * N * D + src_offset;
          const scalar_t* rr = in.relation_of(b) + type_offset;
          acc_t* a = acc.data() + b * D;
          if constexpr (kExtremum) {
            keep_extremum<A, M>(a, best.data() + b * D, xs, rr, w, e, /*first=*/n == 1, D);
          } else {
            add_messages<M>(a, xs, rr, w, D);
          }
        }
      }
      for (int64_t b = 0; b < B; ++b) {
        scalar_t* o = out + (b * N + v) * D;
        const acc_t* a = acc.data() + b * D;
        if constexpr (kExtremum) {
          const int32_t* bb = best.data() + b * D;
          int32_t* ov = arg + (b * N + v) * D;
          for (int64_t c = 0; c < D; ++c) {
            o[c] = static_cast<scalar_t>(bb[c] < 0 ? acc_t(0) : a[c]);
            ov[c] = bb[c];
          }
        } else {
          const acc_t scale = (A == Aggregate::Mean && n > 0) ? acc_t(1) / acc_t(n) : acc_t(1);
          for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(a[c] * scale);
        }
      }
      if constexpr (A == Aggregate::Mean) count[v] = n;
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
  const int64_t B = in.a.batch, N = in.a.num_nodes, D = in.a.dim, E = in.a.num_edges;
  const int32_t* ptr = in.graph[kSrcPtr];
  const int32_t* dst = in.graph[kSrcDst];
  const int32_t* type = in.graph[kSrcType];
  const int32_t* eid = in.graph[kSrcEid];
  constexpr bool kExtremum = A == Aggregate::Max || A == Aggregate::Min;
  parallel_rows_balanced(ptr, N, [&](int64_t row_begin, int64_t row_end) {
    std::vector<acc_t> acc(B * D);
    for (int64_t u = row_begin; u < row_end; ++u) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int32_t k = ptr[u]; k < ptr[u + 1]; ++k) {
        if (k + kPrefetchDistance < E) {
          const int64_t ahead = static_cast<int64_t>(dst[k + kPrefetchDistance]) * D;
          for (int64_t b = 0; b < B; ++b) prefetch_row(grad_out + b * N * D + ahead, D);
        }
        const int32_t e = eid[k];
        if (in.removed(e)) continue;
        const int32_t v = dst[k];
        const acc_t scale = in.template weight_of<acc_t>(e) * reduce_scale<A, acc_t>(in.aux, v);
        const int64_t type_offset = static_cast<int64_t>(type[k]) * D;
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t* g = grad_out + (b * N + v) * D;
          const scalar_t* rr = in.relation_of(b) + type_offset;
          if constexpr (kExtremum) {
            add_selected_message_grads<M>(acc.data() + b * D, g, rr, in.aux + (b * N + v) * D, e, scale, D);
          } else {
            add_message_grads<M>(acc.data() + b * D, g, rr, scale, D);
          }
        }
      }
      for (int64_t b = 0; b < B; ++b) {
        scalar_t* o = grad_x + (b * N + u) * D;
        const acc_t* a = acc.data() + b * D;
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(a[c]);
      }
    }
  });
}

template <typename scalar_t, Message M, Aggregate A>
void backward_relation_kernel(const Inputs<scalar_t>& in, const scalar_t* grad_out,
                              scalar_t* grad_relation) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = in.a.batch, N = in.a.num_nodes, D = in.a.dim, R = in.a.num_relations;
  const int64_t E = in.a.num_edges;
  const int32_t* ptr = in.graph[kRelPtr];
  const int32_t* eid = in.graph[kRelEid];
  const int32_t* edge_src = in.graph[kEdgeSrc];
  const int32_t* edge_dst = in.graph[kEdgeDst];
  constexpr bool kExtremum = A == Aggregate::Max || A == Aggregate::Min;
  // A shared relation table sums over the batch into one row; per-query tables get one each.
  const int64_t num_out = in.a.per_query ? B : 1;
  parallel_rows_balanced(ptr, R, [&](int64_t row_begin, int64_t row_end) {
    std::vector<acc_t> acc(num_out * D);
    for (int64_t r = row_begin; r < row_end; ++r) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int32_t k = ptr[r]; k < ptr[r + 1]; ++k) {
        if (k + kPrefetchDistance < E) {
          const int32_t ahead = eid[k + kPrefetchDistance];
          const int64_t u_ahead = static_cast<int64_t>(edge_src[ahead]) * D;
          const int64_t v_ahead = static_cast<int64_t>(edge_dst[ahead]) * D;
          for (int64_t b = 0; b < B; ++b) {
            prefetch_row(grad_out + b * N * D + v_ahead, D);
            if constexpr (M == Message::DistMult) prefetch_row(in.x + b * N * D + u_ahead, D);
          }
        }
        const int32_t e = eid[k];
        if (in.removed(e)) continue;
        const int32_t u = edge_src[e];
        const int32_t v = edge_dst[e];
        const acc_t scale = in.template weight_of<acc_t>(e) * reduce_scale<A, acc_t>(in.aux, v);
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t* g = grad_out + (b * N + v) * D;
          const scalar_t* xu = in.x + (b * N + u) * D;
          acc_t* a = acc.data() + (in.a.per_query ? b * D : 0);
          if constexpr (kExtremum) {
            add_selected_message_grads<M>(a, g, xu, in.aux + (b * N + v) * D, e, scale, D);
          } else {
            add_message_grads<M>(a, g, xu, scale, D);
          }
        }
      }
      for (int64_t ob = 0; ob < num_out; ++ob) {
        scalar_t* o = grad_relation + (ob * R + r) * D;
        const acc_t* a = acc.data() + ob * D;
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(a[c]);
      }
    }
  });
}

template <typename scalar_t, Message M, Aggregate A>
void backward_edge_weight_kernel(const Inputs<scalar_t>& in, const scalar_t* grad_out,
                                 scalar_t* grad_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = in.a.batch, N = in.a.num_nodes, D = in.a.dim, E = in.a.num_edges;
  const int32_t* edge_src = in.graph[kEdgeSrc];
  const int32_t* edge_dst = in.graph[kEdgeDst];
  const int32_t* edge_type = in.graph[kEdgeType];
  constexpr bool kExtremum = A == Aggregate::Max || A == Aggregate::Min;
  at::parallel_for(0, E, 256, [&](int64_t begin, int64_t end) {
    // Per-channel partial sums, reduced at the end of each edge: a vectorisable loop with a fixed
    // summation order.
    std::vector<acc_t> lane(D);
    for (int64_t e = begin; e < end; ++e) {
      if (e + kPrefetchDistance < E) {
        const int64_t u_ahead = static_cast<int64_t>(edge_src[e + kPrefetchDistance]) * D;
        const int64_t v_ahead = static_cast<int64_t>(edge_dst[e + kPrefetchDistance]) * D;
        for (int64_t b = 0; b < B; ++b) {
          prefetch_row(grad_out + b * N * D + v_ahead, D);
          prefetch_row(in.x + b * N * D + u_ahead, D);
        }
      }
      if (in.removed(static_cast<int32_t>(e))) {
        grad_weight[e] = scalar_t(0);
        continue;
      }
      const int32_t u = edge_src[e];
      const int32_t v = edge_dst[e];
      std::fill(lane.begin(), lane.end(), acc_t(0));
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t* g = grad_out + (b * N + v) * D;
        const scalar_t* xu = in.x + (b * N + u) * D;
        const scalar_t* rr = in.relation_of(b) + static_cast<int64_t>(edge_type[e]) * D;
        if constexpr (kExtremum) {
          add_selected_products<M>(lane.data(), g, xu, rr, in.aux + (b * N + v) * D, static_cast<int32_t>(e), D);
        } else {
          add_products<M>(lane.data(), g, xu, rr, D);
        }
      }
      acc_t total = 0;
      for (int64_t c = 0; c < D; ++c) total += lane[c];
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
  at::Tensor aux = empty_aux(x, a);  // the forward writes every row of it
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rel_aggregate_cpu", [&] {
    const auto in = make_inputs<scalar_t>(x, relation, nullptr, graph, edge_weight, edge_mask, a);
    dispatch_message_aggregate(a.message, a.aggregate, [&](auto m, auto g) {
      forward_kernel<scalar_t, decltype(m)::value, decltype(g)::value>(
          in, out.data_ptr<scalar_t>(), aux.data_ptr<int32_t>(), aux.data_ptr<int32_t>());
    });
  });
  return {out, aux};
}

// The three gradients share their checks and dispatch; G picks the kernel.
template <Grad G>
at::Tensor rel_aggregate_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                      const at::Tensor& relation, const at::Tensor& aux,
                                      at::TensorList graph, const std::optional<at::Tensor>& edge_weight,
                                      const std::optional<at::Tensor>& edge_mask,
                                      c10::string_view message, c10::string_view aggregate) {
  const RelAggregateArgs a = check_rel_aggregate_backward_inputs(grad_out, x, relation, aux, graph, edge_weight,
                                                                 edge_mask, message, aggregate);
  at::Tensor grad = empty_grad(G, x, relation, a);
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
