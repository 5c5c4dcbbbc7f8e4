// CPU kernels of rel_aggregate (forward and the three gradients).
//
// They follow the graph's work plan as the CUDA kernels do (rel_aggregate_kernels.h): the forward
// walks the CSR by destination, the input gradient the CSC by source (the transposed graph), the
// relation gradient the edges grouped by relation; a row of one of these lists is walked whole,
// unless the plan cut it into pieces, which are walked first, each into a partial, and folded in
// piece order by their row. The per-channel operations and their order are those of the CUDA
// kernels, so the two agree bit for bit. Every output row and every partial has one writer, so
// no locks or atomics are needed and results do not depend on the number of threads. One walk
// serves the whole batch: a node's edge list and the relation rows it reads are loaded once for
// the B queries. The edge-weight gradient takes one edge at a time. The joint backward
// (backward_x_relation_kernel) computes the input and relation gradients in one walk by source
// for training; its relation sums take another order (see there).
#include "../output_buffers.h"
#include "../rel_aggregate_kernels.h"
#include "cpu_clones.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/add.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

namespace gfmrag_fast {
namespace {

// Calls fn(chunk) for every chunk in [0, num_chunks), chunks handed out one at a time to whichever
// thread is free: a thread that the OS deschedules (2 cores shared with other work) delays the
// others by one chunk at most, not by its whole static share.
template <typename F>
void parallel_chunks(int64_t num_chunks, const F& fn) {
  if (num_chunks == 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(num_chunks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t chunk = next++; chunk < num_chunks; chunk = next++) fn(chunk);
  });
}

// Calls fn(row_begin, row_end) on chunks of [0, num_rows) of roughly equal cost, cost of a row
// being its edge count plus one.
template <typename F>
void parallel_rows_balanced(const int32_t* ptr, int64_t num_rows, const F& fn) {
  if (num_rows == 0) return;
  const int64_t total = static_cast<int64_t>(ptr[num_rows]) + num_rows;
  const int64_t num_chunks = std::max<int64_t>(1, std::min<int64_t>(num_rows, at::get_num_threads() * 32));
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
  parallel_chunks(num_chunks, [&](int64_t chunk) {
    if (bounds[chunk] < bounds[chunk + 1]) fn(bounds[chunk], bounds[chunk + 1]);
  });
}

// Runs a kernel over a plan: piece(p, acc, best) for every piece, then row(r, acc, best) for every
// row, with scratch of `width` accumulators (and max/min winners when `with_best`).
template <typename acc_t, typename Piece, typename Row>
void run_plan(const ListPlan& plan, int64_t width, bool with_best, const Piece& piece, const Row& row) {
  constexpr int64_t kPiecesPerChunk = 16;
  parallel_chunks((plan.pieces + kPiecesPerChunk - 1) / kPiecesPerChunk, [&](int64_t chunk) {
    std::vector<acc_t> acc(width);
    std::vector<int32_t> best(with_best ? width : 0);
    for (int64_t p = chunk * kPiecesPerChunk; p < std::min(plan.pieces, (chunk + 1) * kPiecesPerChunk); ++p) {
      piece(p, acc.data(), best.data());
    }
  });
  parallel_rows_balanced(plan.ptr, plan.rows, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(width);
    std::vector<int32_t> best(with_best ? width : 0);
    for (int64_t r = begin; r < end; ++r) row(r, acc.data(), best.data());
  });
}

// Inputs shared by every kernel, as raw pointers. Tensors shaped like x are addressed through
// at(b, v), which knows the layout.
template <typename scalar_t>
struct Inputs {
  const scalar_t* x;         // [B, N, d] | [N, B, d]
  const scalar_t* relation;  // [R, d] | [B, R, d]
  const scalar_t* weight;    // [E] in the walk order of the kernel's edge list, or nullptr
  const bool* mask;          // [E] the same, or nullptr
  const int32_t* aux;        // see rel_aggregate.h
  const int32_t* graph[kNumGraphFields];
  RelAggregateArgs a;

  int64_t at(int64_t b, int64_t v) const { return b * a.batch_stride + v * a.node_stride; }
  const scalar_t* relation_of(int64_t b) const {
    return relation + (a.per_query ? b * a.num_relations * a.dim : 0);
  }

  // Edge k of a list: node and other from the list's arrays (WalkedEdge), eid for max/min.
  template <typename acc_t, bool kWithEid>
  WalkedEdge<acc_t> edge(int32_t k, const int32_t* node, const int32_t* other, const int32_t* eid) const {
    return {node[k], other[k], kWithEid ? eid[k] : 0, weight ? static_cast<acc_t>(weight[k]) : acc_t(1),
            mask != nullptr && mask[k]};
  }
};

