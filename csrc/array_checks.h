// Value checks of index arrays, done once per array set.
//
// The kernels index memory with the values of the graph and triple-index arrays, so every op checks
// them (offsets start at 0, never decrease and end at the length they index; every id in range)
// before any kernel runs. That check reads every entry, and on CUDA it costs a device->host copy,
// so the ops remember the array sets that passed it and skip it for them afterwards.
//
// A set is recognised by each array's storage, data pointer, length, dtype and version counter.
// The storage is held by a weak reference, so its address cannot be taken by a new storage while
// it is remembered, and every in-place write bumps the version counter:
//   * a remembered set cannot go stale: written in place, it is checked again on its next use;
//   * it cannot be claimed by other arrays: a copy, however equal, has another storage (and is
//     checked once itself); nothing is passed through the op schemas, so nothing can be forged.
// Writes that bypass the version counter (`tensor.data`, NumPy or DLPack views, storage-level
// writes) are not seen. Inference tensors have no version counter: they are checked on every call.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace gfmrag_fast {

// What a set of arrays was checked as (the same tensors could pass one check and not the other).
enum class ArraySet : int { RelGraph = 0, TripleIndex = 1 };

// An offsets array [n + 1]: starts at 0, never decreases, ends at `total` (the length it indexes).
struct OffsetsCheck {
  const at::Tensor& offsets;
  const char* name;
  int64_t total;
  const char* total_name;  // e.g. "E"
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

// Whether `arrays` passed the value check of `set` and nothing has written to them since.
bool passed_value_check(ArraySet set, at::TensorList arrays);

// Remembers that `arrays` passed the value check of `set`, as they are now.
void remember_value_check(ArraySet set, at::TensorList arrays);

// Runs `check` (which raises on bad values) unless `arrays` passed it already.
template <typename F>
void check_values_once(ArraySet set, at::TensorList arrays, F&& check) {
  if (passed_value_check(set, arrays)) return;
  check();
  remember_value_check(set, arrays);
}

}  // namespace gfmrag_fast
