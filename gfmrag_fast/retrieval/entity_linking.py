"""Entity linking without an LLM: a question's text → entities of the knowledge graph.

GFM-RAG links questions with an LLM-based NER step and a ColBERT index of entity names. This
linker needs neither; it uses two signals available from the dataset itself:

1. **String match.** The question is normalised as GFM-RAG's stage-1 normalises entity names
   (lower case; every character other than an ASCII letter or digit becomes a space) and each of
   its word n-grams (n ≤ ``max_ngram``) is looked up among the normalised entity names. A match
   inside a longer match is dropped ("york" inside "new york"), and so is one made only of
   function words ("the", "who"). When some match holds a capitalised word or a number in the
   question (a name or a date), only such matches are kept: common nouns ("country",
   "director") are linked only when the question names nothing the KG knows.
2. **Embedding nearest neighbours.** Each *mention* — a maximal run of capitalised words and
   numbers in the question ("Akinoshu Kenji"), function words allowed inside ("Battle of Mine
   Creek") — that no string match covers is embedded with the dataset's text model and linked
   to its ``per_mention`` nearest entity names whose cosine similarity is at least
   ``threshold``; when the whole mention has none, its pieces between function words are tried
   ("Germany and the UK"), and the pieces of a mention that a string match covers in part stand
   alone. A question with neither a capitalised word nor a string match uses its runs of
   content words.

At most ``max_entities`` entities are returned: string matches first (longest first), then
embedding matches by similarity. A question with nothing linkable gets an empty list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

__all__ = ["EntityLinker", "LinkedEntity", "normalize_name"]

_WORD = re.compile(r"[A-Za-z0-9]+")
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")

# English function words and question words: never a mention on their own.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below
besides between both but by can could did do does doing down during each else ever few for from further had
has have having he her here hers herself him himself his how i if in into is it its itself just last least
less like made make many may me might more most much must my myself near neither next no nor not now of
off on once one only or other our ours ourselves out over own per same shall she should since so some
such than that the their theirs them themselves then there these they this those though through to too
under until up upon us very was we were what whatever when where whereas whether which while who whom
whose why will with within without would yet you your yours yourself yourselves s t d ll re ve m
""".split())


def normalize_name(text: str) -> str:
    """GFM-RAG's stage-1 normalisation, whitespace collapsed: ``"Mr. Cool's"`` → ``"mr cool s"``."""
    return " ".join(_NOT_ALNUM.sub(" ", text.lower()).split())


@dataclass(frozen=True)
class LinkedEntity:
    """One linked entity: its KG name and id, a score (1 for a string match, the cosine
    similarity for an embedding match), how it was found and the question words it stands for."""

    name: str
    id: int
    score: float
    method: str  # "string" | "embedding"
    mention: str

    def to_dict(self) -> Dict[str, object]:
        return {"name": self.name, "id": self.id, "score": self.score, "method": self.method, "mention": self.mention}


@dataclass(frozen=True)
class _Token:
    text: str  # as written in the question
    norm: str  # lower case

    @property
    def named(self) -> bool:
        return self.norm not in STOPWORDS and (self.text[0].isupper() or self.text.isdigit())

    @property
    def content(self) -> bool:
        return self.norm not in STOPWORDS