template <typename scalar_t>
Inputs<scalar_t> make_inputs(const at::Tensor& x, const at::Tensor& relation, const at::Tensor* aux,
                             at::TensorList graph, const at::Tensor& weight, const at::Tensor& mask,
                             const RelAggregateArgs& a) {
  Inputs<scalar_t> in{};
  in.x = x.const_data_ptr<scalar_t>();
  in.relation = relation.const_data_ptr<scalar_t>();
  in.weight = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
  in.mask = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  in.aux = aux ? aux->const_data_ptr<int32_t>() : nullptr;
  for (int i = 0; i < kNumGraphFields; ++i) in.graph[i] = graph[i].const_data_ptr<int32_t>();
  in.a = a;
  return in;
}

// The B rows (b, v) of an x-shaped tensor, requested from memory ahead of their use: gathers are
// random accesses, and asking early hides most of their latency. Always inlined: GCC 12 takes a
// function that only prefetches for one without side effects and deletes its calls.
template <typename scalar_t>
C10_ALWAYS_INLINE void prefetch_rows(const Inputs<scalar_t>& in, const scalar_t* base, int32_t v) {
  const int64_t row_bytes = in.a.dim * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t rows = in.a.node_major ? 1 : in.a.batch;  // node major: one block of B rows
  const int64_t bytes = in.a.node_major ? row_bytes * in.a.batch : row_bytes;
  for (int64_t b = 0; b < rows; ++b) {
    const char* p = reinterpret_cast<const char*>(base + in.at(b, v));
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
  }
}

constexpr bool is_extremum(Aggregate A) { return A == Aggregate::Max || A == Aggregate::Min; }

// The forward's edges [begin, end) of the CSR by destination into acc (and best, for max/min).
// Compiled for AVX2 and the baseline (no FMA: the same bits).
template <typename scalar_t, Message M, Aggregate A>
GFMRAG_CPU_CLONES void forward_walk(const Inputs<scalar_t>& in, int32_t begin, int32_t end,
                                    at::opmath_type<scalar_t>* __restrict__ acc, int32_t* __restrict__ best) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kExtremum = is_extremum(A);
  const int64_t B = in.a.batch, D = in.a.dim, E = in.a.num_edges;
  const int32_t* src = in.graph[kDstSrc];
  const int32_t* type = in.graph[kDstType];
  const int32_t* eid = in.graph[kDstEid];
  const auto load = [&](int32_t k) GFMRAG_INLINE_LAMBDA {
    // Ahead in the whole list, not only in this row: most rows hold a few edges.
    if (k + kEdgesAhead < E) prefetch_rows(in, in.x, src[k + kEdgesAhead]);
    return in.template edge<acc_t, kExtremum>(k, src, type, eid);
  };
  walk_edges(begin, end, load, [&](const WalkedEdge<acc_t>& e) GFMRAG_INLINE_LAMBDA {
    if (e.removed) return;
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* __restrict__ xs = in.x + in.at(b, e.node);
      const scalar_t* __restrict__ rr = in.relation_of(b) + static_cast<int64_t>(e.other) * D;
      acc_t* __restrict__ a = acc + b * D;
      if constexpr (kExtremum) {
        int32_t* __restrict__ bb = best + b * D;
        for (int64_t c = 0; c < D; ++c) {
          keep_extremum<A>(a[c], bb[c], e.weight * message_of<M>(static_cast<acc_t>(xs[c]), static_cast<acc_t>(rr[c])),
                           e.eid);
        }
      } else {
        for (int64_t c = 0; c < D; ++c) {
          a[c] = add_rn(a[c], e.weight * message_of<M>(static_cast<acc_t>(xs[c]), static_cast<acc_t>(rr[c])));
        }
      }
    }
  });
}

