// Schemas of the rel_aggregate op family and the one input check every kernel shares.
#include "rel_aggregate.h"

#include "array_checks.h"
#include "output_buffers.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

#ifdef GFMRAG_FAST_PYTHON_MODULE
#include <Python.h>

extern "C" {
// The library only registers ops; importing it as a Python module is how setup.py's build gets
// loaded. The CMake build is loaded with torch.ops.load_library and needs no Python.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

namespace gfmrag_fast {

Message parse_message(std::string_view message) {
  if (message == "distmult") return Message::DistMult;
  if (message == "transe") return Message::TransE;
  TORCH_CHECK_VALUE(false, "rel_aggregate: message must be 'distmult' or 'transe', got '",
                    std::string(message), "'");
}

Aggregate parse_aggregate(std::string_view aggregate) {
  if (aggregate == "sum") return Aggregate::Sum;
  if (aggregate == "mean") return Aggregate::Mean;
  if (aggregate == "max") return Aggregate::Max;
  if (aggregate == "min") return Aggregate::Min;
  TORCH_CHECK_VALUE(false, "rel_aggregate: aggregate must be one of 'sum', 'mean', 'max', 'min', got '",
                    std::string(aggregate), "'");
}

namespace {

const char* kGraphFieldNames[kNumGraphFields] = {
    "dst_ptr",         "dst_src",        "dst_type",      "dst_eid",         "src_ptr",       "src_dst",
    "src_type",        "src_eid",        "rel_ptr",       "rel_eid",         "rel_src",       "rel_dst",
    "edge_src",        "edge_dst",       "edge_type",     "dst_piece_ptr",   "dst_piece_begin", "dst_piece_end",
    "src_piece_ptr",   "src_piece_begin", "src_piece_end", "rel_piece_ptr",  "rel_piece_begin", "rel_piece_end"};

void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), "rel_aggregate: ", name, " is on ", t.device(),
                    " but x is on ", x.device(), "; move both to the same device");
}

// What the prepared arrays describe: N = len(dst_ptr) - 1, R = len(rel_ptr) - 1, E = len(dst_src),
// and each edge list's number of pieces S = len(<list>_piece_begin).
struct GraphSizes {
  int64_t num_nodes;
  int64_t num_relations;
  int64_t num_edges;
  int64_t num_pieces[3];  // EdgeList order
};

// Count, dtype, layout, device and lengths of the graph arrays; every array must be on `device`.
GraphSizes check_graph_arrays(at::TensorList graph, const at::Device& device) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(graph.size()) == kNumGraphFields,
                    "rel_aggregate: graph must hold ", static_cast<int>(kNumGraphFields),
                    " prepared arrays (use RelGraph), got ", graph.size());
  for (int i = 0; i < kNumGraphFields; ++i) {
    const at::Tensor& t = graph[i];
    TORCH_CHECK_VALUE(t.dim() == 1 && t.scalar_type() == at::kInt && t.is_contiguous(),
                      "rel_aggregate: graph array ", kGraphFieldNames[i],
                      " must be a contiguous 1-D int32 tensor (use RelGraph)");
    TORCH_CHECK_VALUE(t.device() == device, "rel_aggregate: graph array ", kGraphFieldNames[i], " is on ",
                      t.device(), " but x is on ", device, "; use graph.to(x.device)");
  }
  for (int i : {kDstPtr, kSrcPtr, kRelPtr}) {
    TORCH_CHECK_VALUE(graph[i].size(0) >= 1, "rel_aggregate: graph array ", kGraphFieldNames[i],
                      " must hold at least one offset (use RelGraph)");
  }
  GraphSizes sizes{graph[kDstPtr].size(0) - 1, graph[kRelPtr].size(0) - 1, graph[kDstSrc].size(0), {}};
  auto check_length = [&](int i, int64_t expected, const char* what) {
    TORCH_CHECK_VALUE(graph[i].size(0) == expected, "rel_aggregate: graph array ", kGraphFieldNames[i], " has ",
                      graph[i].size(0), " entries, expected ", what, " = ", expected, " (use RelGraph)");
  };
  check_length(kSrcPtr, sizes.num_nodes + 1, "N + 1 (the length of dst_ptr)");
  for (int i : {kDstType, kDstEid, kSrcDst, kSrcType, kSrcEid, kRelEid, kRelSrc, kRelDst, kEdgeSrc, kEdgeDst,
                kEdgeType}) {
    check_length(i, sizes.num_edges, "E (the length of dst_src)");
  }
  const int64_t rows[3] = {sizes.num_nodes, sizes.num_nodes, sizes.num_relations};
  for (int l = 0; l < 3; ++l) {
    const int piece_ptr = kListPiecePtr[l];
    check_length(piece_ptr, rows[l] + 1, l == 2 ? "R + 1 (the length of rel_ptr)" : "N + 1 (the length of dst_ptr)");
    sizes.num_pieces[l] = graph[piece_ptr + 1].size(0);
    check_length(piece_ptr + 2, sizes.num_pieces[l], "the length of its piece_begin");
  }
  return sizes;
}

