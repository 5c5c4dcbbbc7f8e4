// Schemas of the triple-sampling ops and their shared input check.
#include "triple_index.h"

#include "array_checks.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

namespace gfmrag_fast {

namespace {

// index = [keys, unique_ptr, unique_values, all_ptr, all_values, all_eids]
enum IndexField : int { kKeys = 0, kUniquePtr, kUniqueValues, kAllPtr, kAllValues, kAllEids, kNumIndexFields };

// Count, dtype, layout, device and lengths of the index arrays; every array must be on `device`.
void check_index_arrays(at::TensorList index, const at::Device& device, const char* op) {
  TORCH_CHECK_VALUE(index.size() == kNumIndexFields, op, ": triple index must hold 6 arrays (use TripleIndex), got ",
                    index.size());
  const struct {
    int field;
    const char* name;
    at::ScalarType dtype;
  } arrays[] = {{kKeys, "keys", at::kLong},          {kUniquePtr, "unique_ptr", at::kLong},
                {kUniqueValues, "unique_values", at::kInt}, {kAllPtr, "all_ptr", at::kLong},
                {kAllValues, "all_values", at::kInt},  {kAllEids, "all_eids", at::kInt}};
  for (const auto& a : arrays) {
    const at::Tensor& t = index[a.field];
    TORCH_CHECK_VALUE(t.dim() == 1 && t.scalar_type() == a.dtype && t.is_contiguous(), op,
                      ": triple index array ", a.name, " must be a contiguous 1-D ", a.dtype,
                      " tensor (use TripleIndex)");
    TORCH_CHECK_VALUE(t.device() == device, op, ": triple index array ", a.name, " is on ", t.device(),
                      " but triples are on ", device);
  }
  const int64_t num_keys = index[kKeys].size(0);
  TORCH_CHECK_VALUE(index[kUniquePtr].size(0) == num_keys + 1, op, ": triple index array unique_ptr has ",
                    index[kUniquePtr].size(0), " entries, expected one more than keys (", num_keys + 1, ")");
  TORCH_CHECK_VALUE(index[kAllPtr].size(0) == num_keys + 1, op, ": triple index array all_ptr has ",
                    index[kAllPtr].size(0), " entries, expected one more than keys (", num_keys + 1, ")");
  TORCH_CHECK_VALUE(index[kAllValues].size(0) == index[kAllEids].size(0), op,
                    ": triple index arrays all_values and all_eids must have the same length, got ",
                    index[kAllValues].size(0), " and ", index[kAllEids].size(0));
}

// Offsets from 0 to the length of the values they index, never decreasing; node ids >= 0; edge
// ids in [0, E). Reads every entry. Keys need no check: they are only compared.
void check_index_values(at::TensorList index, const char* op) {
  const int64_t num_unique = index[kUniqueValues].size(0), num_edges = index[kAllEids].size(0);
  constexpr int64_t kNodeBound = int64_t{1} << 31;
  const OffsetsCheck offsets[] = {{index[kUniquePtr], "unique_ptr", num_unique, "len(unique_values)"},
                                  {index[kAllPtr], "all_ptr", num_edges, "len(all_values)"}};
  const IdsCheck ids[] = {{index[kUniqueValues], "unique_values", kNodeBound, "node ids", "2**31"},
                          {index[kAllValues], "all_values", kNodeBound, "node ids", "2**31"},
                          {index[kAllEids], "all_eids", num_edges, "edge ids", "E"}};
  check_array_values(op, "triple index array", offsets, ids, " (build the index with TripleIndex)");
}

TripleIndexView check_index(const at::Tensor& triples, at::TensorList index, const char* op) {
  TORCH_CHECK_VALUE(triples.dim() == 2 && triples.size(1) == 3 && triples.scalar_type() == at::kLong,
                    op, ": triples must be an int64 tensor of shape [B, 3] (rows h, t, r), got ",
                    triples.scalar_type(), " ", triples.sizes());
  TORCH_CHECK_VALUE(triples.is_contiguous(), op, ": triples must be contiguous");
  check_index_arrays(index, triples.device(), op);
  check_values_once(ArraySet::TripleIndex, index, [&] { check_index_values(index, op); });
  return {index[kKeys].data_ptr<int64_t>(),    index[kUniquePtr].data_ptr<int64_t>(),
          index[kUniqueValues].data_ptr<int32_t>(), index[kAllPtr].data_ptr<int64_t>(),
          index[kAllValues].data_ptr<int32_t>(), index[kAllEids].data_ptr<int32_t>(),
          index[kKeys].size(0)};
}

void check_num_relations(int64_t num_relations, const char* op) {
  TORCH_CHECK_VALUE(num_relations > 0 && num_relations % 2 == 0, op,
                    ": num_relations counts direct and inverse relations and must be even and positive, got ",
                    num_relations);
}

}  // namespace

TripleIndexView check_negative_sampling_inputs(const at::Tensor& triples, at::TensorList index, int64_t num_nodes,
                                               int64_t num_relations, int64_t num_negative, const at::Tensor& seed) {
  const TripleIndexView view = check_index(triples, index, "negative_sampling");
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong && seed.numel() == 1, "negative_sampling: seed must be a "
                    "one-element int64 tensor, got ", seed.scalar_type(), " ", seed.sizes());
  TORCH_CHECK_VALUE(seed.device() == triples.device(), "negative_sampling: seed is on ", seed.device(),
                    " but triples are on ", triples.device());
  TORCH_CHECK_VALUE(num_negative > 0, "negative_sampling: num_negative must be positive, got ", num_negative);
  TORCH_CHECK_VALUE(num_nodes > 0, "negative_sampling: num_nodes must be positive, got ", num_nodes);
  check_num_relations(num_relations, "negative_sampling");
  return view;
}

TripleIndexView check_easy_edge_mask_inputs(const at::Tensor& triples, at::TensorList index, int64_t num_edges,
                                            int64_t num_relations) {
  const TripleIndexView view = check_index(triples, index, "easy_edge_mask");
  TORCH_CHECK_VALUE(num_edges == index[kAllEids].size(0), "easy_edge_mask: num_edges = ", num_edges,
                    " but the triple index holds ", index[kAllEids].size(0), " edges");
  check_num_relations(num_relations, "easy_edge_mask");
  return view;
}

TORCH_LIBRARY_FRAGMENT(gfmrag_fast, m) {
  // index = [keys, unique_ptr, unique_values, all_ptr, all_values, all_eids] (see triple_index.h).
  // Returns [B, 1 + K, 3] int64: row 0 the positive; the first B // 2 triples get corrupted tails,
  // the others corrupted heads. seed: one int64 on the triples' device; sample k of triple b is
  // drawn from random64(seed, b * K + k), so a seed gives the same samples on every device.
  m.def(
      "negative_sampling(Tensor triples, Tensor[] index, int num_nodes, int num_relations, "
      "int num_negative, bool strict, Tensor seed) -> Tensor");
  // [num_edges] bool: True for every edge (h, t, r) and (t, h, r + num_relations / 2) of the rows.
  m.def("easy_edge_mask(Tensor triples, Tensor[] index, int num_edges, int num_relations) -> Tensor");
}

}  // namespace gfmrag_fast
