// Triple sampling and easy-edge removal over a prebuilt (node, relation) -> neighbours index.
//
// The index (gfmrag_fast.ops.TripleIndex) groups the graph's edges by key = src * num_relations +
// type, where src = edge_index[0]: for a key, the values are the edge_index[1] ends, sorted. With
// GFM-RAG's inverse edges, key (h, r) lists the true tails of (h, r, ?) and key (t, r + R) the true
// heads of (?, r, t). Two value lists share the key array:
//   unique: each value once per key      (negative sampling: exclusion sets)
//   all:    every edge, parallel copies  (easy-edge mask: edge ids)
//
// The inline functions below are shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace gfmrag_fast {

// Counter-based random numbers (splitmix64 finaliser): the value for (seed, counter) does not
// depend on which thread draws it, so samples are reproducible on any device and thread count.
C10_HOST_DEVICE inline uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

C10_HOST_DEVICE inline uint64_t random64(uint64_t seed, uint64_t counter) {
  return mix64(seed ^ mix64(counter));
}

// Uniform integer in [0, n): the high half of a 64x64-bit product (bias at most n / 2^64).
C10_HOST_DEVICE inline int64_t uniform_below(uint64_t random, int64_t n) {
#ifdef __CUDA_ARCH__
  return static_cast<int64_t>(__umul64hi(random, static_cast<uint64_t>(n)));
#else
  return static_cast<int64_t>((static_cast<unsigned __int128>(random) * static_cast<uint64_t>(n)) >> 64);
#endif
}

// Position of `key` in the sorted keys[0, n), or -1.
C10_HOST_DEVICE inline int64_t find_key(const int64_t* keys, int64_t n, int64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] < key) lo = mid + 1; else hi = mid;
  }
  return (lo < n && keys[lo] == key) ? lo : -1;
}

// First position in sorted values[lo, hi) holding a value >= v.
C10_HOST_DEVICE inline int64_t lower_bound(const int32_t* values, int64_t lo, int64_t hi, int64_t v) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (values[mid] < v) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// The u-th (0-based) integer of [0, N) not in the strictly increasing values s[0, m). Since
// s[i] - i is non-decreasing, the answer is u + #{i : s[i] - i <= u}, found by bisection.
C10_HOST_DEVICE inline int64_t select_excluded(const int32_t* s, int64_t m, int64_t u) {
  int64_t lo = 0, hi = m;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(s[mid]) - mid <= u) lo = mid + 1; else hi = mid;
  }
  return u + lo;
}

// One negative for the query whose exclusion set is s[0, m) (sorted, unique) and whose positive
// answer is `positive`: uniform over [0, N) minus s minus the positive. When nothing is left, the
// positive itself is returned (documented in negative_sampling's docstring).
C10_HOST_DEVICE inline int64_t sample_excluding(const int32_t* s, int64_t m, int64_t positive,
                                               int64_t num_nodes, uint64_t random) {
  const int64_t at = lower_bound(s, 0, m, positive);
  // A negative `positive` means "none": nothing beyond s is excluded.
  const bool positive_listed = positive < 0 || (at < m && s[at] == positive);
  const int64_t allowed = num_nodes - m - (positive_listed ? 0 : 1);
  if (allowed <= 0) return positive;
  const int64_t u = uniform_below(random, allowed);
  int64_t x = select_excluded(s, m, u);
  // Skipping an unlisted positive: the u-th allowed value is the (u+1)-th outside s once x >= it.
  if (!positive_listed && x >= positive) x = select_excluded(s, m, u + 1);
  return x;
}

struct TripleIndexView {
  const int64_t* keys;         // [U]     sorted unique keys src * num_relations + type
  const int64_t* unique_ptr;   // [U + 1] into unique_values
  const int32_t* unique_values;  // [M]
  const int64_t* all_ptr;      // [U + 1] into all_values / all_eids
  const int32_t* all_values;   // [E]
  const int32_t* all_eids;     // [E]
  int64_t num_keys;
};

// What the negatives of triple (h, t, r) exclude: the true answers s[0, m) of its query, (h, r, ?)
// when tails are corrupted and (t, r + R, ?) when heads are, and its positive answer. A row out
// of range excludes nothing (positive -1).
struct Exclusion {
  const int32_t* s = nullptr;
  int64_t m = 0;
  int64_t positive = -1;
};

C10_HOST_DEVICE inline Exclusion exclusion_of(const TripleIndexView& ix, int64_t h, int64_t t, int64_t r,
                                              bool corrupt_tail, int64_t num_nodes, int64_t num_relations) {
  const int64_t R = num_relations / 2;
  Exclusion ex;
  if (!(h >= 0 && h < num_nodes && t >= 0 && t < num_nodes && r >= 0 && r < R)) return ex;
  ex.positive = corrupt_tail ? t : h;
  const int64_t pos =
      find_key(ix.keys, ix.num_keys, corrupt_tail ? h * num_relations + r : t * num_relations + r + R);
  if (pos >= 0) {
    ex.s = ix.unique_values + ix.unique_ptr[pos];
    ex.m = ix.unique_ptr[pos + 1] - ix.unique_ptr[pos];
  }
  return ex;
}

// One negative: uniform over the entities `ex` allows (strict) or over all of them.
C10_HOST_DEVICE inline int64_t draw_negative(const Exclusion& ex, bool strict, int64_t num_nodes, uint64_t random) {
  return strict ? sample_excluding(ex.s, ex.m, ex.positive, num_nodes, random) : uniform_below(random, num_nodes);
}

// Calls f(edge id) for every edge of index key `pos` whose other end is `dst` (parallel copies too).
template <typename F>
C10_HOST_DEVICE inline void for_each_matching_edge(const TripleIndexView& ix, int64_t pos, int64_t dst, F&& f) {
  const int64_t hi = ix.all_ptr[pos + 1];
  for (int64_t j = lower_bound(ix.all_values, ix.all_ptr[pos], hi, dst); j < hi && ix.all_values[j] == dst; ++j) {
    f(ix.all_eids[j]);
  }
}

// The ops' shared input checks; they return the index's raw view for the kernels. The index
// arrays' values are checked (every entry read; a device->host copy on CUDA) unless these arrays
// passed that check before (array_checks.h).
// `seed` must be a one-element int64 tensor on the triples' device: the kernels read it there,
// so drawing it (torch.randint on that device) needs no host synchronisation and can be captured
// in a CUDA graph or traced by torch.compile.
TripleIndexView check_negative_sampling_inputs(const at::Tensor& triples, at::TensorList index, int64_t num_nodes,
                                               int64_t num_relations, int64_t num_negative, const at::Tensor& seed);
TripleIndexView check_easy_edge_mask_inputs(const at::Tensor& triples, at::TensorList index, int64_t num_edges,
                                            int64_t num_relations);

}  // namespace gfmrag_fast