template <typename scalar_t, Message M, Aggregate A>
void forward_kernel(const Inputs<scalar_t>& in, const ListPlan& plan, scalar_t* out, int32_t* arg) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kExtremum = is_extremum(A);
  const int64_t B = in.a.batch, D = in.a.dim, width = B * D;
  std::vector<acc_t> partial(plan.pieces * width);
  std::vector<int32_t> partial_arg(kExtremum ? plan.pieces * width : 0);

  auto walk = [&](int32_t begin, int32_t end, acc_t* acc, int32_t* best) {
    forward_walk<scalar_t, M, A>(in, begin, end, acc, best);
  };
  auto start = [&](acc_t* acc, int32_t* best) {
    std::fill(acc, acc + width, acc_t(0));
    if constexpr (kExtremum) std::fill(best, best + width, -1);
  };
  auto piece = [&](int64_t p, acc_t* acc, int32_t* best) {
    start(acc, best);
    walk(plan.piece_begin[p], plan.piece_end[p], acc, best);
    std::copy(acc, acc + width, partial.data() + p * width);
    if constexpr (kExtremum) std::copy(best, best + width, partial_arg.data() + p * width);
  };
  auto row = [&](int64_t v, acc_t* acc, int32_t* best) {
    start(acc, best);
    if (walked_whole(plan, v)) {
      walk(plan.ptr[v], plan.ptr[v + 1], acc, best);
    } else {
      for (int32_t p = plan.piece_ptr[v]; p < plan.piece_ptr[v + 1]; ++p) {
        const acc_t* pa = partial.data() + p * width;
        if constexpr (kExtremum) {
          const int32_t* pb = partial_arg.data() + p * width;
          for (int64_t i = 0; i < width; ++i) keep_partial_extremum<A>(acc[i], best[i], pa[i], pb[i]);
        } else {
          for (int64_t i = 0; i < width; ++i) acc[i] = add_rn(acc[i], pa[i]);
        }
      }
    }
    const int32_t n = A == Aggregate::Mean ? in.aux[v] : 0;
    for (int64_t b = 0; b < B; ++b) {
      scalar_t* o = out + in.at(b, v);
      const acc_t* a = acc + b * D;
      const int32_t* bb = kExtremum ? best + b * D : nullptr;
      for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(finish_forward<A>(a[c], kExtremum ? bb[c] : 0, n));
      if constexpr (kExtremum) std::copy(bb, bb + D, arg + in.at(b, v));
    }
  };
  run_plan<acc_t>(plan, width, kExtremum, piece, row);
}

// Folds the partials of row r's pieces into acc (sums: the gradients have no max/min partials).
template <typename acc_t>
void fold_partial_sums(const ListPlan& plan, int64_t r, const acc_t* partial, int64_t width, acc_t* acc) {
  for (int32_t p = plan.piece_ptr[r]; p < plan.piece_ptr[r + 1]; ++p) {
    const acc_t* pa = partial + p * width;
    for (int64_t i = 0; i < width; ++i) acc[i] = add_rn(acc[i], pa[i]);
  }
}

// Runs a plan whose rows are sums (the gradients): each piece walks its edges into a partial sum;
// each row walks its edges whole or folds its pieces' partials in piece order, then
// write(row, acc) stores its `width` sums.
template <typename acc_t, typename Walk, typename Write>
void run_summed_plan(const ListPlan& plan, int64_t width, const Walk& walk, const Write& write) {
  std::vector<acc_t> partial(plan.pieces * width);
  auto piece = [&](int64_t p, acc_t* acc, int32_t*) {
    std::fill(acc, acc + width, acc_t(0));
    walk(plan.piece_begin[p], plan.piece_end[p], acc);
    std::copy(acc, acc + width, partial.data() + p * width);
  };
  auto row = [&](int64_t r, acc_t* acc, int32_t*) {
    std::fill(acc, acc + width, acc_t(0));
    if (walked_whole(plan, r)) walk(plan.ptr[r], plan.ptr[r + 1], acc);
    else fold_partial_sums(plan, r, partial.data(), width, acc);
    write(r, acc);
  };
  run_plan<acc_t>(plan, width, false, piece, row);
}

// acc[c] += message_grad(g[c], other[c], s) for c < dim, only where edge e won for max/min
// (adding 0 elsewhere: acc starts at +0 and never becomes -0, so that is the same as skipping).
template <Message M, bool kExtremum, typename scalar_t, typename acc_t>
inline void add_message_grads(acc_t* __restrict__ acc, const scalar_t* __restrict__ g,
                              const scalar_t* __restrict__ other, const int32_t* __restrict__ sel, int32_t e,
                              acc_t s, int64_t dim) {
  for (int64_t c = 0; c < dim; ++c) {
    const acc_t t = message_grad<M>(static_cast<acc_t>(g[c]), static_cast<acc_t>(other[c]), s);
    if constexpr (kExtremum) acc[c] = add_rn(acc[c], sel[c] == e ? t : acc_t(0));
    else acc[c] = add_rn(acc[c], t);
  }
}

