// Hot CPU loops compiled twice on x86-64 GCC, for AVX2 and for the baseline, the one to run picked
// when the library loads. AVX2 without FMA: vector width changes no result, and products are never
// fused into sums, so the rounding stays the CUDA kernels'.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GFMRAG_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define GFMRAG_CPU_CLONES
#endif

// For lambdas called inside such a function: always inlined, so that they are compiled for the
// target of each clone (they hold the channel loops that should vectorise).
#define GFMRAG_INLINE_LAMBDA __attribute__((always_inline))