// Offsets from 0 to E, never decreasing; node, relation and edge ids in range. Reads every entry.
void check_graph_values(at::TensorList graph, const GraphSizes& s) {
  const int64_t N = s.num_nodes, R = s.num_relations, E = s.num_edges;
  const int64_t* S = s.num_pieces;
  const OffsetsCheck offsets[] = {{graph[kDstPtr], "dst_ptr", E, "E"},
                                  {graph[kSrcPtr], "src_ptr", E, "E"},
                                  {graph[kRelPtr], "rel_ptr", E, "E"},
                                  {graph[kDstPiecePtr], "dst_piece_ptr", S[0], "the number of pieces"},
                                  {graph[kSrcPiecePtr], "src_piece_ptr", S[1], "the number of pieces"},
                                  {graph[kRelPiecePtr], "rel_piece_ptr", S[2], "the number of pieces"}};
  const IdsCheck ids[] = {{graph[kDstSrc], "dst_src", N, "node ids", "N"},
                          {graph[kDstType], "dst_type", R, "relation ids", "R"},
                          {graph[kDstEid], "dst_eid", E, "edge ids", "E"},
                          {graph[kSrcDst], "src_dst", N, "node ids", "N"},
                          {graph[kSrcType], "src_type", R, "relation ids", "R"},
                          {graph[kSrcEid], "src_eid", E, "edge ids", "E"},
                          {graph[kRelEid], "rel_eid", E, "edge ids", "E"},
                          {graph[kRelSrc], "rel_src", N, "node ids", "N"},
                          {graph[kRelDst], "rel_dst", N, "node ids", "N"},
                          {graph[kEdgeSrc], "edge_src", N, "node ids", "N"},
                          {graph[kEdgeDst], "edge_dst", N, "node ids", "N"},
                          {graph[kEdgeType], "edge_type", R, "relation ids", "R"},
                          // A piece's [begin, end) lies in [0, E]; begin > end would walk nothing.
                          {graph[kDstPieceBegin], "dst_piece_begin", E + 1, "edge positions", "E + 1"},
                          {graph[kDstPieceEnd], "dst_piece_end", E + 1, "edge positions", "E + 1"},
                          {graph[kSrcPieceBegin], "src_piece_begin", E + 1, "edge positions", "E + 1"},
                          {graph[kSrcPieceEnd], "src_piece_end", E + 1, "edge positions", "E + 1"},
                          {graph[kRelPieceBegin], "rel_piece_begin", E + 1, "edge positions", "E + 1"},
                          {graph[kRelPieceEnd], "rel_piece_end", E + 1, "edge positions", "E + 1"}};
  check_array_values("rel_aggregate", "graph array", offsets, ids, " (build the graph with RelGraph)");
}

}  // namespace

int64_t check_graph(at::TensorList graph, const at::Device& device) {
  const GraphSizes sizes = check_graph_arrays(graph, device);
  check_values_once(ArraySet::RelGraph, graph, [&] { check_graph_values(graph, sizes); });
  return sizes.num_edges;
}