template <typename scalar_t, Message M, Aggregate A>
void backward_x_kernel(const Inputs<scalar_t>& in, const ListPlan& plan, const scalar_t* grad_out, scalar_t* grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kExtremum = is_extremum(A);
  const int64_t B = in.a.batch, D = in.a.dim, width = B * D, E = in.a.num_edges;
  const int32_t* dst = in.graph[kSrcDst];
  const int32_t* type = in.graph[kSrcType];
  const int32_t* eid = in.graph[kSrcEid];
  auto walk = [&](int32_t begin, int32_t end, acc_t* acc) {
    const auto load = [&](int32_t k) {
      if (k + kEdgesAhead < E) prefetch_rows(in, grad_out, dst[k + kEdgesAhead]);
      return in.template edge<acc_t, kExtremum>(k, dst, type, eid);
    };
    walk_edges(begin, end, load, [&](const WalkedEdge<acc_t>& e) {
      if (e.removed) return;
      const acc_t scale = e.weight * reduce_scale<A, acc_t>(in.aux, e.node);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t o = in.at(b, e.node);
        add_message_grads<M, kExtremum>(acc + b * D, grad_out + o, in.relation_of(b) + static_cast<int64_t>(e.other) * D,
                                        kExtremum ? in.aux + o : nullptr, e.eid, scale, D);
      }
    });
  };
  run_summed_plan<acc_t>(plan, width, walk, [&](int64_t u, const acc_t* acc) {
    for (int64_t b = 0; b < B; ++b) {
      scalar_t* o = grad_x + in.at(b, u);
      for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(acc[b * D + c]);
    }
  });
}

template <typename scalar_t, Message M, Aggregate A>
void backward_relation_kernel(const Inputs<scalar_t>& in, const ListPlan& plan, const scalar_t* grad_out,
                              scalar_t* grad_relation) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kExtremum = is_extremum(A);
  const int64_t B = in.a.batch, D = in.a.dim, R = in.a.num_relations, E = in.a.num_edges;
  // A shared relation table sums over the batch into one row; per-query tables get one each.
  const int64_t num_out = in.a.per_query ? B : 1, width = num_out * D;
  const int32_t* dst = in.graph[kRelDst];
  const int32_t* src = in.graph[kRelSrc];
  const int32_t* eid = in.graph[kRelEid];
  auto walk = [&](int32_t begin, int32_t end, acc_t* acc) {
    const auto load = [&](int32_t k) {
      if (k + kEdgesAhead < E) {
        prefetch_rows(in, grad_out, dst[k + kEdgesAhead]);
        if constexpr (M == Message::DistMult) prefetch_rows(in, in.x, src[k + kEdgesAhead]);
      }
      return in.template edge<acc_t, kExtremum>(k, dst, src, eid);
    };
    walk_edges(begin, end, load, [&](const WalkedEdge<acc_t>& e) {
      if (e.removed) return;
      const acc_t scale = e.weight * reduce_scale<A, acc_t>(in.aux, e.node);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t o = in.at(b, e.node);
        add_message_grads<M, kExtremum>(acc + (in.a.per_query ? b * D : 0), grad_out + o, in.x + in.at(b, e.other),
                                        kExtremum ? in.aux + o : nullptr, e.eid, scale, D);
      }
    });
  };
  run_summed_plan<acc_t>(plan, width, walk, [&](int64_t r, const acc_t* acc) {
    for (int64_t ob = 0; ob < num_out; ++ob) {
      scalar_t* o = grad_relation + (ob * R + r) * D;
      for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(acc[ob * D + c]);
    }
  });
}

// The input and the relation gradients together, in one walk of the CSC by source, for what the
// training step asks of a layer: both gradients of sum or mean with a relation table shared by the
// batch. The two kernels above gather grad_out's rows twice (once per list) and x's once per edge;
// here each edge gathers its destination's grad_out rows once and feeds both sums, and x's rows
// of a source are read once for all its edges. grad_x comes out bit for bit as
// backward_x_kernel's (same walks, same piece folds). The relation sums cannot be written row by
// row in this order, so the work is cut into kRelationBlocks blocks of consecutive work items (a
// row walked whole, or a piece), fixed by the graph alone; each block sums its edges' relation
// gradients into its own [R, d] table, and the tables are added in block order: deterministic,
// independent of the number of threads, but a different order from the relation kernel (the
// result agrees with it to rounding, not bit for bit).
constexpr int64_t kRelationBlocks = 8;
// Above this many bytes of block tables the two kernels run instead (a relation table of 1M floats).
constexpr int64_t kRelationBlockBudget = int64_t(64) << 20;

bool joint_backward_applies(const RelAggregateArgs& a, int64_t acc_bytes) {
  if (a.per_query) return false;
  if (a.aggregate != Aggregate::Sum && a.aggregate != Aggregate::Mean) return false;
  return kRelationBlocks * a.num_relations * a.dim * acc_bytes <= kRelationBlockBudget;
}

