// a + b, a - b and a * b each rounded once, identically on the CPU and the GPU.
//
// nvcc contracts `a * b + c` into one fused multiply-add unless the operations go through the
// _rn intrinsics; the CPU files are compiled without contraction. Kernels whose CPU and CUDA
// versions must agree bit for bit (rel_aggregate, dense_tail) do their float arithmetic through
// these, so every operation rounds the same on both sides.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace gfmrag_fast {

#ifdef __CUDA_ARCH__
C10_HOST_DEVICE inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
C10_HOST_DEVICE inline double add_rn(double a, double b) { return __dadd_rn(a, b); }
C10_HOST_DEVICE inline float sub_rn(float a, float b) { return __fsub_rn(a, b); }
C10_HOST_DEVICE inline double sub_rn(double a, double b) { return __dsub_rn(a, b); }
C10_HOST_DEVICE inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
C10_HOST_DEVICE inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }
#else
template <typename T>
C10_HOST_DEVICE inline T add_rn(T a, T b) { return a + b; }
template <typename T>
C10_HOST_DEVICE inline T sub_rn(T a, T b) { return a - b; }
template <typename T>
C10_HOST_DEVICE inline T mul_rn(T a, T b) { return a * b; }
#endif

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace gfmrag_fast
