// Memory for the large CPU outputs of the ops (rel_aggregate's output and gradients).
//
// A fresh buffer costs a page fault and the OS's zeroing per page on first write: for the 40 MB
// output of rel_aggregate's forward at B = 8 on a 2-core machine that took longer than the kernel
// itself (21 ms against 8 ms with reused memory, issue 11). So outputs of 4 MiB or more come from
// a small cache: a buffer whose tensor dies is kept, up to 256 MiB in all, for the next output of
// the same size; new buffers are 2 MiB-aligned and asked to be backed by transparent huge pages
// (where the OS's THP setting allows it). The tensors are ordinary (resizable, CPU) tensors.
#pragma once

#include <ATen/core/Tensor.h>

namespace gfmrag_fast {

// An uninitialised tensor; on the CPU, from the cache above when it is large. Any other device:
// at::empty.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace gfmrag_fast
