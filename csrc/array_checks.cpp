// Value checks of index arrays and their marks (see array_checks.h).
#include "array_checks.h"

#include "triple_index.h"  // mix64

#include <ATen/ops/aminmax.h>
#include <ATen/ops/any.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/lt.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <random>
#include <vector>

namespace gfmrag_fast {

namespace {

uint64_t process_key() {
  static const uint64_t key = [] {
    std::random_device device;
    const uint64_t high = device(), low = device();
    return mix64((high << 32) ^ low ^ reinterpret_cast<uintptr_t>(&device));
  }();
  return key;
}

at::Tensor as_long(const at::Tensor& t) { return t.reshape({1}).to(at::kLong); }

}  // namespace

int64_t mark_of(at::TensorList arrays) {
  uint64_t h = mix64(process_key() ^ arrays.size());
  for (const at::Tensor& t : arrays) {
    if (!t.defined() || t.is_inference()) return kNoMark;
    const uint64_t device = (static_cast<uint64_t>(t.device().type()) << 16) ^
                            (static_cast<uint64_t>(static_cast<uint8_t>(t.device().index())) << 8) ^
                            static_cast<uint64_t>(t.scalar_type());
    h = mix64(h ^ device);
    h = mix64(h ^ static_cast<uint64_t>(reinterpret_cast<uintptr_t>(t.const_data_ptr())));
    h = mix64(h ^ static_cast<uint64_t>(t.numel()));
    h = mix64(h ^ static_cast<uint64_t>(t._version()));
  }
  const auto mark = static_cast<int64_t>(h);
  return mark == kNoMark ? 1 : mark;
}

bool carries_mark(at::TensorList arrays, int64_t mark) {
  return mark != kNoMark && mark == mark_of(arrays);
}

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

}  // namespace gfmrag_fast
