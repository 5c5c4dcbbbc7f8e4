// Schemas of the triple-sampling ops and their shared input check.
#include "triple_index.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

namespace gfmrag_fast {

namespace {

// index = [keys, unique_ptr, unique_values, all_ptr, all_values, all_eids]
TripleIndexView check_index(const at::Tensor& triples, at::TensorList index, const char* op) {
  TORCH_CHECK_VALUE(index.size() == 6, op, ": triple index must hold 6 arrays (use TripleIndex), got ",
                    index.size());
  const at::Tensor &keys = index[0], &unique_ptr = index[1], &unique_values = index[2], &all_ptr = index[3],
                   &all_values = index[4], &all_eids = index[5];
  TORCH_CHECK_VALUE(triples.dim() == 2 && triples.size(1) == 3 && triples.scalar_type() == at::kLong,
                    op, ": triples must be an int64 tensor of shape [B, 3] (rows h, t, r), got ",
                    triples.scalar_type(), " ", triples.sizes());
  TORCH_CHECK_VALUE(triples.is_contiguous(), op, ": triples must be contiguous");
  const struct {
    const at::Tensor& t;
    const char* name;
    at::ScalarType dtype;
  } arrays[] = {{keys, "keys", at::kLong},          {unique_ptr, "unique_ptr", at::kLong},
                {unique_values, "unique_values", at::kInt}, {all_ptr, "all_ptr", at::kLong},
                {all_values, "all_values", at::kInt},  {all_eids, "all_eids", at::kInt}};
  for (const auto& a : arrays) {
    TORCH_CHECK_VALUE(a.t.dim() == 1 && a.t.scalar_type() == a.dtype && a.t.is_contiguous(), op,
                      ": triple index array ", a.name, " must be a contiguous 1-D ", a.dtype,
                      " tensor (use TripleIndex)");
    TORCH_CHECK_VALUE(a.t.device() == triples.device(), op, ": triple index array ", a.name, " is on ",
                      a.t.device(), " but triples are on ", triples.device());
  }
  TORCH_CHECK_VALUE(unique_ptr.size(0) == keys.size(0) + 1 && all_ptr.size(0) == keys.size(0) + 1, op,
                    ": triple index pointers must have one more entry than keys");
  TORCH_CHECK_VALUE(all_values.size(0) == all_eids.size(0), op,
                    ": triple index all_values and all_eids must have the same length");
  return {keys.data_ptr<int64_t>(),    unique_ptr.data_ptr<int64_t>(), unique_values.data_ptr<int32_t>(),
          all_ptr.data_ptr<int64_t>(), all_values.data_ptr<int32_t>(), all_eids.data_ptr<int32_t>(),
          keys.size(0)};
}

void check_num_relations(int64_t num_relations, const char* op) {
  TORCH_CHECK_VALUE(num_relations > 0 && num_relations % 2 == 0, op,
                    ": num_relations counts direct and inverse relations and must be even and positive, got ",
                    num_relations);
}

}  // namespace

TripleIndexView check_negative_sampling_inputs(const at::Tensor& triples, at::TensorList index, int64_t num_nodes,
                                               int64_t num_relations, int64_t num_negative) {
  const TripleIndexView view = check_index(triples, index, "negative_sampling");
  TORCH_CHECK_VALUE(num_negative > 0, "negative_sampling: num_negative must be positive, got ", num_negative);
  TORCH_CHECK_VALUE(num_nodes > 0, "negative_sampling: num_nodes must be positive, got ", num_nodes);
  check_num_relations(num_relations, "negative_sampling");
  return view;
}

TripleIndexView check_easy_edge_mask_inputs(const at::Tensor& triples, at::TensorList index, int64_t num_edges,
                                            int64_t num_relations) {
  const TripleIndexView view = check_index(triples, index, "easy_edge_mask");
  TORCH_CHECK_VALUE(num_edges == index[5].size(0), "easy_edge_mask: num_edges = ", num_edges,
                    " but the triple index holds ", index[5].size(0), " edges");
  check_num_relations(num_relations, "easy_edge_mask");
  return view;
}

TORCH_LIBRARY_FRAGMENT(gfmrag_fast, m) {
  // index = [keys, unique_ptr, unique_values, all_ptr, all_values, all_eids] (see triple_index.h).
  // Returns [B, 1 + K, 3] int64: row 0 the positive; the first B // 2 triples get corrupted tails,
  // the others corrupted heads.
  m.def(
      "negative_sampling(Tensor triples, Tensor[] index, int num_nodes, int num_relations, "
      "int num_negative, bool strict, int seed) -> Tensor");
  // [num_edges] bool: True for every edge (h, t, r) and (t, h, r + num_relations / 2) of the rows.
  m.def("easy_edge_mask(Tensor triples, Tensor[] index, int num_edges, int num_relations) -> Tensor");
}

}  // namespace gfmrag_fast