class EntityLinker:
    """Links question text to KG entities (see the module docstring).

    Args:
        entity_names: the KG's entity names, by id (``list(dataset.ent2id)``).
        entity_embeddings: [N, D] their embeddings (``dataset.entity_embeddings()``),
            or None for string matching only.
        encode: ``encode(texts) -> [n, D]`` embeds mentions with the same text model, or None.
        threshold: least cosine similarity of an embedding match.
        max_entities: cap on the entities linked per question.
        per_mention: nearest entity names considered per unmatched mention.
        max_ngram: longest word n-gram looked up by string matching.
    """

    def __init__(
        self,
        entity_names: Sequence[str],
        entity_embeddings: Optional[torch.Tensor] = None,  # [N, D]
        encode: Optional[Callable[[List[str]], torch.Tensor]] = None,
        threshold: float = 0.8,
        max_entities: int = 5,
        per_mention: int = 1,
        max_ngram: int = 10,
    ):
        if max_entities < 1 or per_mention < 1 or max_ngram < 1:
            raise ValueError(f"max_entities, per_mention and max_ngram must be >= 1, got "
                             f"{max_entities}, {per_mention}, {max_ngram}")
        if entity_embeddings is not None and entity_embeddings.shape[0] != len(entity_names):
            raise ValueError(f"entity_embeddings has {entity_embeddings.shape[0]} rows for {len(entity_names)} entities")
        self.entity_names = list(entity_names)
        self.threshold = float(threshold)
        self.max_entities = int(max_entities)
        self.per_mention = int(per_mention)
        self.max_ngram = int(max_ngram)
        self._by_name: Dict[str, List[int]] = {}
        for idx, name in enumerate(self.entity_names):
            key = normalize_name(name)
            if key:
                self._by_name.setdefault(key, []).append(idx)
        self._ngram = min(self.max_ngram, max((k.count(" ") + 1 for k in self._by_name), default=1))
        self._embeddings = None if entity_embeddings is None else F.normalize(entity_embeddings.float(), dim=-1)
        self._encode = encode

    @property
    def uses_embeddings(self) -> bool:
        return self._embeddings is not None and self._encode is not None

    def __call__(self, question: str) -> List[LinkedEntity]:
        return self.link_many([question])[0]

    def link_many(self, questions: Sequence[str]) -> List[List[LinkedEntity]]:
        """Links each question; the unmatched mentions of all of them are embedded in one call."""
        found, pending = [], []
        for question in questions:
            tokens = [_Token(m.group(), m.group().lower()) for m in _WORD.finditer(question)]
            matches = self._string_matches(tokens)
            found.append(matches)
            pending.append(self._unmatched_mentions(tokens, matches) if self.uses_embeddings else [])
        texts = sorted({text for groups in pending for whole, pieces in groups for text in (whole, *pieces)})
        nearest = self._nearest(texts) if texts else {}
        linked = []
        for matches, groups in zip(found, pending):
            out: Dict[int, LinkedEntity] = {}
            for (start, end), ids, text in matches:
                for idx in ids:
                    out.setdefault(idx, LinkedEntity(self.entity_names[idx], idx, 1.0, "string", text))
            candidates = []
            for whole, pieces in groups:
                # The whole mention when it has a near name, else its pieces ("Germany and the UK").
                candidates += nearest[whole] or [c for piece in pieces for c in nearest[piece]]
            for cand in sorted(candidates, key=lambda c: -c.score):
                out.setdefault(cand.id, cand)
            linked.append(list(out.values())[: self.max_entities])
        return linked

    # -- string matching --------------------------------------------------------------------
    def _string_matches(self, tokens: List[_Token]) -> List[Tuple[Tuple[int, int], List[int], str]]:
        """((start, end) token span, entity ids, question words) of the kept n-gram matches."""
        spans = []
        for start in range(len(tokens)):
            for end in range(start + 1, min(start + self._ngram, len(tokens)) + 1):
                words = tokens[start:end]
                ids = self._by_name.get(" ".join(t.norm for t in words))
                if ids and any(t.content for t in words):
                    spans.append(((start, end), ids, " ".join(t.text for t in words)))
        spans = [s for s in spans if not any(_inside(s[0], o[0]) for o in spans)]
        named = [s for s in spans if any(t.named for t in tokens[s[0][0]:s[0][1]])]
        kept = named or spans
        return sorted(kept, key=lambda s: (-(s[0][1] - s[0][0]), s[0][0]))

    # -- embedding matching -----------------------------------------------------------------
    def _unmatched_mentions(self, tokens: List[_Token], matches) -> List[Tuple[str, List[str]]]:
        """(mention, its pieces split at function words) for each mention no match covers; of a
        mention that a match covers in part, the pieces outside the match stand alone."""
        covered = {i for (start, end), _, _ in matches for i in range(start, end)}
        keep = (lambda t: t.named) if any(t.named for t in tokens) or matches else (lambda t: t.content)

        def text(start: int, end: int) -> str:
            return " ".join(t.text for t in tokens[start:end])

        groups = []
        for start, end in _runs(tokens, keep):
            pieces = [(start + a, start + b) for a, b in _runs(tokens[start:end], keep, bridge=False)]
            if covered.intersection(range(start, end)):
                groups += [(text(a, b), []) for a, b in pieces if not covered.intersection(range(a, b))]
            else:
                groups.append((text(start, end), [text(a, b) for a, b in pieces if (a, b) != (start, end)]))
        return groups

    def _nearest(self, mentions: List[str]) -> Dict[str, List[LinkedEntity]]:
        emb = F.normalize(torch.as_tensor(self._encode(mentions)).float(), dim=-1)  # [M, D]
        sim = emb.to(self._embeddings.device) @ self._embeddings.t()  # [M, N]
        scores, ids = sim.topk(min(self.per_mention, sim.shape[1]), dim=-1)
        out = {}
        for mention, row_scores, row_ids in zip(mentions, scores.tolist(), ids.tolist()):
            out[mention] = [LinkedEntity(self.entity_names[i], i, s, "embedding", mention)
                            for s, i in zip(row_scores, row_ids) if s >= self.threshold]
        return out


def _inside(span: Tuple[int, int], other: Tuple[int, int]) -> bool:
    """Whether ``span`` lies within ``other`` and is shorter."""
    return other[0] <= span[0] and span[1] <= other[1] and span != other


def _runs(tokens: List[_Token], keep: Callable[[_Token], bool], bridge: bool = True) -> List[Tuple[int, int]]:
    """Maximal token spans that start and end with a kept token; with ``bridge``, function
    words may join two kept tokens ("Battle of Mine Creek"), nothing else may."""
    runs, start, last = [], None, None
    for i, token in enumerate(tokens):
        if keep(token):
            if start is None:
                start = i
            last = i
        elif start is not None and (token.content or not bridge):
            runs.append((start, last + 1))
            start = None
    if start is not None:
        runs.append((start, last + 1))
    return runs
