"""Work-balance report of the rel_aggregate kernels: how many edges one thread group walks.

The CUDA kernels give every piece and every row of the graph's plan (:class:`RelGraph`,
``chunk_size``) its own thread groups; a group's serial work is the edges it visits, times the
batch where it loops over the batch (the shared relation table's gradient, the edge-weight
gradient). The numbers come from the op ``gfmrag_fast::rel_aggregate_balance``, which reads the
plan with the launchers' own work shapes (``csrc/rel_aggregate_kernels.h``); the CUDA emulator
checks them against the visits it counts while running the kernels.

    python -m gfmrag_fast.ops.balance --kg data/musique_hippo/processed/stage1/kg.txt --scale 4 --batch 8

prints a summary, then, as its last line, one JSON object with a key per kernel.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict

import torch

from . import _library  # noqa: F401  (loads the compiled library)
from .graph import DEFAULT_CHUNK_SIZE, RelGraph

# Rows of the op's report, in the C++ Kernel enum's order; its columns.
_KERNELS = ("forward", "grad_x", "grad_relation", "grad_edge_weight")
_GROUPS, _MAX_VISITS, _TOTAL_VISITS, _MAX_FOLDS = range(4)


def balance_report(graph: RelGraph, batch: int) -> Dict[str, Dict[str, float]]:
    """Per kernel: ``thread_groups``, ``max_serial_edges`` (most edge visits of one group, its
    batch loop counted), ``mean_serial_edges`` and ``max_partials_folded`` (most piece partials one
    row's group folds), for a batch of `batch` queries. The relation gradient is reported for a
    shared [R, d] table (``grad_relation_shared``) and per-query tables (``grad_relation_per_query``);
    the other kernels do not depend on it."""
    arrays = graph.to("cpu").arrays
    tables = {per_query: torch.ops.gfmrag_fast.rel_aggregate_balance(arrays, int(batch), per_query)
              for per_query in (False, True)}
    report = {}
    for i, kernel in enumerate(_KERNELS):
        variants = {"_shared": False, "_per_query": True} if kernel == "grad_relation" else {"": False}
        for suffix, per_query in variants.items():
            row = tables[per_query][i].tolist()
            report[kernel + suffix] = {
                "thread_groups": row[_GROUPS],
                "max_serial_edges": row[_MAX_VISITS],
                "mean_serial_edges": round(row[_TOTAL_VISITS] / max(row[_GROUPS], 1), 3),
                "max_partials_folded": row[_MAX_FOLDS],
            }
    return report


def kg_graph(path: str | os.PathLike, scale: int = 1, chunk_size: int = DEFAULT_CHUNK_SIZE) -> RelGraph:
    """The graph a GFM-RAG dataset builds from a ``kg.txt`` (entities and relations numbered by
    first appearance, every triple plus its inverse edge with relation r + R), replicated `scale`
    times with entity ids offset by N per copy (relations shared)."""
    from ..data.readers import read_triples  # the CLI's input only: the ops do not need the data layer

    triples, _ = read_triples(path)
    if not triples:
        raise ValueError(f"{os.fspath(path)}: no triples")
    entities: Dict[str, int] = {}
    relations: Dict[str, int] = {}
    hrt = [(entities.setdefault(h, len(entities)), entities.setdefault(t, len(entities)),
            relations.setdefault(r, len(relations))) for h, r, t in triples]
    head, tail, rel = torch.tensor(hrt, dtype=torch.long).unbind(1)
    num_entities, num_relations = len(entities), len(relations)
    offset = torch.arange(scale).repeat_interleave(head.numel()) * num_entities
    head, tail, rel = head.repeat(scale) + offset, tail.repeat(scale) + offset, rel.repeat(scale)
    edge_index = torch.cat([torch.stack([head, tail]), torch.stack([tail, head])], 1)
    edge_type = torch.cat([rel, rel + num_relations])
    return RelGraph(edge_index, edge_type, num_entities * scale, 2 * num_relations, chunk_size=chunk_size)


def main(argv=None) -> Dict[str, Dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kg", required=True, help="a kg.txt (head,relation,tail per line)")
    parser.add_argument("--scale", type=int, default=1, help="copies of the KG, ids offset (default 1)")
    parser.add_argument("--batch", type=int, default=8, help="queries per batch, B (default 8)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help=f"RelGraph chunk_size (default {DEFAULT_CHUNK_SIZE})")
    args = parser.parse_args(argv)
    if args.scale < 1 or args.batch < 1:
        parser.error("--scale and --batch must be >= 1")
    graph = kg_graph(args.kg, args.scale, args.chunk_size)
    report = balance_report(graph, args.batch)
    print(f"graph: N = {graph.num_nodes}, E = {graph.num_edges}, 2R = {graph.num_relations}, "
          f"chunk_size = {graph.chunk_size}; B = {args.batch}")
    for kernel, row in report.items():
        print(f"  {kernel:24s} groups {row['thread_groups']:>10,d}  max {row['max_serial_edges']:>7,d}  "
              f"mean {row['mean_serial_edges']:>8.2f}  folds <= {row['max_partials_folded']}")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
