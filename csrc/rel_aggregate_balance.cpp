// The work-balance report of the rel_aggregate kernels: how many edges each thread group of the
// CUDA launches visits, read from the same plan and work shapes as the launches themselves
// (rel_aggregate_kernels.h). gfmrag_fast.ops.balance prints it.
#include "rel_aggregate_kernels.h"

#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>

namespace gfmrag_fast {
namespace {

// Per kernel (Kernel order), int64: thread groups, most edge visits of one group (its batch loop
// counted), all groups' edge visits, most partials one group folds.
enum BalanceColumn : int { kGroups = 0, kMaxVisits, kTotalVisits, kMaxFolds, kNumBalanceColumns };

at::Tensor rel_aggregate_balance(at::TensorList graph, int64_t batch, bool per_query) {
  TORCH_CHECK_VALUE(batch >= 1, "rel_aggregate_balance: batch must be >= 1, got ", batch);
  const int64_t num_edges = check_graph(graph, at::Device(at::kCPU));
  at::Tensor report = at::zeros({kNumKernels, kNumBalanceColumns}, at::kLong);
  int64_t* out = report.mutable_data_ptr<int64_t>();
  for (Kernel kernel : {Kernel::Forward, Kernel::GradX, Kernel::GradRelation}) {
    const WorkShape shape = work_shape(kernel, batch, per_query);
    const ListPlan plan = list_plan(graph, list_of(kernel));
    int64_t* k = out + static_cast<int>(kernel) * kNumBalanceColumns;
    auto visit = [&](EdgeRange range, int64_t folds) {
      const int64_t visits = std::max<int64_t>(0, range.end - range.begin) * shape.batch_loop;
      k[kMaxVisits] = std::max(k[kMaxVisits], visits);
      k[kTotalVisits] += visits * shape.groups_per_row;
      k[kMaxFolds] = std::max(k[kMaxFolds], folds);
    };
    for (int64_t p = 0; p < plan.pieces; ++p) visit(piece_edges(plan, p), 0);
    for (int64_t r = 0; r < plan.rows; ++r) {
      if (walked_whole(plan, r)) visit(row_edges(plan, r), 0);
      else visit({0, 0}, plan.piece_ptr[r + 1] - plan.piece_ptr[r]);
    }
    k[kGroups] = pass_groups(plan, shape, Pass::Pieces) + pass_groups(plan, shape, Pass::Rows);
  }
  int64_t* k = out + static_cast<int>(Kernel::GradEdgeWeight) * kNumBalanceColumns;
  const WorkShape shape = work_shape(Kernel::GradEdgeWeight, batch, per_query);
  k[kGroups] = num_edges;
  k[kMaxVisits] = num_edges > 0 ? shape.batch_loop : 0;
  k[kTotalVisits] = num_edges * shape.batch_loop;
  return report;
}

}  // namespace

TORCH_LIBRARY_IMPL(gfmrag_fast, CPU, m) { m.impl("rel_aggregate_balance", &rel_aggregate_balance); }

}  // namespace gfmrag_fast