constexpr int64_t kLanes = 16;  // measured: 16 beats 8 and 32 at d = 64 (AVX2)

// Channels [c0, c0 + L) of one edge v <- u of the joint backward: for every b, the input gradient's
// accumulator takes message_grad(g, rel, s) exactly as in backward_x_kernel; the relation's sum
// over b of g * MSG'(x) is formed first and added to the block's table row times s.
template <Message M, int64_t L, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void joint_edge_lanes(const Inputs<scalar_t>& in, const scalar_t* __restrict__ grad_out, int32_t v,
                                        int64_t u, int64_t B, int64_t c0, const scalar_t* __restrict__ rel,
                                        acc_t scale, acc_t* __restrict__ acc, acc_t* __restrict__ trow) {
  acc_t r[L], sum[L];
  for (int64_t l = 0; l < L; ++l) {
    r[l] = static_cast<acc_t>(rel[c0 + l]);
    sum[l] = acc_t(0);
  }
  for (int64_t b = 0; b < B; ++b) {
    const scalar_t* __restrict__ g = grad_out + in.at(b, v) + c0;
    const scalar_t* __restrict__ xs = in.x + in.at(b, u) + c0;
    acc_t* __restrict__ a = acc + b * in.a.dim + c0;
    for (int64_t l = 0; l < L; ++l) {
      const acc_t gl = static_cast<acc_t>(g[l]);
      a[l] = add_rn(a[l], message_grad<M>(gl, r[l], scale));
      if constexpr (M == Message::DistMult) sum[l] = add_rn(sum[l], gl * static_cast<acc_t>(xs[l]));
      else sum[l] = add_rn(sum[l], gl);
    }
  }
  for (int64_t l = 0; l < L; ++l) trow[c0 + l] = add_rn(trow[c0 + l], sum[l] * scale);
}

// A work item of the joint backward, in list order: a row walked whole (piece = -1) or a piece.
struct JointItem {
  int64_t row;
  int64_t piece;
  int32_t begin;  // edge positions in the CSC by source
  int32_t end;
};

// grad_x's row u of the B queries from its sums acc: cast to scalar_t, plus init's row where given,
// added as autograd would add two gradients of x in scalar_t (each rounded, then their sum).
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void write_grad_x_row(const Inputs<scalar_t>& in, int64_t u, const acc_t* __restrict__ acc,
                                        const scalar_t* __restrict__ init, scalar_t* __restrict__ grad_x) {
  const int64_t B = in.a.batch, D = in.a.dim;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o = in.at(b, u);
    const acc_t* a = acc + b * D;
    if (init != nullptr) {
      for (int64_t c = 0; c < D; ++c) {
        grad_x[o + c] = static_cast<scalar_t>(static_cast<acc_t>(init[o + c]) +
                                              static_cast<acc_t>(static_cast<scalar_t>(a[c])));
      }
    } else {
      for (int64_t c = 0; c < D; ++c) grad_x[o + c] = static_cast<scalar_t>(a[c]);
    }
  }
}

// The items [first, last) of one block: grad_x rows (or piece partials) written, the block's
// relation table summed into. Compiled for AVX2 and the baseline (no FMA: the same bits).
template <typename scalar_t, Message M, Aggregate A>
GFMRAG_CPU_CLONES void joint_backward_items(const Inputs<scalar_t>& in, const JointItem* first, const JointItem* last,
                                            const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ init,
                                            scalar_t* __restrict__ grad_x,
                                            at::opmath_type<scalar_t>* __restrict__ piece_partial,
                                            at::opmath_type<scalar_t>* __restrict__ table,
                                            at::opmath_type<scalar_t>* __restrict__ acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = in.a.batch, D = in.a.dim, width = B * D, E = in.a.num_edges;
  const int32_t* dst = in.graph[kSrcDst];
  const int32_t* type = in.graph[kSrcType];
  for (const JointItem* it = first; it != last; ++it) {
    std::fill(acc, acc + width, acc_t(0));
    const int64_t u = it->row;
    // The next item's x rows: read for each of its edges, and not a gather the hardware sees coming.
    if (it + 1 != last && it[1].row != u) prefetch_rows(in, in.x, static_cast<int32_t>(it[1].row));
    const auto load = [&](int32_t j) GFMRAG_INLINE_LAMBDA {
      if (j + kEdgesAhead < E) prefetch_rows(in, grad_out, dst[j + kEdgesAhead]);
      return in.template edge<acc_t, false>(j, dst, type, nullptr);
    };
    walk_edges(it->begin, it->end, load, [&](const WalkedEdge<acc_t>& e) GFMRAG_INLINE_LAMBDA {
      if (e.removed) return;
      const acc_t scale = e.weight * reduce_scale<A, acc_t>(in.aux, e.node);
      const scalar_t* rel = in.relation + static_cast<int64_t>(e.other) * D;
      acc_t* trow = table + static_cast<int64_t>(e.other) * D;
      // kLanes channels at a time, the batch inside: the edge's relation sum over b stays in
      // registers and reaches the table once.
      int64_t c0 = 0;
      for (; c0 + kLanes <= D; c0 += kLanes) {
        joint_edge_lanes<M, kLanes>(in, grad_out, e.node, u, B, c0, rel, scale, acc, trow);
      }
      for (; c0 + kLanes / 2 <= D; c0 += kLanes / 2) {
        joint_edge_lanes<M, kLanes / 2>(in, grad_out, e.node, u, B, c0, rel, scale, acc, trow);
      }
      for (; c0 < D; ++c0) joint_edge_lanes<M, 1>(in, grad_out, e.node, u, B, c0, rel, scale, acc, trow);
    });
    if (it->piece < 0) {
      write_grad_x_row(in, u, acc, init, grad_x);
    } else {
      std::copy(acc, acc + width, piece_partial + it->piece * width);
    }
  }
}

