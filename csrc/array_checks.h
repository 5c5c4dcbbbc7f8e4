// Value checks of index arrays, and the marks that let validated arrays skip them.
//
// The kernels index memory with the values of the graph and triple-index arrays, so every op checks
// them (offsets start at 0, never decrease and end at the length they index; every id is in range)
// before any kernel runs. That check reads every entry, and on CUDA it costs a device->host copy,
// so the Python classes that build the arrays (RelGraph, TripleIndex) have them checked once by a
// *_mark op and pass the returned mark with every call; an op skips the value check when the mark
// matches the arrays it receives.
//
// A mark is a keyed hash of each array's device, dtype, address, length and version counter, the
// key drawn at random when the library is loaded:
//   * it cannot go stale: writing to an array in place bumps its version counter, and replacing it
//     changes its address, so the old mark no longer matches and the op checks the values again;
//   * it cannot be forged by accident: only the *_mark ops compute it, after checking, and any
//     other value matches with probability 2^-64.
// Writes that bypass the version counter (`tensor.data`, NumPy or DLPack views) are not seen.
// Inference tensors have no version counter: they are never marked (always checked).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace gfmrag_fast {

// The value an unmarked call passes (the schemas' default).
constexpr int64_t kNoMark = 0;

// The mark of `arrays` as they are now; kNoMark when one of them cannot be marked.
int64_t mark_of(at::TensorList arrays);

// Whether `mark` is the mark of `arrays` as they are now (never true for kNoMark).
bool carries_mark(at::TensorList arrays, int64_t mark);

// An offsets array [n + 1]: starts at 0, never decreases, ends at `total` (the length it indexes).
struct OffsetsCheck {
  const at::Tensor& offsets;
  const char* name;
  int64_t total;
  const char* total_name;
};

// An id array whose values must lie in [0, bound).
struct IdsCheck {
  const at::Tensor& ids;
  const char* name;
  int64_t bound;
  const char* what;        // e.g. "node ids"
  const char* bound_name;  // e.g. "N"
};

// Raises a ValueError naming the first array that breaks its rule, as "<op>: <kind> <name> ...
// <hint>". Integer arrays, all on one device; one device->host copy in all.
void check_array_values(const char* op, const char* kind, c10::ArrayRef<OffsetsCheck> offsets,
                        c10::ArrayRef<IdsCheck> ids, const char* hint);

}  // namespace gfmrag_fast
