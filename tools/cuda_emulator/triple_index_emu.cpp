// Host emulation of csrc/cuda/triple_index_cuda.cu (negative_sampling, easy_edge_mask); see
// README.md. build_triple_index.py writes the translated .cu to build/triple_index_emu_body.inc.
//
// These kernels use no warp or block primitives (build_triple_index.py refuses a .cu that does),
// so each launch runs its threads one at a time, in an order shuffled per launch: a kernel that
// read another thread's output, or left part of an output to another launch, would not match.
// The library is compiled with hidden visibility, so the header functions it inlines are its own
// device-side copies (the __CUDA_ARCH__ branches, see __umul64hi below), not the CPU library's.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

namespace {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};
thread_local Dim3 blockIdx, threadIdx, blockDim, gridDim;

struct Stats {
  int64_t launches = 0, threads = 0, max_grid = 0, umul64hi = 0;
};
Stats g_stats;
std::mt19937_64 g_order_rng(20240601);

// The CUDA intrinsic, from 32-bit halves (not from the 128-bit product the CPU kernels use), so
// the emulation checks that the device branch of uniform_below computes the same thing.
uint64_t __umul64hi(uint64_t a, uint64_t b) {
  ++g_stats.umul64hi;
  const uint64_t a_lo = a & 0xffffffffu, a_hi = a >> 32, b_lo = b & 0xffffffffu, b_hi = b >> 32;
  const uint64_t lo_lo = a_lo * b_lo, hi_lo = a_hi * b_lo, lo_hi = a_lo * b_hi, hi_hi = a_hi * b_hi;
  const uint64_t cross = (lo_lo >> 32) + (hi_lo & 0xffffffffu) + lo_hi;
  return hi_hi + (hi_lo >> 32) + (cross >> 32);
}

// Outputs made with at::empty start as this pattern, so an element no thread writes shows.
constexpr int64_t kUnwritten = 0x5A5A5A5A5A5A5A5ALL;

at::Tensor emu_empty(at::IntArrayRef size, at::TensorOptions options) {
  at::Tensor t = at::empty(size, options);
  if (t.scalar_type() == at::kLong) t.fill_(kUnwritten);
  else t.fill_(1);
  return t;
}

// kernel<<<grid, block, shmem, stream>>>(args...): the launch limits of a GPU, then every thread.
template <typename G, typename B, typename... P, typename... A>
void emu_launch(G grid, B block, int64_t shmem, void* /*stream*/, void (*kernel)(P...), A... args) {
  const int64_t blocks = static_cast<int64_t>(grid), threads = static_cast<int64_t>(block);
  if (blocks < 1 || blocks > std::numeric_limits<int32_t>::max()) {
    throw std::runtime_error("emulator: grid of " + std::to_string(blocks) + " blocks");
  }
  if (threads < 32 || threads > 1024 || threads % 32 != 0 || shmem != 0) {
    throw std::runtime_error("emulator: bad block size or shared memory");
  }
  ++g_stats.launches;
  g_stats.threads += blocks * threads;
  g_stats.max_grid = std::max(g_stats.max_grid, blocks);
  std::vector<int64_t> order(blocks * threads);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), g_order_rng);
  gridDim = Dim3{static_cast<unsigned>(blocks)};
  blockDim = Dim3{static_cast<unsigned>(threads)};
  for (const int64_t i : order) {
    blockIdx = Dim3{static_cast<unsigned>(i / threads)};
    threadIdx = Dim3{static_cast<unsigned>(i % threads)};
    kernel(args...);
  }
}

}  // namespace

using cudaStream_t = void*;
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
namespace at::cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace at::cuda
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

#include "triple_index_emu_body.inc"

namespace {

std::vector<int64_t> triple_index_stats() {
  const Stats s = g_stats;
  g_stats = Stats{};
  return {s.launches, s.threads, s.max_grid, s.umul64hi};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gfmrag_emu, m) {
  // [launches, threads launched, largest grid, __umul64hi calls] since the last call.
  m.def("triple_index_stats() -> int[]", &triple_index_stats);
}