RelAggregateArgs check_rel_aggregate_inputs(const at::Tensor& x, const at::Tensor& relation,
                                            at::TensorList graph,
                                            const std::optional<at::Tensor>& edge_weight,
                                            const std::optional<at::Tensor>& edge_mask,
                                            std::string_view message, std::string_view aggregate,
                                            bool node_major) {
  RelAggregateArgs args{};
  args.message = parse_message(message);
  args.aggregate = parse_aggregate(aggregate);

  TORCH_CHECK_VALUE(x.dim() == 3, "rel_aggregate: x must have shape ", node_major ? "[N, B, d] (node_major)" : "[B, N, d]",
                    ", got ", x.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()),
                    "rel_aggregate: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.is_contiguous(), "rel_aggregate: x must be contiguous");
  args.node_major = node_major;
  args.batch = x.size(node_major ? 1 : 0);
  args.num_nodes = x.size(node_major ? 0 : 1);
  args.dim = x.size(2);
  args.node_stride = node_major ? args.batch * args.dim : args.dim;
  args.batch_stride = node_major ? args.dim : args.num_nodes * args.dim;

  TORCH_CHECK_VALUE(relation.dim() == 2 || relation.dim() == 3,
                    "rel_aggregate: relation must have shape [R, d] or [B, R, d], got ",
                    relation.sizes());
  check_same_device(relation, x, "relation");
  TORCH_CHECK_VALUE(relation.scalar_type() == x.scalar_type(), "rel_aggregate: relation has dtype ",
                    relation.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(relation.is_contiguous(), "rel_aggregate: relation must be contiguous");
  TORCH_CHECK_VALUE(relation.size(-1) == args.dim, "rel_aggregate: relation has last dimension ",
                    relation.size(-1), " but x has d = ", args.dim);
  args.per_query = relation.dim() == 3;
  if (args.per_query) {
    TORCH_CHECK_VALUE(relation.size(0) == args.batch, "rel_aggregate: per-query relation [B, R, d] has B = ",
                      relation.size(0), " but x has B = ", args.batch);
  }
  args.num_relations = relation.size(-2);

  const GraphSizes sizes = check_graph_arrays(graph, x.device());
  args.num_edges = sizes.num_edges;
  TORCH_CHECK_VALUE(sizes.num_nodes == args.num_nodes, "rel_aggregate: x has N = ", args.num_nodes,
                    " nodes but the graph has ", sizes.num_nodes, " (graph array dst_ptr has ",
                    sizes.num_nodes + 1, " entries)");
  TORCH_CHECK_VALUE(sizes.num_relations == args.num_relations, "rel_aggregate: relation has R = ",
                    args.num_relations, " rows but the graph has num_relations = ", sizes.num_relations,
                    " (graph array rel_ptr has ", sizes.num_relations + 1, " entries)");

  args.has_weight = edge_weight.has_value();
  if (args.has_weight) {
    const at::Tensor& w = *edge_weight;
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == args.num_edges,
                      "rel_aggregate: edge_weight must have shape [E] = [", args.num_edges, "], got ",
                      w.sizes());
    check_same_device(w, x, "edge_weight");
    TORCH_CHECK_VALUE(w.scalar_type() == x.scalar_type(), "rel_aggregate: edge_weight has dtype ",
                      w.scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK_VALUE(w.is_contiguous(), "rel_aggregate: edge_weight must be contiguous");
  }
  args.has_mask = edge_mask.has_value();
  if (args.has_mask) {
    const at::Tensor& m = *edge_mask;
    TORCH_CHECK_VALUE(m.dim() == 1 && m.size(0) == args.num_edges,
                      "rel_aggregate: edge_mask must have shape [E] = [", args.num_edges, "], got ",
                      m.sizes());
    check_same_device(m, x, "edge_mask");
    TORCH_CHECK_VALUE(m.scalar_type() == at::kBool, "rel_aggregate: edge_mask must be bool, got ",
                      m.scalar_type());
    TORCH_CHECK_VALUE(m.is_contiguous(), "rel_aggregate: edge_mask must be contiguous");
  }
  // Last, so that the cheap checks above answer first; once per graph (array_checks.h).
  check_values_once(ArraySet::RelGraph, graph, [&] { check_graph_values(graph, sizes); });
  return args;
}

namespace {

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& x) {
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "rel_aggregate backward: grad_out must have shape ",
                    x.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK_VALUE(grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(),
                    "rel_aggregate backward: grad_out must match x in dtype and device");
  TORCH_CHECK_VALUE(grad_out.is_contiguous(), "rel_aggregate backward: grad_out must be contiguous");
}

void check_aux(const at::Tensor& aux, at::IntArrayRef x_sizes, const RelAggregateArgs& args) {
  TORCH_CHECK_VALUE(aux.scalar_type() == at::kInt && aux.is_contiguous(),
                    "rel_aggregate backward: aux must be the contiguous int32 tensor the forward saved");
  switch (args.aggregate) {
    case Aggregate::Sum:
      break;
    case Aggregate::Mean:
      TORCH_CHECK_VALUE(aux.dim() == 1 && aux.size(0) == args.num_nodes,
                        "rel_aggregate backward: mean needs the in-degree aux of shape [N]");
      break;
    case Aggregate::Max:
    case Aggregate::Min:
      TORCH_CHECK_VALUE(aux.sizes() == x_sizes, "rel_aggregate backward: max/min need the arg aux, shaped like x (",
                        x_sizes, "), got ", aux.sizes());
      break;
  }
}

}  // namespace

