// Memory for the large CPU outputs of the ops (rel_aggregate's output and gradients).
//
// A fresh buffer costs a page fault and the OS's zeroing per page on first write: for the 40 MB
// output of rel_aggregate's forward at B = 8 on a 2-core machine that took longer than the kernel
// itself (21 ms against 8 ms with reused memory, issue 11). So outputs of 4 MiB or more come from
// a small cache: a buffer whose tensor dies is kept, up to a limit (256 MiB in all by default), for
// the next output of the same size; new buffers are 2 MiB-aligned and asked to be backed by transparent huge pages
// (where the OS's THP setting allows it). The tensors are ordinary (resizable, CPU) tensors.
// The limit is set at run time (op output_cache_limit; in Python gfmrag_fast.ops.set_output_cache,
// which also reads GFMRAG_FAST_OUTPUT_CACHE_MB); 0 turns the cache off: outputs are then plain
// at::empty tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace gfmrag_fast {

// An uninitialised tensor; on the CPU, from the cache above when it is large. Any other device:
// at::empty.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Sets the cache's limit to `megabytes` MiB (0: off), freeing kept buffers beyond it.
void set_output_cache_limit(int64_t megabytes);

// [limit in bytes, bytes kept, buffers kept].
std::vector<int64_t> output_cache_stats();

}  // namespace gfmrag_fast
