"""``GFMRetriever``: ask a trained GFM-RAG model for the documents that answer a question.

::

    from gfmrag_fast import GFMRetriever

    r = GFMRetriever.from_pretrained("outputs/ft/pretrained", data_root="data", data_name="musique_hippo")
    r.retrieve("Who is the spouse of the director of Jump for Glory?", top_k=5)
    # [{"title": ..., "text": ..., "score": ...}, ...]; a list of questions gives a list of lists
    r.retrieve(question, entities=["jump for glory"])      # skip entity linking
    r.explain(question, top_k_docs=3, top_k_paths=3)      # relational paths behind each document
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from ..data import QADataset, prepare_graph
from ..data.batch import index_mask
from ..data.readers import clean_name, read_json
from ..models.retriever import GNNRetriever
from .entity_linking import EntityLinker, LinkedEntity
from .loading import load_checkpoint, text_model_from_config
from .paths import beam_search_paths, describe_path, edge_importance
from .ranking import make_doc_ranker, needs_question_embeddings

__all__ = ["GFMRetriever", "NO_ENTITY_MESSAGE"]

log = logging.getLogger(__name__)

NO_ENTITY_MESSAGE = ("no entity of the knowledge graph found in the question, so the graph cannot rank "
                     "documents: pass entities=[...] or use doc_ranker='hybrid' (dense similarity)")


def _device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class GFMRetriever:
    """A trained ``GNNRetriever`` over one QA dataset's graph and documents.

    Args:
        model: the trained ``GNNRetriever``.
        dataset: the :class:`~gfmrag_fast.data.QADataset` whose graph it ranks; its text model
            embeds the questions (it must be the one the model was trained with).
        doc_ranker: a name (``idf_topk`` default, ``topk``, ``idf``, ``simple``, ``hybrid``,
            ``dense``), a ``doc_ranker`` config mapping or a ranker; see :mod:`.ranking`.
        device: where the model runs; ``None``: CUDA when available.
        init_entities_weight: scale the question entities by their inverse document frequency,
            as the fine-tune workflow's ``train.init_entities_weight`` (default true) did.
        batch_size: questions per forward pass.
        entity_linker: options of :class:`EntityLinker` (``threshold``, ``max_entities``, ...),
            or a ready linker.
    """

    def __init__(
        self,
        model: GNNRetriever,
        dataset: QADataset,
        doc_ranker: Any = "idf_topk",
        device: Union[str, torch.device, None] = None,
        init_entities_weight: bool = True,
        batch_size: int = 8,
        entity_linker: Union[Mapping[str, Any], EntityLinker, None] = None,
    ):
        if not isinstance(model, GNNRetriever):
            raise TypeError(f"GFMRetriever needs a GNNRetriever (a fine-tuned model), got {type(model).__name__}: "
                            "a pre-trained KG-completion model has no question encoder")
        if model.rel_emb_dim != dataset.feat_dim:
            raise ValueError(f"the model expects {model.rel_emb_dim}-d text embeddings, but {dataset.data_name!r} "
                             f"was embedded with {dataset.feat_dim}-d ones ({dataset.text_emb_model!r}): "
                             "use the text model the model was trained with")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = _device(device)
        self.model = model.to(self.device).eval()
        self.dataset = dataset
        self.text_emb_model = dataset.text_emb_model
        self.batch_size = int(batch_size)
        # On the device with its RelGraph prepared once (not per retrieve/explain call).
        self.graph = prepare_graph(dataset.graph, self.device)
        self.entities_weight = dataset.entities_weight().to(self.device) if init_entities_weight else None
        self.ent2doc = dataset.ent2doc.coalesce().to(self.device)
        self.doc_ranker = make_doc_ranker(doc_ranker, self.ent2doc, dataset.document_embeddings)
        self.entity_names = list(dataset.ent2id)
        self._linker = entity_linker if isinstance(entity_linker, EntityLinker) else None
        self._linker_options = dict(entity_linker or {}) if self._linker is None else {}
        self._corpus: Optional[Dict[str, str]] = None

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str,
        data_root: Union[str, os.PathLike],
        data_name: str,
        doc_ranker: Any = "idf_topk",
        device: Union[str, torch.device, None] = None,
        text_emb_model: Any = None,
        trust_remote_code: bool = False,
        entity_order: str = "locality",
        **kwargs: Any,
    ) -> "GFMRetriever":
        """Loads a checkpoint and the dataset's stage-2 cache (building it if missing).

        ``path_or_repo_id``: a pre-trained folder, a fine-tune run folder, a training checkpoint
        of a run, or a Hugging Face repo id (:func:`.loading.load_checkpoint`). The text model is
        the checkpoint's (``text_emb_model_config``) unless ``text_emb_model`` is given; a
        checkpoint's config can never enable ``trust_remote_code``, only this argument can.
        ``entity_order`` numbers the stage-2 entities as the workflows do by default, so the cache
        a fine-tune or evaluate run built is reused (``"original"``: GFM-RAG's first-appearance ids).
        Other keyword arguments go to the constructor.
        """
        model, text_config = load_checkpoint(path_or_repo_id)
        if text_emb_model is None:
            text_emb_model = text_model_from_config(text_config, trust_remote_code=trust_remote_code)
        dataset = QADataset(data_root, data_name, text_emb_model=text_emb_model, entity_order=entity_order)
        return cls(model, dataset, doc_ranker=doc_ranker, device=device, **kwargs)

    # -- entity linking -----------------------------------------------------------------------
    @property
    def entity_linker(self) -> EntityLinker:
        """The :class:`EntityLinker` over this dataset's entities (built on first use: the first
        time for a dataset, that embeds every entity name)."""
        if self._linker is None:
            embeddings = self.dataset.entity_embeddings()
            self._linker = EntityLinker(self.entity_names, embeddings, self._encode_mentions, **self._linker_options)
        return self._linker

    def _encode_mentions(self, texts: List[str]) -> torch.Tensor:
        return self.text_emb_model.encode(texts, is_query=False)

    def link(self, questions: Union[str, Sequence[str]]) -> Union[List[LinkedEntity], List[List[LinkedEntity]]]:
        """The KG entities linked to a question (or to each of a list of questions)."""
        if isinstance(questions, str):
            return self.entity_linker.link_many([questions])[0]
        return self.entity_linker.link_many(list(questions))

    def entity_ids(self, names: Sequence[str]) -> List[int]:
        """Ids of the given entity names (compared as stage-2 compares them); unknown ones are
        dropped with a warning."""
        if isinstance(names, str):
            raise TypeError("entities must be a list of entity names, not one string")
        ids, unknown = [], []
        for name in names:
            idx = self.dataset.ent2id.get(clean_name(str(name)))
            if idx is None:
                unknown.append(name)
            elif idx not in ids:
                ids.append(idx)
        if unknown:
            log.warning("%s: unknown entities ignored: %s", self.dataset.data_name, unknown)
        return ids

    # -- scoring ------------------------------------------------------------------------------
    @torch.no_grad()
    def score(
        self,
        question_embeddings: torch.Tensor,  # [B, D]
        question_entities: Sequence[Sequence[int]],  # B lists of entity ids
    ) -> tuple[torch.Tensor, torch.Tensor]:  # ([B, N] entity logits, [B, num_docs] document scores)
        """Entity logits and document scores for already embedded and linked questions.

        A question with no entity gets document scores from the dense similarity alone with a
        hybrid ranker, and all zeros otherwise.
        """
        q = question_embeddings.to(self.device, torch.float32)
        has = torch.tensor([len(ids) > 0 for ids in question_entities], device=self.device)
        mask = index_mask([torch.as_tensor(list(ids), dtype=torch.long) for ids in question_entities],
                          self.dataset.num_nodes).to(self.device)
        logits = self.model(self.graph, {"question_embeddings": q, "question_entities_masks": mask},
                            entities_weight=self.entities_weight).float()
        if needs_question_embeddings(self.doc_ranker):
            docs = self.doc_ranker(logits, q, has)
        else:
            docs = self.doc_ranker(logits) * has[:, None]
        return logits, docs

    def _questions(self, questions, entities):
        """(questions list, entity ids per question, linked names per question, single?)."""
        single = isinstance(questions, str)
        questions = [questions] if single else list(questions)
        if not all(isinstance(q, str) for q in questions):
            raise TypeError("questions must be a string or a list of strings")
        if entities is None:
            linked = self.link(questions) if questions else []
            ids = [[e.id for e in found] for found in linked]
        else:
            per_question = [entities] if single else list(entities)
            if len(per_question) != len(questions):
                raise ValueError(f"entities: one list of names per question expected, got {len(per_question)} "
                                 f"lists for {len(questions)} questions")
            ids = [self.entity_ids(names) for names in per_question]
        return questions, ids, single

    def retrieve(
        self,
        questions: Union[str, Sequence[str]],
        top_k: int = 5,
        entities: Optional[Sequence[Any]] = None,
        return_entities: bool = False,
        top_k_entities: int = 10,
    ) -> Union[List[Any], List[List[Any]]]:
        """Ranked documents for a question (a list of ``{"title", "text", "score"}``), or a list
        of such lists for a list of questions.

        ``entities``: the question's entity names (a list of lists for a list of questions)
        instead of linking them. With ``return_entities`` each question's result is a dict:
        ``{"documents": [...], "entities": [{"name", "score"} x top_k_entities], "question_entities":
        [names]}`` (entity scores are probabilities). A question with no known entity gets no
        documents (a warning says why) unless the ranker is hybrid.
        """
        questions, ids, single = self._questions(questions, entities)
        results = []
        for start in range(0, len(questions), self.batch_size):
            chunk = questions[start:start + self.batch_size]
            chunk_ids = ids[start:start + self.batch_size]
            emb = self.text_emb_model.encode(chunk, is_query=True)
            logits, docs = self.score(emb, chunk_ids)
            for b, question in enumerate(chunk):
                hybrid = needs_question_embeddings(self.doc_ranker)
                if not chunk_ids[b]:
                    log.warning("question %r: %s", question, NO_ENTITY_MESSAGE if not hybrid else
                                "no entity of the knowledge graph found; ranked by dense similarity alone")
                documents = self._top_documents(docs[b], top_k) if chunk_ids[b] or hybrid else []
                if not return_entities:
                    results.append(documents)
                    continue
                results.append({
                    "documents": documents,
                    "entities": self._top_entities(logits[b], top_k_entities) if chunk_ids[b] else [],
                    "question_entities": [self.entity_names[i] for i in chunk_ids[b]],
                })
        return results[0] if single else results

    def _top_documents(self, scores: torch.Tensor, k: int) -> List[Dict[str, Any]]:
        values, index = scores.topk(min(int(k), scores.numel()))
        corpus = self.corpus
        names = self.dataset.doc_names
        return [{"title": names[i], "text": corpus.get(names[i], ""), "score": v}
                for v, i in zip(values.tolist(), index.tolist())]

    def _top_entities(self, logits: torch.Tensor, k: int) -> List[Dict[str, Any]]:
        values, index = logits.topk(min(int(k), logits.numel()))
        return [{"name": self.entity_names[i], "score": v}
                for v, i in zip(torch.sigmoid(values).tolist(), index.tolist())]

    @property
    def corpus(self) -> Dict[str, str]:
        """Document title → text, from ``raw/dataset_corpus.json`` (empty without it)."""
        if self._corpus is None:
            path = os.path.join(self.dataset.dataset_dir, "raw", "dataset_corpus.json")
            raw = read_json(path) if os.path.isfile(path) else {}
            self._corpus = {}
            for title, text in raw.items():
                self._corpus.setdefault(clean_name(title), text if isinstance(text, str) else "")
        return self._corpus

    # -- explanations -------------------------------------------------------------------------
    def explain(
        self,
        question: str,
        top_k_docs: int = 3,
        top_k_paths: int = 3,
        entities: Optional[Sequence[str]] = None,
        beam_size: int = 10,
    ) -> List[Dict[str, Any]]:
        """For each of the question's ``top_k_docs`` best documents, the ``top_k_paths`` relational
        paths from the question entities to the document's entities that contributed most to
        its score (see :mod:`.paths`)::

            [{"title", "score", "paths": [{"path": "a -[r]-> b <-[s]- c", "importance",
                                           "entities": [a, b, c],
                                           "triples": [[head, relation, tail], ...]}]}]

        Every step of a path is an edge of the KG, reported as its ``kg.txt`` triple. A
        question with no known entity has no paths: the result is empty (with a warning).
        """
        if not isinstance(question, str):
            raise TypeError("explain takes one question (a string)")
        questions, ids, _ = self._questions(question, entities)
        if not ids[0]:
            log.warning("question %r: %s", question, NO_ENTITY_MESSAGE)
            return []
        # clone(): sentence-transformers returns inference-mode tensors, which autograd refuses.
        emb = self.text_emb_model.encode(questions, is_query=True).clone().to(self.device)
        _, docs = self.score(emb, ids)
        doc_scores, doc_ids = docs[0].topk(min(int(top_k_docs), docs.shape[1]))
        ent2doc = self.ent2doc.index_select(1, doc_ids).to_dense().t()  # [M, N]
        idf = self.dataset.entities_weight().to(self.device)
        importance = edge_importance(self.model, self.graph, emb[0], torch.tensor(ids[0], device=self.device),
                                     self.entities_weight, ent2doc * idf)  # [M, L, E]
        sources = torch.tensor(ids[0], device=self.device)
        out = []
        for m, (doc, score) in enumerate(zip(doc_ids.tolist(), doc_scores.tolist())):
            targets = torch.nonzero(ent2doc[m]).flatten()
            paths = beam_search_paths(self.graph.edge_index, importance[m], sources, targets,
                                      self.dataset.num_nodes, top_k=top_k_paths, beam_size=beam_size)
            out.append({"title": self.dataset.doc_names[doc], "score": score, "paths": [
                describe_path(p, self.graph.edge_index, self.graph.edge_type, self.dataset.num_relations,
                              self.entity_names, self.dataset.rel_names) for p in paths]})
        return out