template <typename scalar_t, Message M, Aggregate A>
void backward_x_relation_kernel(const Inputs<scalar_t>& in, const ListPlan& plan, const scalar_t* grad_out,
                                const scalar_t* init, scalar_t* grad_x, scalar_t* grad_relation) {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(!is_extremum(A), "max/min take the two kernels");
  const int64_t B = in.a.batch, D = in.a.dim, width = B * D, R = in.a.num_relations;

  std::vector<JointItem> items;
  items.reserve(plan.rows + plan.pieces);
  for (int64_t u = 0; u < plan.rows; ++u) {
    if (walked_whole(plan, u)) {
      items.push_back({u, -1, plan.ptr[u], plan.ptr[u + 1]});
    } else {
      for (int32_t p = plan.piece_ptr[u]; p < plan.piece_ptr[u + 1]; ++p) {
        items.push_back({u, p, plan.piece_begin[p], plan.piece_end[p]});
      }
    }
  }
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(kRelationBlocks, num_items));
  std::vector<int64_t> bounds(blocks + 1, num_items);
  {
    int64_t total = 0;
    for (const JointItem& it : items) total += it.end - it.begin + 1;
    int64_t seen = 0, next = 1;
    bounds[0] = 0;
    for (int64_t i = 0; i < num_items && next < blocks; ++i) {
      seen += items[i].end - items[i].begin + 1;
      while (next < blocks && seen >= total * next / blocks) bounds[next++] = i + 1;
    }
  }

  // Uninitialised (a vector would zero them in one thread first): every piece's partial is
  // written before it is read, and each block zeroes its own table.
  const std::unique_ptr<acc_t[]> piece_partial(new acc_t[plan.pieces * width]);
  const std::unique_ptr<acc_t[]> tables(new acc_t[blocks * R * D]);
  parallel_chunks(blocks, [&](int64_t k) {
    acc_t* table = tables.get() + k * R * D;
    std::fill(table, table + R * D, acc_t(0));
    std::vector<acc_t> acc(width);
    joint_backward_items<scalar_t, M, A>(in, items.data() + bounds[k], items.data() + bounds[k + 1], grad_out, init,
                                         grad_x, piece_partial.get(), table, acc.data());
  });

  // Rows cut into pieces: their pieces' partials folded in piece order, as backward_x_kernel does.
  std::vector<int64_t> cut_rows;
  for (int64_t u = 0; u < plan.rows; ++u) {
    if (!walked_whole(plan, u)) cut_rows.push_back(u);
  }
  parallel_chunks(static_cast<int64_t>(cut_rows.size()), [&](int64_t i) {
    const int64_t u = cut_rows[i];
    std::vector<acc_t> acc(width, acc_t(0));
    fold_partial_sums(plan, u, piece_partial.get(), width, acc.data());
    write_grad_x_row(in, u, acc.data(), init, grad_x);
  });

  // The relation gradient: the block tables added in block order.
  constexpr int64_t kRelationsPerChunk = 256;
  parallel_chunks((R + kRelationsPerChunk - 1) / kRelationsPerChunk, [&](int64_t chunk) {
    const int64_t begin = chunk * kRelationsPerChunk * D, end = std::min(R, (chunk + 1) * kRelationsPerChunk) * D;
    for (int64_t i = begin; i < end; ++i) {
      acc_t sum = tables[i];
      for (int64_t k = 1; k < blocks; ++k) sum = add_rn(sum, tables[k * R * D + i]);
      grad_relation[i] = static_cast<scalar_t>(sum);
    }
  });
}

