// The gfmrag_emu op library: schemas of the emulated kernels (registered for the CPU key by each
// build/emu_<name>.cpp) and the emulator's own controls.
#include "emu_runtime.h"

#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

std::vector<int64_t> emu_stats() {
  std::vector<int64_t> r{g_vec_access.load(), g_scalar_access.load(), g_launched_threads, g_max_block};
  g_vec_access = 0; g_scalar_access = 0; g_launched_threads = 0; g_max_block = 0;
  return r;
}
void emu_max_grid(int64_t n) { g_max_grid_blocks = n; }

// Per kernel (the Kernel enum's order): groups, most visits of one group, all visits counted since
// the last call; counting goes on while keep_counting.
at::Tensor emu_visits(bool keep_counting) {
  at::Tensor r = at::zeros({4, 3}, at::kLong);
  int64_t* v = r.mutable_data_ptr<int64_t>();
  const std::lock_guard<std::mutex> lock(g_visit_mutex);
  for (const auto& [key, visits] : g_visits) {
    int64_t* k = v + std::get<0>(key) * 3;
    k[0] += 1;
    k[1] = std::max(k[1], visits);
    k[2] += visits;
  }
  g_visits.clear();
  g_count_visits = keep_counting;
  return r;
}

TORCH_LIBRARY(gfmrag_emu, m) {
  m.def("stats() -> int[]", &emu_stats);
  m.def("set_max_grid(int n) -> ()", &emu_max_grid);
  m.def("visits(bool keep_counting) -> Tensor", &emu_visits);
  m.def("rel_aggregate(Tensor x, Tensor relation, Tensor[] graph, Tensor? edge_weight, Tensor? edge_mask, str message, str aggregate, bool node_major=False) -> (Tensor, Tensor)");
  m.def("rel_aggregate_backward_x(Tensor grad_out, Tensor x, Tensor relation, Tensor aux, Tensor[] graph, Tensor? edge_weight, Tensor? edge_mask, str message, str aggregate, bool node_major=False) -> Tensor");
  m.def("rel_aggregate_backward_relation(Tensor grad_out, Tensor x, Tensor relation, Tensor aux, Tensor[] graph, Tensor? edge_weight, Tensor? edge_mask, str message, str aggregate, bool node_major=False) -> Tensor");
  m.def("rel_aggregate_backward_edge_weight(Tensor grad_out, Tensor x, Tensor relation, Tensor aux, Tensor[] graph, Tensor? edge_weight, Tensor? edge_mask, str message, str aggregate, bool node_major=False) -> Tensor");
  m.def("dense_tail_norm(Tensor h, Tensor? x, Tensor? bias, Tensor? ln_weight, Tensor? ln_bias, float eps) -> (Tensor, Tensor)");
  m.def("dense_tail_norm_backward(Tensor grad_out, Tensor h, Tensor stats, Tensor? bias, Tensor? ln_weight, Tensor? ln_bias, bool copy_grad_out=False) -> (Tensor, Tensor, Tensor)");
}
