// Host emulation of the CUDA kernels: one std::thread per lane, warps run one at a time.
// Included by every emulated .cu (build.py writes them as build/emu_<name>.cpp); the counters are
// inline variables, shared by all of them.
#pragma once
#include <barrier>
#include <thread>
#include <vector>
#include <cstdint>
#include <stdexcept>
#include <ATen/core/Tensor.h>
#include <optional>
#define __global__
#define __device__
#define __forceinline__ inline
struct dim3 { unsigned x, y, z; dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {} };
struct uint3_ { unsigned x = 0, y = 0, z = 0; };
inline thread_local uint3_ blockIdx, threadIdx;
inline thread_local dim3 blockDim, gridDim;
#include <atomic>
inline std::atomic<long> g_vec_access{0}, g_scalar_access{0};
inline long g_max_block = 0;
// The grid-size cap of the kernels (kMaxGridBlocks), settable to exercise their grid-stride loops.
inline int64_t g_max_grid_blocks = 2147483647;
using cudaStream_t = void*;
namespace at { namespace cuda {
struct OptionalCUDAGuard { template <class T> explicit OptionalCUDAGuard(T&&) {} };
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}}
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline double __dadd_rn(double a, double b) { volatile double r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline double __dsub_rn(double a, double b) { volatile double r = a - b; return r; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline double __dmul_rn(double a, double b) { volatile double r = a * b; return r; }
struct WarpCtx { std::barrier<>* bar; double vals[32]; };
inline thread_local WarpCtx* warp_ctx = nullptr;
inline long g_launched_threads = 0;
template <typename T>
T __shfl_down_sync(unsigned mask, T v, int offset) {
  if (mask != 0xffffffffu) throw std::runtime_error("mask");
  const int lane = threadIdx.x % 32;
  warp_ctx->vals[lane] = static_cast<double>(v);
  warp_ctx->bar->arrive_and_wait();
  T r = lane + offset < 32 ? static_cast<T>(warp_ctx->vals[lane + offset]) : v;
  warp_ctx->bar->arrive_and_wait();
  return r;
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int offset) {
  if (mask != 0xffffffffu) throw std::runtime_error("mask");
  const int lane = threadIdx.x % 32;
  warp_ctx->vals[lane] = static_cast<double>(v);
  warp_ctx->bar->arrive_and_wait();
  T r = static_cast<T>(warp_ctx->vals[lane ^ offset]);
  warp_ctx->bar->arrive_and_wait();
  return r;
}
template <typename... P, typename... A>
void emu_launch(dim3 grid, int block, int shmem, cudaStream_t, void (*k)(P...), A... args) {
  if (grid.x == 0 || block % 32 || block > 1024 || shmem != 0) throw std::runtime_error("bad launch");
  if (block > g_max_block) g_max_block = block;
  for (unsigned bx = 0; bx < grid.x; ++bx) {
    for (int w = 0; w < block / 32; ++w) {
      std::barrier<> bar(32);
      WarpCtx ctx{&bar, {}};
      std::vector<std::thread> ts;
      for (int lane = 0; lane < 32; ++lane) {
        ts.emplace_back([&, lane] {
          blockIdx.x = bx; threadIdx.x = w * 32 + lane; blockDim = dim3(block); gridDim = grid; warp_ctx = &ctx;
          k(args...);
          // A lane that leaves early must stop being counted so the others do not hang.
          bar.arrive_and_drop();
        });
      }
      for (auto& t : ts) t.join();
      g_launched_threads += 32;
    }
  }
}
// Edge visits of every thread group, counted while the kernels run (rel_aggregate_kernels.h's
// hooks) for comparison with the balance report: per (kernel, pass, group), while enabled.
#include <map>
#include <mutex>
#include <tuple>
inline std::mutex g_visit_mutex;
inline std::map<std::tuple<int, int, int64_t>, int64_t> g_visits;
inline bool g_count_visits = false;
inline void emu_count(int kernel, int pass, int64_t item, int64_t visits) {
  if (!g_count_visits) return;
  const std::lock_guard<std::mutex> lock(g_visit_mutex);
  g_visits[{kernel, pass, item}] += visits;
}
#define GFMRAG_FAST_CUDA_EMULATOR 1  // run the CUDA kernels' edge loop (rel_aggregate_kernels.h), not the CPU's
#define GFMRAG_FAST_COUNT_GROUP(kernel, pass, item) emu_count(static_cast<int>(kernel), static_cast<int>(pass), item, 0)
#define GFMRAG_FAST_COUNT_VISIT(kernel, pass, item) emu_count(static_cast<int>(kernel), static_cast<int>(pass), item, 1)
