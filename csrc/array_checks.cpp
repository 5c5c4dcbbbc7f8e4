// Value checks of index arrays, done once per array set (see array_checks.h).
#include "array_checks.h"

#include <ATen/ops/aminmax.h>
#include <ATen/ops/any.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/lt.h>
#include <ATen/ops/zeros.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/Exception.h>
#include <c10/util/intrusive_ptr.h>

#include <functional>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace gfmrag_fast {

namespace {

at::Tensor as_long(const at::Tensor& t) { return t.reshape({1}).to(at::kLong); }

// One array of a remembered set, as it was when it passed.
struct ArrayState {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  int64_t numel;
  at::ScalarType dtype;
  int64_t version;

  bool matches(const at::Tensor& t) const {
    return storage._unsafe_get_target() == t.storage().unsafeGetStorageImpl() && data == t.const_data_ptr() &&
           numel == t.numel() && dtype == t.scalar_type() && version == t._version();
  }
};

bool rememberable(at::TensorList arrays) {
  for (const at::Tensor& t : arrays) {
    if (!t.defined() || t.is_inference() || !t.has_storage()) return false;
  }
  return true;
}

// Where a set is filed: its arrays' storages and layout, not their versions (a set written in
// place is found, then fails ArrayState::matches).
size_t key_of(ArraySet set, at::TensorList arrays) {
  size_t h = std::hash<int>()(static_cast<int>(set)) ^ arrays.size();
  for (const at::Tensor& t : arrays) {
    for (size_t v : {reinterpret_cast<size_t>(t.storage().unsafeGetStorageImpl()),
                     reinterpret_cast<size_t>(t.const_data_ptr()), static_cast<size_t>(t.numel())}) {
      h ^= v + 0x9E3779B97F4A7C15ULL + (h << 6) + (h >> 2);
    }
  }
  return h;
}

struct Registry {
  std::mutex mutex;
  std::unordered_map<size_t, std::vector<ArrayState>> sets;
};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: ops may run during interpreter exit
  return *r;
}

}  // namespace

void check_array_values(const char* op, const char* kind, c10::ArrayRef<OffsetsCheck> offsets,
                        c10::ArrayRef<IdsCheck> ids, const char* hint) {
  // Per offsets array: first, last, whether it decreases; per non-empty id array: min, max.
  std::vector<at::Tensor> stats;
  for (const OffsetsCheck& c : offsets) {
    const at::Tensor& p = c.offsets;
    const int64_t n = p.size(0);
    TORCH_CHECK_VALUE(n >= 1, op, ": ", kind, " ", c.name, " must hold at least one offset", hint);
    stats.push_back(as_long(p.narrow(0, 0, 1)));
    stats.push_back(as_long(p.narrow(0, n - 1, 1)));
    stats.push_back(n > 1 ? as_long(at::lt(p.narrow(0, 1, n - 1), p.narrow(0, 0, n - 1)).any())
                          : at::zeros({1}, p.options().dtype(at::kLong)));
  }
  for (const IdsCheck& c : ids) {
    if (c.ids.numel() == 0) continue;
    const auto [lo, hi] = at::aminmax(c.ids);
    stats.push_back(as_long(lo));
    stats.push_back(as_long(hi));
  }
  if (stats.empty()) return;
  const at::Tensor host = at::cat(stats).to(at::kCPU);
  const int64_t* v = host.const_data_ptr<int64_t>();
  for (const OffsetsCheck& c : offsets) {
    const int64_t first = v[0], last = v[1], decreases = v[2];
    v += 3;
    TORCH_CHECK_VALUE(first == 0, op, ": ", kind, " ", c.name, " must start at 0, got ", first, hint);
    TORCH_CHECK_VALUE(decreases == 0, op, ": ", kind, " ", c.name, " holds offsets that decrease", hint);
    TORCH_CHECK_VALUE(last == c.total, op, ": ", kind, " ", c.name, " must end at ", c.total_name, " = ", c.total,
                      ", got ", last, hint);
  }
  for (const IdsCheck& c : ids) {
    if (c.ids.numel() == 0) continue;
    const int64_t lo = v[0], hi = v[1];
    v += 2;
    TORCH_CHECK_VALUE(lo >= 0 && hi < c.bound, op, ": ", kind, " ", c.name, " holds values in [", lo, ", ", hi,
                      "], expected ", c.what, " in [0, ", c.bound_name, " = ", c.bound, ")", hint);
  }
}

bool passed_value_check(ArraySet set, at::TensorList arrays) {
  if (!rememberable(arrays)) return false;
  const size_t key = key_of(set, arrays);
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mutex);
  const auto it = r.sets.find(key);
  if (it == r.sets.end() || it->second.size() != arrays.size()) return false;
  for (size_t i = 0; i < arrays.size(); ++i) {
    if (!it->second[i].matches(arrays[i])) return false;
  }
  return true;
}

void remember_value_check(ArraySet set, at::TensorList arrays) {
  if (!rememberable(arrays)) return;
  std::vector<ArrayState> states;
  states.reserve(arrays.size());
  for (const at::Tensor& t : arrays) {
    states.push_back({c10::weak_intrusive_ptr<c10::StorageImpl>(t.storage().getWeakStorageImpl()),
                      t.const_data_ptr(), t.numel(), t.scalar_type(), t._version()});
  }
  const size_t key = key_of(set, arrays);
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mutex);
  // Forget sets whose arrays are gone, so that the registry holds only live ones.
  for (auto it = r.sets.begin(); it != r.sets.end();) {
    bool gone = false;
    for (const ArrayState& s : it->second) gone = gone || s.storage.expired();
    it = gone ? r.sets.erase(it) : std::next(it);
  }
  r.sets[key] = std::move(states);
}

}  // namespace gfmrag_fast
