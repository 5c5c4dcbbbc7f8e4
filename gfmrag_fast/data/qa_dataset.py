"""Stage-2 processing of a QA dataset: the KG, entity → document map, and question targets.

Matches GFM-RAG's ``QADataset``: questions are embedded with the query instruction; their
question entities, supporting entities and supporting documents become targets; a question
whose question entities, supporting entities or supporting documents are all unknown is skipped.
Unlike the original, targets are stored as index lists (CSR-style) and made dense per batch
(:mod:`gfmrag_fast.data.batch`): [Q, N] float masks for a 100k-entity graph do not fit in memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from .batch import QACollate, entities_weight
from .cache import PROCESSING_VERSION, CacheReader, file_digest, fingerprint, load_or_build, save_json, save_tensors
from .kg_dataset import KGDataset
from .readers import NameIndex, clean_name, json_type, read_json

__all__ = ["QADataset", "QASplit", "IndexLists"]

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")  # valid.json is optional: validation questions for model selection
_TARGETS = (  # item field → (stored name, lookup table, reason when none is known)
    ("question_entities", "question_entities", "ent", "no_question_entities"),
    ("supporting_entities", "supporting_entities", "ent", "no_supporting_entities"),
    ("supporting_facts", "supporting_docs", "doc", "no_supporting_docs"),
)
_REQUIRED = ("question", "question_entities", "supporting_entities", "supporting_facts")


class IndexLists:
    """Q variable-length lists of ids in CSR form: list i is ``idx[ptr[i]:ptr[i + 1]]``."""

    def __init__(self, ptr: torch.Tensor, idx: torch.Tensor):
        self.ptr = ptr  # [Q + 1] long
        self.idx = idx  # [nnz] long

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]]) -> IndexLists:
        lengths = torch.tensor([len(x) for x in lists], dtype=torch.long)
        ptr = torch.zeros(len(lists) + 1, dtype=torch.long)
        torch.cumsum(lengths, 0, out=ptr[1:])
        idx = torch.tensor([i for x in lists for i in x], dtype=torch.long)
        return cls(ptr, idx)

    def __len__(self) -> int:
        return self.ptr.numel() - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.idx[self.ptr[i] : self.ptr[i + 1]]

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"ptr": self.ptr, "idx": self.idx}


class QASplit(Dataset):
    """One split of a :class:`QADataset` as a ``torch.utils.data.Dataset``.

    Item i is a dict: ``id`` (the question's id), ``question_embeddings`` [D] float32,
    ``question_entities`` / ``supporting_entities`` [k] long entity ids and ``supporting_docs``
    [k] long document ids. Batch items with :attr:`collate_fn` to get dense masks.
    """

    def __init__(self, name: str, data: dict[str, Any], num_entities: int, num_docs: int):
        self.name = name
        self.ids: list[str] = data["ids"]
        self.questions: list[str] = data["questions"]
        self.sample_index: torch.Tensor = data["sample_index"]  # [Q] position in the stage-1 file
        self.question_embeddings: torch.Tensor = data["question_embeddings"]  # [Q, D]
        self.targets = {key: IndexLists(**data[key]) for _, key, _, _ in _TARGETS}
        self.collate_fn = QACollate(num_entities, num_docs)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range for {len(self)} questions")
        i %= len(self)
        item = {"id": self.ids[i], "question_embeddings": self.question_embeddings[i]}
        item.update({key: lists[i] for key, lists in self.targets.items()})
        return item

    def __repr__(self) -> str:
        return f"QASplit({self.name!r}, questions={len(self)})"


def _check_questions(path: str, items: Any) -> None:
    """Raise ``ValueError`` naming the file and the record for any record of the wrong shape.

    A wrong type is a broken file, not a question to skip: ``"question": null`` embedded as
    the text "None" would train on garbage without a word.
    """
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of questions, got {json_type(items)}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: question {i}: expected an object, got {json_type(item)}")
        qid = item.get("id", i)
        if isinstance(qid, bool) or not isinstance(qid, (str, int)):
            raise ValueError(f"{path}: question {i}: 'id' must be a string or an integer, got {json_type(qid)}")
        where = f"{path}: question {i}" + (f" (id {qid!r})" if "id" in item else "")
        missing = [f for f in _REQUIRED if f not in item]
        if missing:
            raise ValueError(f"{where} lacks field(s) {missing}")
        if not isinstance(item["question"], str):
            raise ValueError(f"{where}: 'question' must be a string, got {json_type(item['question'])}")
        for field, *_ in _TARGETS:
            names = item[field]
            if not isinstance(names, list):
                raise ValueError(f"{where}: {field!r} must be a list of names, got {json_type(names)}")
            for k, name in enumerate(names):
                if not isinstance(name, str):
                    raise ValueError(f"{where}: {field!r} must be a list of names, item {k} is {json_type(name)}")


def _lookup(names: list[str], table: NameIndex) -> tuple[list[int], int]:
    """(ids of the known names, deduplicated in order, number of unknown names)."""
    ids, unknown = {}, 0
    for name in names:
        idx = table.get(name)
        if idx is None:
            unknown += 1
        else:
            ids.setdefault(idx, None)
    return list(ids), unknown


class QADataset(KGDataset):
    """A GFM-RAG QA dataset: the KG of :class:`KGDataset` plus documents and questions.

    Extra inputs: ``processed/stage1/document2entities.json`` (required),
    ``raw/dataset_corpus.json`` (optional: fixes the document numbering — its key order — and
    the document count; else the keys of document2entities.json are the documents) and
    ``processed/stage1/{train,test}.json`` (at least one). Entity names and document titles in
    the JSON files are matched to kg.txt's names / the corpus's titles as written (outer
    whitespace stripped), else ignoring case, spacing and punctuation (see
    :class:`~gfmrag_fast.data.readers.NameIndex`); unknown names are dropped and counted, and
    one log line per build says how many.

    Attributes (besides :class:`KGDataset`'s):
        doc2id: document title → id (``doc2id.json``); ``doc_names`` lists them by id.
        ent2doc: [N, num_docs] sparse COO float, 1 where the entity occurs in the document.
        splits: split name → :class:`QASplit`; also ``split(name)``.
        entity_embeddings(), document_embeddings(): for retrieval, built on first use and cached.
        stats["names"]: over document2entities.json and the question files, how many names were
            found as written (``exact``), found only by their normalised form (``normalized``),
            or not found (``unknown``).
        stats[split]: ``questions``, ``kept``, ``skipped`` and per reason ``skipped_no_question_entities``,
            ``skipped_no_supporting_entities``, ``skipped_no_supporting_docs`` (a question
            missing several counts under each), and ``unknown_question_entities``,
            ``unknown_supporting_entities``, ``unknown_supporting_docs`` (names dropped).
    """

    kind = "qa"

    def _input_paths(self) -> dict[str, str | None]:
        paths = super()._input_paths()
        d2e = self._stage1("document2entities.json")
        if not os.path.isfile(d2e):
            raise FileNotFoundError(f"no such file: {d2e} (QA dataset {self.data_name!r} needs it)")
        paths["document2entities.json"] = d2e
        corpus = os.path.join(self.dataset_dir, "raw", "dataset_corpus.json")
        paths["raw/dataset_corpus.json"] = corpus if os.path.isfile(corpus) else None
        for split in SPLITS:
            path = self._stage1(f"{split}.json")
            paths[f"{split}.json"] = path if os.path.isfile(path) else None
        if not any(paths[f"{split}.json"] for split in SPLITS):
            train, test = self._stage1("train.json"), self._stage1("test.json")
            raise FileNotFoundError(f"no questions: neither {train} nor {test} exists")
        return paths

    def _build(self, inputs: dict[str, str | None], out: str) -> dict[str, Any]:
        stats = super()._build(inputs, out)
        self._names = {"ent": NameIndex(self.ent2id)}
        doc2id, stats["documents"] = self._build_documents(inputs, out)
        self._names["doc"] = NameIndex(doc2id)
        for split in SPLITS:
            if inputs[f"{split}.json"] is not None:
                stats[split] = self._build_split(split, inputs[f"{split}.json"], doc2id, out)
        stats["names"] = {k: sum(index.counts[k] for index in self._names.values()) for k in ("exact", "normalized", "unknown")}
        self._report_names(stats)
        return stats

    def _report_names(self, stats: dict[str, Any]) -> None:
        """One log line per build: names matched only after normalisation, and names not found."""
        names, docs = stats["names"], stats["documents"]
        if not (names["normalized"] or names["unknown"] or docs["unknown_docs"]):
            return
        where = [f"document2entities.json: {docs['unknown_entities']} entity name(s), "
                 f"{docs['unknown_docs']} document(s) not in the corpus"]
        for split in SPLITS:
            if split in stats:
                where.append(f"{split}.json: " + ", ".join(
                    f"{stats[split]['unknown_' + key]} {key.replace('_', ' ')}" for _, key, _, _ in _TARGETS))
        level = logging.WARNING if names["unknown"] or docs["unknown_docs"] else logging.INFO
        log.log(level, "%s: %d name(s) matched kg.txt / the corpus only after normalising case, spacing and "
                "punctuation; %d name(s) not found and ignored (%s)", self.data_name, names["normalized"],
                names["unknown"], "; ".join(where))

    def _build_documents(self, inputs: dict[str, str | None], out: str) -> tuple[dict[str, int], dict[str, int]]:
        """Number the documents; write doc2id.json and ent2doc.pt (the [2, nnz] entity-document pairs)."""
        d2e_path = inputs["document2entities.json"]
        doc2entities = read_json(d2e_path)
        if not isinstance(doc2entities, dict):
            raise ValueError(f"{d2e_path}: expected {{document title: [entity names]}}, got {json_type(doc2entities)}")
        for title, entities in doc2entities.items():
            if not isinstance(entities, list):
                raise ValueError(f"{d2e_path}: document {title!r}: expected a list of entity names, "
                                 f"got {json_type(entities)}")
            for k, name in enumerate(entities):
                if not isinstance(name, str):
                    raise ValueError(f"{d2e_path}: document {title!r}: item {k} is {json_type(name)}, "
                                     "expected an entity name")
        corpus_path = inputs["raw/dataset_corpus.json"]
        titles = read_json(corpus_path) if corpus_path else doc2entities
        if not isinstance(titles, dict):
            raise ValueError(f"{corpus_path}: expected {{document title: text}}")
        doc2id: dict[str, int] = {}
        for title in titles:
            doc2id.setdefault(clean_name(title), len(doc2id))

        pairs, unknown_docs, unknown_ents = set(), 0, 0
        for title, entities in doc2entities.items():
            doc = doc2id.get(clean_name(title))
            if doc is None:
                unknown_docs += 1
                continue
            ids, unknown = _lookup(entities, self._names["ent"])
            unknown_ents += unknown
            pairs.update((e, doc) for e in ids)
        index = torch.tensor(sorted(pairs), dtype=torch.long).view(-1, 2).t().contiguous()  # [2, nnz]
        save_tensors(os.path.join(out, "ent2doc.pt"), {"index": index, "size": [len(self.ent2id), len(doc2id)]})
        save_json(os.path.join(out, "doc2id.json"), doc2id)
        stats = {"docs": len(doc2id), "entity_doc_pairs": len(pairs),
                 "unknown_docs": unknown_docs, "unknown_entities": unknown_ents}
        return doc2id, stats

    def _build_split(self, split: str, path: str, doc2id: dict[str, int], out: str) -> dict[str, int]:
        """Map one question file to id lists, embed the kept questions, write ``<split>.pt``."""
        items = read_json(path)
        _check_questions(path, items)
        tables = self._names
        counts = {"questions": len(items), "kept": 0, "skipped": 0}
        counts.update({f"skipped_{reason}": 0 for *_, reason in _TARGETS})
        counts.update({f"unknown_{key}": 0 for _, key, _, _ in _TARGETS})
        kept: dict[str, list] = {"ids": [], "questions": [], "sample_index": []}
        targets: dict[str, list] = {key: [] for _, key, _, _ in _TARGETS}
        for i, item in enumerate(items):
            found = {}
            for field, key, table, reason in _TARGETS:
                found[key], unknown = _lookup(item[field], tables[table])
                counts[f"unknown_{key}"] += unknown
                if not found[key]:
                    counts[f"skipped_{reason}"] += 1
            if not all(found.values()):
                counts["skipped"] += 1
                continue
            kept["ids"].append(str(item.get("id", i)))
            kept["questions"].append(item["question"])
            kept["sample_index"].append(i)
            for key, ids in found.items():
                targets[key].append(ids)
        counts["kept"] = len(kept["ids"])
        data: dict[str, Any] = dict(kept)
        data["sample_index"] = torch.tensor(kept["sample_index"], dtype=torch.long)  # [Q]
        data["question_embeddings"] = self._embed(kept["questions"], is_query=True, what=f"{split} questions")
        data.update({key: IndexLists.from_lists(lists).to_dict() for key, lists in targets.items()})
        save_tensors(os.path.join(out, f"{split}.pt"), data)
        return counts

    def _load(self, cache: CacheReader) -> None:
        super()._load(cache)
        self._input_digests = cache.meta.get("inputs") or {}
        self._embeddings: dict[str, torch.Tensor] = {}
        self.doc2id = cache.json("doc2id.json")
        self.doc_names = list(self.doc2id)
        e2d = cache.tensors("ent2doc.pt")
        values = torch.ones(e2d["index"].shape[1])
        self.ent2doc = torch.sparse_coo_tensor(
            e2d["index"], values, tuple(e2d["size"]), is_coalesced=True, check_invariants=True
        )
        self.splits = {}
        for split in SPLITS:
            if cache.has(f"{split}.pt"):
                self.splits[split] = QASplit(split, cache.tensors(f"{split}.pt"), self.num_nodes, self.num_docs)
                self._report_skipped(split)

    def _report_skipped(self, split: str) -> None:
        # Said on every load, not only when building: the user of a cached dataset should know too.
        counts = self.stats[split]
        if counts.get("skipped"):
            reasons = ", ".join(
                f"{reason.replace('_', ' ')}: {counts.get('skipped_' + reason, 0)}" for *_, reason in _TARGETS
            )
            log.warning("%s/%s: skipped %d of %d questions (%s)", self.data_name, split,
                        counts["skipped"], counts["questions"], reasons)

    @property
    def num_docs(self) -> int:
        return len(self.doc2id)

    def split(self, name: str) -> QASplit:
        """The questions of one split ("train" or "test") as a torch Dataset."""
        if name not in self.splits:
            raise KeyError(f"{self.data_name}: no split {name!r}; available: {sorted(self.splits)}")
        return self.splits[name]

    def entity_embeddings(self) -> torch.Tensor:
        """[N, D] float32 embeddings of the entity names (for entity linking); see :meth:`_text_embeddings`."""
        return self._text_embeddings("entities", lambda: list(self.ent2id))

    def document_embeddings(self) -> torch.Tensor:
        """[num_docs, D] float32 embeddings of the documents as ``"title\\ntext"`` (the title alone
        without ``raw/dataset_corpus.json``), for dense ranking; see :meth:`_text_embeddings`."""
        return self._text_embeddings("documents", self._document_texts)

    def _text_embeddings(self, what: str, texts: Callable[[], list[str]]) -> torch.Tensor:
        """Texts embedded as passages with the dataset's text model, so that they compare with its
        question embeddings. Training never needs them: each kind is built on first use into a
        stage-2 folder of its own beside the dataset's (its fingerprint hashes the dataset's and
        the text model's), with the same guarantees under concurrent builders, then loaded."""
        if what not in self._embeddings:
            kind = f"qa_{what}_embeddings"
            key = fingerprint(kind, self.text_emb_model.config_dict(), {"stage2": self.fingerprint}, {})
            folder = os.path.join(os.path.dirname(self.processed_dir), key)

            def build(out: str) -> dict[str, Any]:
                save_tensors(os.path.join(out, "embeddings.pt"), self._embed(texts(), is_query=False, what=what))
                return {"fingerprint": key, "version": PROCESSING_VERSION, "kind": kind, "stage2": self.fingerprint,
                        "text_emb_model": self.text_emb_model.config_dict()}

            self._embeddings[what] = load_or_build(folder, key, build, lambda cache: cache.tensors("embeddings.pt"))
        return self._embeddings[what]

    def _document_texts(self) -> list[str]:
        """``"title\\ntext"`` per document id, from the corpus this dataset was built from."""
        path = os.path.join(self.dataset_dir, "raw", "dataset_corpus.json")
        recorded = self._input_digests.get("raw/dataset_corpus.json")
        if recorded is None:
            return list(self.doc_names)
        if not os.path.isfile(path) or file_digest(path) != recorded:
            raise RuntimeError(f"{path} changed since {self.data_name!r} was loaded: load the dataset again")
        texts: dict[str, str] = {}
        for title, text in read_json(path).items():
            if not isinstance(text, str):
                raise ValueError(f"{path}: document {title!r}: expected its text, got {json_type(text)}")
            texts.setdefault(clean_name(title), f"{clean_name(title)}\n{text}")
        return [texts[name] for name in self.doc_names]

    def entities_weight(self) -> torch.Tensor:
        """[N] GFM-RAG's inverse document frequency weights; see :func:`batch.entities_weight`."""
        return entities_weight(self.ent2doc)

    def __repr__(self) -> str:
        splits = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"{super().__repr__()[:-1]}, docs={self.num_docs}, {splits})"