// lane[c] += g[c] * MSG(x[c], r[c]) (where edge e won, for max/min): the edge weight's derivative.
template <Message M, bool kExtremum, typename scalar_t, typename acc_t>
inline void add_products(acc_t* __restrict__ lane, const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                         const scalar_t* __restrict__ r, const int32_t* __restrict__ sel, int32_t e, int64_t dim) {
  for (int64_t c = 0; c < dim; ++c) {
    const acc_t t = static_cast<acc_t>(g[c]) * message_of<M>(static_cast<acc_t>(x[c]), static_cast<acc_t>(r[c]));
    if constexpr (kExtremum) lane[c] += sel[c] == e ? t : acc_t(0);
    else lane[c] += t;
  }
}

// One edge at a time in original order (its arrays need no indirection there); per-channel
// partial sums reduced at the end of each edge: a vectorisable loop with a fixed summation order.
template <typename scalar_t, Message M, Aggregate A>
void backward_edge_weight_kernel(const Inputs<scalar_t>& in, const bool* mask, const scalar_t* grad_out,
                                 scalar_t* grad_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kExtremum = is_extremum(A);
  const int64_t B = in.a.batch, D = in.a.dim, E = in.a.num_edges;
  const int32_t* edge_src = in.graph[kEdgeSrc];
  const int32_t* edge_dst = in.graph[kEdgeDst];
  const int32_t* edge_type = in.graph[kEdgeType];
  constexpr int64_t kEdgesPerChunk = 256;
  parallel_chunks((E + kEdgesPerChunk - 1) / kEdgesPerChunk, [&](int64_t chunk) {
    const int64_t begin = chunk * kEdgesPerChunk, end = std::min(E, begin + kEdgesPerChunk);
    std::vector<acc_t> lane(D);
    for (int64_t e = begin; e < end; ++e) {
      if (e + kEdgesAhead < E) {
        prefetch_rows(in, grad_out, edge_dst[e + kEdgesAhead]);
        prefetch_rows(in, in.x, edge_src[e + kEdgesAhead]);
      }
      if (mask != nullptr && mask[e]) {
        grad_weight[e] = scalar_t(0);
        continue;
      }
      const int32_t u = edge_src[e], v = edge_dst[e];
      std::fill(lane.begin(), lane.end(), acc_t(0));
      for (int64_t b = 0; b < B; ++b) {
        const int64_t o = in.at(b, v);
        add_products<M, kExtremum>(lane.data(), grad_out + o, in.x + in.at(b, u),
                                   in.relation_of(b) + static_cast<int64_t>(edge_type[e]) * D,
                                   kExtremum ? in.aux + o : nullptr, static_cast<int32_t>(e), D);
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
                                                     c10::string_view message, c10::string_view aggregate,
                                                     bool node_major) {
  const RelAggregateArgs a =
      check_rel_aggregate_inputs(x, relation, graph, edge_weight, edge_mask, message, aggregate, node_major);
  const at::Tensor weight = in_walk_order(edge_weight, graph, EdgeList::Dst);
  const at::Tensor mask = in_walk_order(edge_mask, graph, EdgeList::Dst);
  at::Tensor out = empty_output(x.sizes(), x.options());
  at::Tensor aux = forward_aux(x, graph, mask, a);  // max/min: the kernel writes every entry
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rel_aggregate_cpu", [&] {
    const auto in = make_inputs<scalar_t>(x, relation, &aux, graph, weight, mask, a);
    dispatch_message_aggregate(a.message, a.aggregate, [&](auto m, auto g) {
      forward_kernel<scalar_t, decltype(m)::value, decltype(g)::value>(
          in, list_plan(graph, EdgeList::Dst), out.mutable_data_ptr<scalar_t>(), aux.mutable_data_ptr<int32_t>());
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
                                      c10::string_view message, c10::string_view aggregate, bool node_major) {
  const RelAggregateArgs a = check_rel_aggregate_backward_inputs(grad_out, x, relation, aux, graph, edge_weight,
                                                                 edge_mask, message, aggregate, node_major);
  constexpr Kernel K = kernel_of(G);
  const WalkOrderArrays walked = walk_order_arrays(K, edge_weight, edge_mask, graph);
  at::Tensor grad = empty_grad(G, x, relation, a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rel_aggregate_backward_cpu", [&] {
    const auto in = make_inputs<scalar_t>(x, relation, &aux, graph, walked.weight, walked.mask, a);
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    scalar_t* o = grad.mutable_data_ptr<scalar_t>();
    dispatch_message_aggregate(a.message, a.aggregate, [&](auto m, auto r) {
      constexpr Message M = decltype(m)::value;
      constexpr Aggregate A = decltype(r)::value;
      if constexpr (K == Kernel::GradX) {
        backward_x_kernel<scalar_t, M, A>(in, list_plan(graph, EdgeList::Src), g, o);
      } else if constexpr (K == Kernel::GradRelation) {
        backward_relation_kernel<scalar_t, M, A>(in, list_plan(graph, EdgeList::Rel), g, o);
      } else {
        backward_edge_weight_kernel<scalar_t, M, A>(in, edge_mask ? edge_mask->const_data_ptr<bool>() : nullptr, g, o);
      }
    });
  });
  return grad;
}

// Both the input and the relation gradient (see backward_x_relation_kernel); the two kernels where
// that one does not apply (max/min, per-query relations, a relation table too large to copy per block).
std::tuple<at::Tensor, at::Tensor> rel_aggregate_backward_x_relation_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& relation, const at::Tensor& aux,
    at::TensorList graph, const std::optional<at::Tensor>& edge_weight, const std::optional<at::Tensor>& edge_mask,
    c10::string_view message, c10::string_view aggregate, bool node_major,
    const std::optional<at::Tensor>& grad_x_init) {
  const RelAggregateArgs a = check_rel_aggregate_backward_inputs(grad_out, x, relation, aux, graph, edge_weight,
                                                                 edge_mask, message, aggregate, node_major);
  if (grad_x_init) {
    TORCH_CHECK_VALUE(grad_x_init->sizes() == x.sizes() && grad_x_init->scalar_type() == x.scalar_type() &&
                          grad_x_init->device() == x.device() && grad_x_init->is_contiguous(),
                      "rel_aggregate backward: grad_x_init must be a contiguous tensor like x (shape ", x.sizes(),
                      ", ", x.scalar_type(), "), got shape ", grad_x_init->sizes(), ", ",
                      grad_x_init->scalar_type(), (grad_x_init->is_contiguous() ? "" : ", not contiguous"));
  }
  const int64_t acc_bytes = x.scalar_type() == at::kDouble ? 8 : 4;
  if (!joint_backward_applies(a, acc_bytes)) {
    at::Tensor grad_x = rel_aggregate_backward_cpu<Grad::X>(grad_out, x, relation, aux, graph, edge_weight,
                                                            edge_mask, message, aggregate, node_major);
    if (grad_x_init) grad_x = at::add(*grad_x_init, grad_x);
    return {grad_x, rel_aggregate_backward_cpu<Grad::Relation>(grad_out, x, relation, aux, graph, edge_weight,
                                                               edge_mask, message, aggregate, node_major)};
  }
  const WalkOrderArrays walked = walk_order_arrays(Kernel::GradX, edge_weight, edge_mask, graph);
  at::Tensor grad_x = empty_grad(Grad::X, x, relation, a);
  at::Tensor grad_relation = empty_grad(Grad::Relation, x, relation, a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rel_aggregate_backward_x_relation_cpu", [&] {
    const auto in = make_inputs<scalar_t>(x, relation, &aux, graph, walked.weight, walked.mask, a);
    dispatch_message_aggregate(a.message, a.aggregate, [&](auto m, auto r) {
      constexpr Aggregate A = decltype(r)::value;
      if constexpr (!is_extremum(A)) {
        backward_x_relation_kernel<scalar_t, decltype(m)::value, A>(
            in, list_plan(graph, EdgeList::Src), grad_out.const_data_ptr<scalar_t>(),
            grad_x_init ? grad_x_init->const_data_ptr<scalar_t>() : nullptr, grad_x.mutable_data_ptr<scalar_t>(),
            grad_relation.mutable_data_ptr<scalar_t>());
      }
    });
  });
  return {grad_x, grad_relation};
}

}  // namespace

TORCH_LIBRARY_IMPL(gfmrag_fast, CPU, m) {
  m.impl("rel_aggregate", &rel_aggregate_cpu);
  m.impl("rel_aggregate_backward_x", &rel_aggregate_backward_cpu<Grad::X>);
  m.impl("rel_aggregate_backward_relation", &rel_aggregate_backward_cpu<Grad::Relation>);
  m.impl("rel_aggregate_backward_edge_weight", &rel_aggregate_backward_cpu<Grad::EdgeWeight>);
  m.impl("rel_aggregate_backward_x_relation", &rel_aggregate_backward_x_relation_cpu);
}

}  // namespace gfmrag_fast
