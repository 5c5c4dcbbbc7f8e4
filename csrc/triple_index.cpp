// Schemas of the triple-sampling ops and their shared input check.
#include "triple_index.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

namespace gfmrag_fast {

void check_triple_index(const at::Tensor& keys, const at::Tensor& unique_ptr, const at::Tensor& unique_values,
                        const at::Tensor& all_ptr, const at::Tensor& all_values, const at::Tensor& all_eids,
                        const at::Tensor& triples, const char* op) {
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
