"""Stage-2 processing of a knowledge graph: numbering, inverse edges, relation embeddings.

Matches GFM-RAG's ``KGDataset``: entities and relations are numbered in order of first appearance
in ``kg.txt`` (head before tail on each line; with ``entity_order="locality"`` entities are then
renumbered so that graph neighbours get nearby ids, see :mod:`.ordering`), every triple
(h, r, t) also gets the inverse edge (t, r + R, h) named ``"inverse_" + name`` (made unique where
that is itself a relation of the KG: :func:`inverse_relation_names`), and all 2R relation names
are embedded with the text model.
``valid.txt`` / ``test.txt`` beside ``kg.txt`` become held-out link-prediction triples.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch_geometric.data import Data

from ..text_emb import TextEmbModel
from .cache import PROCESSING_VERSION, CacheReader, file_digest, fingerprint, load_or_build, save_json, save_tensors
from .ordering import ENTITY_ORDERS, locality_order, relabel
from .readers import read_triples

__all__ = ["KGDataset", "check_dataset_name", "inverse_relation_names", "resolve_text_emb_model"]

log = logging.getLogger(__name__)

INVERSE_PREFIX = "inverse_"
# Embedding fewer texts than this is too quick for progress to help; more are embedded (and
# their progress shown) in chunks of this many.
_PROGRESS_TEXTS = 512


def resolve_text_emb_model(text_emb_model: Any) -> Any:
    """``None`` → the default :class:`TextEmbModel`; a dict / OmegaConf node → ``from_config``.

    Anything else is used as is: it needs ``config_dict()`` and
    ``encode(texts, is_query=..., show_progress_bar=...) -> [n, D]``.
    """
    if text_emb_model is None:
        return TextEmbModel()
    if isinstance(text_emb_model, Mapping) or type(text_emb_model).__module__.startswith("omegaconf"):
        return TextEmbModel.from_config(text_emb_model)
    if not (hasattr(text_emb_model, "encode") and hasattr(text_emb_model, "config_dict")):
        raise TypeError(
            "text_emb_model must be a TextEmbModel, a text_emb_model config (dict / OmegaConf) or None, "
            f"got {type(text_emb_model).__name__}"
        )
    return text_emb_model


def check_dataset_name(data_name: Any) -> str:
    """``data_name`` if it names a folder inside ``datasets.root``; else ``ValueError``.

    Relative sub-folders (``kg/umls``) are allowed; absolute paths, ``..`` components and empty
    names are refused, since stage-2 output is written under the dataset's folder.
    """
    if not isinstance(data_name, str) or not data_name or "\0" in data_name:
        raise ValueError(f"dataset name must be a non-empty folder name, got {data_name!r}")
    parts = data_name.replace("\\", "/").split("/")
    if os.path.isabs(data_name) or data_name.startswith(("/", "\\")) or ".." in parts or not any(
        p not in ("", ".") for p in parts
    ):
        raise ValueError(
            f"dataset name {data_name!r} must be a folder inside datasets.root (relative, without '..')"
        )
    return data_name


def inverse_relation_names(names: list[str]) -> list[str]:
    """Names of the R inverse relations of ``names`` (R unique direct names), in the same order.

    GFM-RAG's ``"inverse_" + name`` wherever that is not itself one of the direct names (what
    released checkpoints saw); where it is, ``"inverse_" + name + " (k)"`` with the smallest
    k >= 2 that is still free, so all 2R names are unique whatever the input.
    """
    inverse = [INVERSE_PREFIX + name for name in names]
    direct = set(names)
    taken = direct | {name for name in inverse if name not in direct}
    for i, name in enumerate(inverse):
        if name in direct:
            k = 2
            while f"{name} ({k})" in taken:
                k += 1
            inverse[i] = f"{name} ({k})"
            taken.add(inverse[i])
    return inverse


def _number(vocab: dict[str, int], name: str) -> int:
    """Id of ``name``, appending it to ``vocab`` when new (first-appearance numbering)."""
    idx = vocab.get(name)
    if idx is None:
        idx = vocab[name] = len(vocab)
    return idx


class KGDataset:
    """A GFM-RAG knowledge graph, processed once and cached.

    Reads ``<root>/<data_name>/processed/stage1/kg.txt`` (and ``valid.txt`` / ``test.txt`` when
    present) and writes ``processed/stage2/<fingerprint>/``. Held-out entities that never occur
    in ``kg.txt`` are numbered after all ``kg.txt`` entities, in order of first appearance
    (``valid.txt`` before ``test.txt``), so every entity of every split has an id, as the
    benchmark entity counts assume (wn18rr: 40,943 = 40,559 in training + 384 only held out);
    they are isolated nodes of the graph. Held-out triples whose relation is not in ``kg.txt``
    are dropped and counted (there is no edge type for them).

    Args:
        root: folder holding one sub-folder per dataset.
        data_name: the dataset's folder under ``root`` (a relative path without ``..``).
        text_emb_model: a :class:`TextEmbModel`, its config (dict / OmegaConf), or ``None`` for
            the default; only loaded when the cache has to be (re)built.
        force_rebuild: rebuild even when a complete cache exists. Safe while other processes
            load or build the same dataset (see :mod:`gfmrag_fast.data.cache`).
        on_error: ``"raise"`` on a malformed line (``ValueError`` naming file:line) or
            ``"skip"`` it (counted in ``stats``, logged).
        entity_order: ``"original"``: GFM-RAG's first-appearance entity ids. ``"locality"``:
            the same entities renumbered by :func:`.ordering.locality_order` (reverse
            Cuthill–McKee over the KG's edges), so that the aggregation kernels' gathers from
            neighbours hit the caches. Only the ids differ: everything is built from the one
            numbering (graph, ``ent2id``, ``ent2doc``, question targets), the edges keep their
            ``kg.txt`` order, and what is read by name — retrieved entities and documents,
            rankings, metrics — is the same either way. Part of the cache fingerprint.

    Attributes:
        graph: ``torch_geometric.data.Data`` with
            ``edge_index`` [2, 2T] long (source row 0 = h, row 1 = t for each triple, then the
            T inverse edges (t, h)), ``edge_type`` [2T] long (r, then r + R), ``num_nodes`` N,
            ``num_relations`` 2R, ``rel_emb`` [2R, D] float32, ``target_edge_index`` [2, T],
            ``target_edge_type`` [T], and ``valid_triples`` / ``test_triples`` [n, 3] long in
            (h, t, r) column order when those files exist.
        ent2id: entity name → id (N entries). rel2id: relation name → id, all 2R names
            (inverses included, as GFM-RAG's ``rel2id.json``); ``rel_names`` lists them by id.
        stats: counts from processing (triples, duplicate triples, skipped lines, dropped held-out
            triples, ...).
        fingerprint, processed_dir: the cache key and folder.
    """

    kind = "kg"
    GRAPH_FILE = "graph.pt"

    def __init__(
        self,
        root: str | os.PathLike,
        data_name: str,
        text_emb_model: Any = None,
        force_rebuild: bool = False,
        on_error: str = "raise",
        entity_order: str = "original",
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if entity_order not in ENTITY_ORDERS:
            raise ValueError(f"entity_order must be one of {list(ENTITY_ORDERS)}, got {entity_order!r}")
        self.entity_order = entity_order
        self.root = os.fspath(root)
        self.data_name = check_dataset_name(data_name)
        self.on_error = on_error
        self.text_emb_model = resolve_text_emb_model(text_emb_model)
        self.dataset_dir = os.path.join(self.root, data_name)
        self.stage1_dir = os.path.join(self.dataset_dir, "processed", "stage1")

        inputs = self._input_paths()
        digests = {name: (file_digest(path) if path else None) for name, path in inputs.items()}
        options = {"on_error": on_error, "entity_order": entity_order}
        self.fingerprint = fingerprint(self.kind, self.text_emb_model.config_dict(), digests, options)
        self.processed_dir = os.path.join(self.dataset_dir, "processed", "stage2", self.fingerprint)

        def build(out: str) -> dict[str, Any]:
            log.info("%s: building stage-2 data in %s", data_name, self.processed_dir)
            return {
                "fingerprint": self.fingerprint,
                "version": PROCESSING_VERSION,
                "kind": self.kind,
                "data_name": data_name,
                "text_emb_model": self.text_emb_model.config_dict(),
                "inputs": digests,
                "stats": self._build(inputs, out),
            }

        load_or_build(self.processed_dir, self.fingerprint, build, self._load, force_rebuild=force_rebuild)
        log.info("%s: stage-2 data from %s", data_name, self.processed_dir)

    # ------------------------------------------------------------------ inputs
    def _stage1(self, name: str) -> str:
        return os.path.join(self.stage1_dir, name)

    def _input_paths(self) -> dict[str, str | None]:
        """File name → path of every input; ``None`` for an optional file that is absent."""
        kg = self._stage1("kg.txt")
        if not os.path.isfile(kg):
            raise FileNotFoundError(f"no such file: {kg} (dataset {self.data_name!r} needs processed/stage1/kg.txt)")
        paths: dict[str, str | None] = {"kg.txt": kg}
        for name in ("valid.txt", "test.txt"):
            path = self._stage1(name)
            paths[name] = path if os.path.isfile(path) else None
        return paths

    # ------------------------------------------------------------------ build
    def _embed(self, texts: list[str], is_query: bool, what: str) -> torch.Tensor:
        """[len(texts), D] float32 embeddings from the text model."""
        log.info("%s: embedding %d %s", self.data_name, len(texts), what)
        if len(texts) < _PROGRESS_TEXTS:
            emb = self.text_emb_model.encode(texts, is_query=is_query, show_progress_bar=False)
        else:
            emb = torch.cat(list(self._embed_chunks(texts, is_query, what)))
        emb = torch.as_tensor(emb).detach().to("cpu", torch.float32)
        if emb.dim() != 2 or emb.shape[0] != len(texts):
            raise RuntimeError(f"text model returned shape {tuple(emb.shape)} for {len(texts)} {what}, expected [n, D]")
        return emb

    def _embed_chunks(self, texts: list[str], is_query: bool, what: str):
        """The embeddings of ``texts`` in chunks of _PROGRESS_TEXTS, with progress: a bar on a
        terminal, else a log line at every tenth of the way (a bar in a log file is thousands of
        carriage-return lines)."""
        from tqdm import tqdm

        began, reported = time.perf_counter(), 0
        with tqdm(total=len(texts), desc=f"{self.data_name}: {what}", unit="text", leave=False,
                  disable=not sys.stderr.isatty()) as bar:
            for start in range(0, len(texts), _PROGRESS_TEXTS):
                chunk = texts[start:start + _PROGRESS_TEXTS]
                yield torch.as_tensor(self.text_emb_model.encode(chunk, is_query=is_query, show_progress_bar=False))
                done = start + len(chunk)
                bar.update(len(chunk))
                if bar.disable and (10 * done // len(texts) > reported or done == len(texts)):
                    reported = 10 * done // len(texts)
                    rate = done / max(time.perf_counter() - began, 1e-9)
                    log.info("%s: embedded %d of %d %s (%.0f texts/s, %.0f s left)", self.data_name, done,
                             len(texts), what, rate, (len(texts) - done) / rate)

    def _build(self, inputs: dict[str, str | None], out: str) -> dict[str, Any]:
        """Process the KG files and write graph.pt, ent2id.json, rel2id.json into ``out``."""
        kg_path = inputs["kg.txt"]
        names, skipped = read_triples(kg_path, on_error=self.on_error)
        if not names:
            raise ValueError(f"{kg_path}: no triples")
        ent2id: dict[str, int] = {}
        rel2id: dict[str, int] = {}
        triples = []
        for h, r, t in names:
            # Head before tail, then the relation: GFM-RAG's numbering order.
            triples.append((_number(ent2id, h), _number(ent2id, t), _number(rel2id, r)))
        num_kg_entities = len(ent2id)
        num_rel = len(rel2id)
        # Kept, as GFM-RAG keeps them (parallel edges), but said: usually an OpenIE artefact.
        duplicates = len(triples) - len(set(triples))
        if duplicates:
            log.warning("%s: %d duplicate triple(s) (kept as parallel edges)", kg_path, duplicates)
        stats: dict[str, Any] = {"triples": len(triples), "skipped_lines": skipped, "kg_entities": num_kg_entities,
                                 "duplicate_triples": duplicates}

        graph: dict[str, Any] = {}
        for split in ("valid", "test"):
            path = inputs.get(f"{split}.txt")
            if path is None:
                continue
            held_out, skipped = read_triples(path, on_error=self.on_error)
            kept, dropped, first_new = [], 0, len(ent2id)
            for h, r, t in held_out:
                if r not in rel2id:
                    dropped += 1
                    continue
                kept.append((_number(ent2id, h), _number(ent2id, t), rel2id[r]))
            if dropped:
                log.warning("%s: dropped %d triple(s) with a relation not in kg.txt", path, dropped)
            stats[split] = {"triples": len(kept), "dropped_unseen_relation": dropped,
                            "new_entities": len(ent2id) - first_new, "skipped_lines": skipped}
            graph[f"{split}_triples"] = torch.tensor(kept, dtype=torch.long).view(-1, 3)

        # (h, t, r) rows → target edges; edge_index row 0 is where GFM-RAG's kernels sum messages.
        hrt = torch.tensor(triples, dtype=torch.long)  # [T, 3] as (h, t, r)
        target_edge_index = hrt[:, :2].t().contiguous()  # [2, T]
        target_edge_type = hrt[:, 2].contiguous()  # [T]
        if self.entity_order == "locality":
            ent2id = self._renumber(ent2id, target_edge_index, graph)
        rel_names = list(rel2id) + inverse_relation_names(list(rel2id))
        rel_emb = self._embed(rel_names, is_query=False, what="relation names")
        graph.update(
            edge_index=torch.cat([target_edge_index, target_edge_index.flip(0)], dim=1),  # [2, 2T]
            edge_type=torch.cat([target_edge_type, target_edge_type + num_rel]),  # [2T]
            num_nodes=len(ent2id),
            num_relations=2 * num_rel,
            rel_emb=rel_emb,  # [2R, D]
            target_edge_index=target_edge_index,
            target_edge_type=target_edge_type,
        )
        stats.update(entities=len(ent2id), relations=num_rel, entity_order=self.entity_order)
        save_tensors(os.path.join(out, self.GRAPH_FILE), graph)
        save_json(os.path.join(out, "ent2id.json"), ent2id)
        save_json(os.path.join(out, "rel2id.json"), {name: i for i, name in enumerate(rel_names)})
        self.ent2id = ent2id  # for subclasses that build on the numbering
        return stats

    def _renumber(
        self, ent2id: dict[str, int], target_edge_index: torch.Tensor, graph: dict[str, Any]
    ) -> dict[str, int]:
        """Relabel entities in place by :func:`locality_order` of the KG's edges: the [2, T]
        target edges and the held-out triples in ``graph``; returns ``ent2id`` in the new ids
        (in id order, as ``list(ent2id)`` is read as the names by id). Entities only in held-out
        files are isolated nodes: each is a component of its own, numbered after the KG's."""
        new_id = relabel(locality_order(target_edge_index, len(ent2id)))
        target_edge_index.copy_(new_id[target_edge_index])
        for key in ("valid_triples", "test_triples"):
            if key in graph:
                graph[key][:, :2] = new_id[graph[key][:, :2]]
        ids = new_id.tolist()
        return dict(sorted(((name, ids[old]) for name, old in ent2id.items()), key=lambda item: item[1]))

    # ------------------------------------------------------------------ load
    def _load(self, cache: CacheReader) -> None:
        self.graph = Data(**cache.tensors(self.GRAPH_FILE))
        self.ent2id = cache.json("ent2id.json")
        self.rel2id = cache.json("rel2id.json")
        self.rel_names = list(self.rel2id)
        self.stats = cache.meta["stats"]

    @property
    def num_nodes(self) -> int:
        """N, the number of entities."""
        return int(self.graph.num_nodes)

    @property
    def num_relations(self) -> int:
        """2R, the number of edge types (inverses included)."""
        return int(self.graph.num_relations)

    @property
    def feat_dim(self) -> int:
        """D, the width of the relation (and question) embeddings."""
        return int(self.graph.rel_emb.shape[1])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.data_name!r}, entities={self.num_nodes}, "
            f"relations={self.num_relations}, edges={self.graph.edge_index.shape[1]}, fingerprint={self.fingerprint})"
        )
