// CPU kernels of negative_sampling and easy_edge_mask.
#include "../triple_index.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>

namespace gfmrag_fast {
namespace {

at::Tensor negative_sampling_cpu(const at::Tensor& triples, at::TensorList index, int64_t num_nodes,
                                 int64_t num_relations, int64_t num_negative, bool strict,
                                 const at::Tensor& seed_tensor) {
  const TripleIndexView ix =
      check_negative_sampling_inputs(triples, index, num_nodes, num_relations, num_negative, seed_tensor);
  const uint64_t seed = static_cast<uint64_t>(*seed_tensor.data_ptr<int64_t>());
  const int64_t B = triples.size(0), K = num_negative;
  at::Tensor out = at::empty({B, K + 1, 3}, triples.options());
  const int64_t* in = triples.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t h = in[b * 3], t = in[b * 3 + 1], r = in[b * 3 + 2];
      const bool corrupt_tail = b < B / 2;
      const Exclusion ex = strict ? exclusion_of(ix, h, t, r, corrupt_tail, num_nodes, num_relations) : Exclusion{};
      int64_t* row = o + b * (K + 1) * 3;
      row[0] = h, row[1] = t, row[2] = r;
      for (int64_t k = 0; k < K; ++k) {
        const uint64_t random = random64(seed, static_cast<uint64_t>(b * K + k));
        const int64_t x = draw_negative(ex, strict, num_nodes, random);
        int64_t* neg = row + (k + 1) * 3;
        neg[0] = corrupt_tail ? h : x;
        neg[1] = corrupt_tail ? x : t;
        neg[2] = r;
      }
    }
  });
  return out;
}

at::Tensor easy_edge_mask_cpu(const at::Tensor& triples, at::TensorList index, int64_t num_edges,
                              int64_t num_relations) {
  const TripleIndexView ix = check_easy_edge_mask_inputs(triples, index, num_edges, num_relations);
  at::Tensor mask = at::zeros({num_edges}, triples.options().dtype(at::kBool));
  bool* out = mask.data_ptr<bool>();
  const int64_t* in = triples.data_ptr<int64_t>();
  const int64_t R = num_relations / 2;
  // The rows of one corrupted triple share (h, r) or (t, r + R), so each chunk remembers the last
  // key it found in each direction: half of the binary searches are saved. Parallel copies of an
  // edge can be flagged by two threads: the flags are stored atomically (relaxed, same value).
  at::parallel_for(0, triples.size(0), 512, [&](int64_t begin, int64_t end) {
    int64_t last_key[2] = {-1, -1}, last_pos[2] = {-1, -1};
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = in[i * 3], t = in[i * 3 + 1], r = in[i * 3 + 2];
      if (r < 0 || r >= R || h < 0 || t < 0 || h > INT32_MAX || t > INT32_MAX) continue;  // matches nothing
      for (int direction = 0; direction < 2; ++direction) {
        const int64_t src = direction == 0 ? h : t, dst = direction == 0 ? t : h;
        const int64_t key = src * num_relations + r + direction * R;
        if (key != last_key[direction]) {
          last_key[direction] = key;
          last_pos[direction] = find_key(ix.keys, ix.num_keys, key);
        }
        if (last_pos[direction] < 0) continue;
        for_each_matching_edge(ix, last_pos[direction], dst,
                               [&](int32_t e) { __atomic_store_n(out + e, true, __ATOMIC_RELAXED); });
      }
    }
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(gfmrag_fast, CPU, m) {
  m.impl("negative_sampling", &negative_sampling_cpu);
  m.impl("easy_edge_mask", &easy_edge_mask_cpu);
}

}  // namespace gfmrag_fast