RelAggregateArgs check_rel_aggregate_backward_inputs(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& relation, const at::Tensor& aux,
    at::TensorList graph, const std::optional<at::Tensor>& edge_weight,
    const std::optional<at::Tensor>& edge_mask, std::string_view message, std::string_view aggregate,
    bool node_major) {
  const RelAggregateArgs args =
      check_rel_aggregate_inputs(x, relation, graph, edge_weight, edge_mask, message, aggregate, node_major);
  check_grad_out(grad_out, x);
  check_aux(aux, x.sizes(), args);
  return args;
}

at::Tensor in_walk_order(const std::optional<at::Tensor>& edge_array, at::TensorList graph, EdgeList list) {
  if (!edge_array) return {};
  return at::index_select(*edge_array, 0, graph[kListEid[static_cast<int>(list)]]);
}

at::Tensor unmasked_in_degree(at::TensorList graph, const at::Tensor& mask_in_dst_order) {
  const at::Tensor& ptr = graph[kDstPtr];
  const int64_t n = ptr.size(0) - 1;
  if (!mask_in_dst_order.defined()) return at::sub(ptr.narrow(0, 1, n), ptr.narrow(0, 0, n));
  // kept[k]: unmasked edges among CSR positions < k; node v keeps kept[ptr[v + 1]] - kept[ptr[v]].
  const at::Tensor kept = at::cat({at::zeros({1}, ptr.options().dtype(at::kLong)),
                                   at::cumsum(at::logical_not(mask_in_dst_order), 0, at::kLong)});
  return at::sub(at::index_select(kept, 0, ptr.narrow(0, 1, n)), at::index_select(kept, 0, ptr.narrow(0, 0, n)))
      .to(at::kInt);
}

at::Tensor forward_aux(const at::Tensor& x, at::TensorList graph, const at::Tensor& mask_in_dst_order,
                       const RelAggregateArgs& args) {
  const auto options = x.options().dtype(at::kInt);
  switch (args.aggregate) {
    case Aggregate::Max:
    case Aggregate::Min:
      return empty_output(x.sizes(), options);
    case Aggregate::Mean:
      return unmasked_in_degree(graph, mask_in_dst_order);
    default:
      return at::empty({0}, options);
  }
}

at::Tensor empty_grad(Grad which, const at::Tensor& x, const at::Tensor& relation, const RelAggregateArgs& args) {
  switch (which) {
    case Grad::X:
      return empty_output(x.sizes(), x.options());
    case Grad::Relation:
      return empty_output(relation.sizes(), relation.options());
    default:
      return at::empty({args.num_edges}, x.options());
  }
}

TORCH_LIBRARY(gfmrag_fast, m) {
  // Forward: returns (out, aux), out shaped like x; see rel_aggregate.h for aux.
  m.def(
      "rel_aggregate(Tensor x, Tensor relation, Tensor[] graph, Tensor? edge_weight, "
      "Tensor? edge_mask, str message, str aggregate, bool node_major=False) -> (Tensor, Tensor)");
  // Gradients, one op each so autograd asks only for what it needs.
  m.def(
      "rel_aggregate_backward_x(Tensor grad_out, Tensor x, Tensor relation, Tensor aux, "
      "Tensor[] graph, Tensor? edge_weight, Tensor? edge_mask, str message, str aggregate, "
      "bool node_major=False) -> Tensor");
  m.def(
      "rel_aggregate_backward_relation(Tensor grad_out, Tensor x, Tensor relation, Tensor aux, "
      "Tensor[] graph, Tensor? edge_weight, Tensor? edge_mask, str message, str aggregate, "
      "bool node_major=False) -> Tensor");
  m.def(
      "rel_aggregate_backward_edge_weight(Tensor grad_out, Tensor x, Tensor relation, Tensor aux, "
      "Tensor[] graph, Tensor? edge_weight, Tensor? edge_mask, str message, str aggregate, "
      "bool node_major=False) -> Tensor");
  // The input and relation gradients in one call (CPU: one walk of the graph for both, see
  // cpu/rel_aggregate_cpu.cpp); returns (grad_x, grad_relation). grad_x_init (like x): a gradient
  // of x from elsewhere, added to grad_x as it is written (x's other consumer in a layer).
  m.def(
      "rel_aggregate_backward_x_relation(Tensor grad_out, Tensor x, Tensor relation, Tensor aux, "
      "Tensor[] graph, Tensor? edge_weight, Tensor? edge_mask, str message, str aggregate, "
      "bool node_major=False, Tensor? grad_x_init=None) -> (Tensor, Tensor)");
  // The work plan of the CUDA kernels for a batch of B (rel_aggregate_balance.cpp); host arrays.
  m.def("rel_aggregate_balance(Tensor[] graph, int batch, bool per_query) -> Tensor");
}

}  // namespace gfmrag_fast
