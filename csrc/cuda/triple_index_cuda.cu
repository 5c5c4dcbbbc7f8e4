// CUDA kernels of negative_sampling and easy_edge_mask: one thread per sample / per look-up, the
// same device functions as the CPU kernels (triple_index.h), so both give identical samples.
#include "../triple_index.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace gfmrag_fast {
namespace {

constexpr int kThreads = 256;

// Thread i < B * (K + 1) writes row i of the output: k = 0 copies the positive.
__global__ void negative_sampling_kernel(const int64_t* __restrict__ triples, TripleIndexView ix,
                                         int64_t* __restrict__ out, int64_t B, int64_t K, int64_t num_nodes,
                                         int64_t num_relations, bool strict,
                                         const int64_t* __restrict__ seed) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * (K + 1)) return;
  const int64_t b = i / (K + 1), k = i % (K + 1);
  const int64_t h = triples[b * 3], t = triples[b * 3 + 1], r = triples[b * 3 + 2];
  int64_t* row = out + i * 3;
  row[0] = h, row[1] = t, row[2] = r;
  if (k == 0) return;
  const bool corrupt_tail = b < B / 2;
  const Exclusion ex = strict ? exclusion_of(ix, h, t, r, corrupt_tail, num_nodes, num_relations) : Exclusion{};
  const int64_t x = draw_negative(ex, strict, num_nodes,
                                  random64(static_cast<uint64_t>(*seed), static_cast<uint64_t>(b * K + k - 1)));
  row[corrupt_tail ? 1 : 0] = x;
}

// Thread i < 2 * M looks up row i / 2 in direction i % 2 (0: (h, r, t), 1: (t, r + R, h)).
__global__ void easy_edge_mask_kernel(const int64_t* __restrict__ triples, TripleIndexView ix,
                                      bool* __restrict__ mask, int64_t M, int64_t num_relations) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= 2 * M) return;
  const int64_t row = i / 2, direction = i % 2, R = num_relations / 2;
  const int64_t h = triples[row * 3], t = triples[row * 3 + 1], r = triples[row * 3 + 2];
  if (r < 0 || r >= R || h < 0 || t < 0 || h > INT32_MAX || t > INT32_MAX) return;
  const int64_t src = direction == 0 ? h : t, dst = direction == 0 ? t : h;
  const int64_t pos = find_key(ix.keys, ix.num_keys, src * num_relations + r + direction * R);
  if (pos < 0) return;
  // Several threads may flag the same edge: they all store true, so the races are benign.
  for_each_matching_edge(ix, pos, dst, [&](int32_t e) { mask[e] = true; });
}

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

at::Tensor negative_sampling_cuda(const at::Tensor& triples, at::TensorList index, int64_t num_nodes,
                                  int64_t num_relations, int64_t num_negative, bool strict, const at::Tensor& seed) {
  const TripleIndexView ix =
      check_negative_sampling_inputs(triples, index, num_nodes, num_relations, num_negative, seed);
  const c10::cuda::CUDAGuard guard(triples.device());
  const int64_t B = triples.size(0);
  at::Tensor out = at::empty({B, num_negative + 1, 3}, triples.options());
  const int64_t n = B * (num_negative + 1);
  if (n > 0) {
    negative_sampling_kernel<<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        triples.data_ptr<int64_t>(), ix, out.data_ptr<int64_t>(), B, num_negative, num_nodes,
        num_relations, strict, seed.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor easy_edge_mask_cuda(const at::Tensor& triples, at::TensorList index, int64_t num_edges,
                               int64_t num_relations) {
  const TripleIndexView ix = check_easy_edge_mask_inputs(triples, index, num_edges, num_relations);
  const c10::cuda::CUDAGuard guard(triples.device());
  at::Tensor mask = at::zeros({num_edges}, triples.options().dtype(at::kBool));
  const int64_t n = 2 * triples.size(0);
  if (n > 0 && num_edges > 0) {
    easy_edge_mask_kernel<<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        triples.data_ptr<int64_t>(), ix, mask.data_ptr<bool>(), triples.size(0), num_relations);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(gfmrag_fast, CUDA, m) {
  m.impl("negative_sampling", &negative_sampling_cuda);
  m.impl("easy_edge_mask", &easy_edge_mask_cuda);
}

}  // namespace gfmrag_fast
