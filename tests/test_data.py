"""Stage-1 readers, KG / QA stage-2 processing, the cache and batching (gfmrag_fast.data).

Most tests use a stub text model (deterministic vectors, records its calls) so that they run in
milliseconds; the real all-MiniLM-L6-v2 is used for the umls build on the shared data.
"""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from gfmrag_fast.data import (
    KGDataset,
    QADataset,
    collate_qa,
    entities_weight,
    load_datasets,
    read_json,
    read_triples,
)
from gfmrag_fast.data.cache import fingerprint
from gfmrag_fast.text_emb import TextEmbModel

FIXTURES = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DIM = 8


class StubEmb:
    """Deterministic text → [DIM] vectors from a hash; records every call."""

    def __init__(self, name="stub", **extra):
        self.cfg = {"text_emb_model_name": name, **extra}
        self.calls = []

    def config_dict(self):
        return dict(self.cfg)

    def encode(self, texts, is_query=False, show_progress_bar=False):
        self.calls.append((list(texts), is_query))
        rows = [list(hashlib.sha256(t.encode()).digest()[:DIM]) for t in texts]
        return torch.tensor(rows, dtype=torch.float32).view(len(texts), DIM) / 255


class RaisingEmb(StubEmb):
    def encode(self, texts, is_query=False, show_progress_bar=False):
        raise AssertionError("the text model must not be called when the cache is valid")


def stage1(root, name):
    return Path(root) / name / "processed" / "stage1"


@pytest.fixture
def root(tmp_path):
    """A writable copy of the hand-written fixtures."""
    for name in ("tiny_kg", "tiny_qa"):
        shutil.copytree(FIXTURES / name, tmp_path / name)
    return tmp_path


def write_kg(root, name, text):
    folder = stage1(root, name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kg.txt").write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- readers
def test_read_triples_strips_and_skips_blank_lines():
    triples, skipped = read_triples(stage1(FIXTURES, "tiny_kg") / "kg.txt")
    assert skipped == 0
    assert triples[-1] == ("paris", "located in", "europe")
    assert len(triples) == 5


@pytest.mark.parametrize("bad", ["a,b", "a,b,c,d", "a,,c", "  ,r,t"])
def test_malformed_line_names_file_and_line(tmp_path, bad):
    path = tmp_path / "kg.txt"
    path.write_text(f"x,r,y\n\n{bad}\nz,r,w\n")
    with pytest.raises(ValueError, match=r"kg\.txt:3: malformed"):
        read_triples(path)


def test_non_utf8_line_is_malformed(tmp_path):
    path = tmp_path / "kg.txt"
    path.write_bytes(b"x,r,y\n\xff\xfe,r,z\n")
    with pytest.raises(ValueError, match=r"kg\.txt:2: .*not UTF-8"):
        read_triples(path)
    assert read_triples(path, on_error="skip") == ([("x", "r", "y")], 1)


def test_skip_mode_counts_and_warns(root, caplog):
    write_kg(root, "bad", "a,r,b\na,b\nb,r,c\nc,r,d,e\n")
    with caplog.at_level(logging.WARNING):
        ds = KGDataset(root, "bad", text_emb_model=StubEmb(), on_error="skip")
    assert ds.stats["skipped_lines"] == 2
    assert ds.graph.target_edge_index.tolist() == [[0, 1], [1, 2]]
    assert "skipped 2 malformed line(s)" in caplog.text
    with pytest.raises(ValueError, match=r"kg\.txt:2"):
        KGDataset(root, "bad", text_emb_model=StubEmb())  # "raise" never reuses the skip-mode cache


def test_missing_files_name_the_path(root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*kg\.txt"):
        KGDataset(root, "nowhere", text_emb_model=StubEmb())
    with pytest.raises(FileNotFoundError, match="document2entities.json"):
        QADataset(root, "tiny_kg", text_emb_model=StubEmb())
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_json(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_triples(tmp_path / "missing.txt")


def test_invalid_json_names_file_and_line(root):
    (stage1(root, "tiny_qa") / "train.json").write_text('[\n {"id": "q1",\n  "question": oops}\n]\n')
    with pytest.raises(ValueError, match=r"train\.json:3: invalid JSON"):
        QADataset(root, "tiny_qa", text_emb_model=StubEmb())


def test_question_without_required_field(root):
    (stage1(root, "tiny_qa") / "test.json").write_text('[{"id": "t", "question": "?", "supporting_facts": []}]')
    with pytest.raises(ValueError, match=r"test\.json: question 0 \(id 't'\) lacks field\(s\) \['question_entities', "):
        QADataset(root, "tiny_qa", text_emb_model=StubEmb())


# --------------------------------------------------------------------------- KG
def test_kg_numbering_and_inverse_edges(root):
    emb = StubEmb()
    ds = KGDataset(root, "tiny_kg", text_emb_model=emb)
    g = ds.graph
    ents = ["paris", "france", "european union", "berlin", "germany", "europe", "rome", "italy", "lisbon", "portugal"]
    assert ds.ent2id == {name: i for i, name in enumerate(ents)}
    rels = ["capital of", "member of", "located in"]
    names = rels + ["inverse_" + r for r in rels]
    assert ds.rel2id == {name: i for i, name in enumerate(names)}
    assert json.loads((Path(ds.processed_dir) / "rel2id.json").read_text()) == ds.rel2id
    assert json.loads((Path(ds.processed_dir) / "ent2id.json").read_text()) == ds.ent2id
    heads, tails, types = [0, 1, 3, 4, 0], [1, 2, 4, 2, 5], [0, 1, 0, 1, 2]
    assert g.target_edge_index.tolist() == [heads, tails]
    assert g.target_edge_type.tolist() == types
    assert g.edge_index.tolist() == [heads + tails, tails + heads]
    assert g.edge_type.tolist() == types + [t + 3 for t in types]
    assert g.edge_index.dtype == g.edge_type.dtype == torch.long
    assert (g.num_nodes, g.num_relations, ds.num_nodes, ds.num_relations, ds.feat_dim) == (10, 6, 10, 6, DIM)
    # all 2R relation names embedded once, as passages, rows in relation-id order
    assert emb.calls == [(names, False)]
    assert g.rel_emb.dtype == torch.float32
    torch.testing.assert_close(g.rel_emb, StubEmb().encode(names))


def test_valid_and_test_triples_mapped(root, caplog):
    with caplog.at_level(logging.WARNING):
        ds = KGDataset(root, "tiny_kg", text_emb_model=StubEmb())
    # (h, t, r); rome / italy / lisbon / portugal appended after the kg.txt entities
    assert ds.graph.valid_triples.tolist() == [[3, 5, 2], [6, 7, 0]]
    assert ds.graph.test_triples.tolist() == [[7, 2, 1], [8, 9, 0]]
    assert ds.stats["valid"] == {"triples": 2, "dropped_unseen_relation": 1, "new_entities": 2, "skipped_lines": 0}
    assert ds.stats["test"]["new_entities"] == 2
    assert ds.stats["kg_entities"] == 6 and ds.stats["entities"] == 10
    assert "madrid" not in ds.ent2id  # only in a dropped triple
    assert "dropped 1 triple(s)" in caplog.text


def test_kg_without_held_out_files(root):
    write_kg(root, "plain", "a,r,b\n")
    g = KGDataset(root, "plain", text_emb_model=StubEmb()).graph
    assert "valid_triples" not in g and "test_triples" not in g


# --------------------------------------------------------------------------- QA
def test_qa_targets_skips_and_counts(root, caplog):
    emb = StubEmb()
    with caplog.at_level(logging.WARNING):
        ds = QADataset(root, "tiny_qa", text_emb_model=emb)
    assert ds.ent2id == {"alice": 0, "acme": 1, "springfield": 2, "bob": 3, "shelbyville": 4, "carol": 5}
    assert ds.stats["train"] == {
        "questions": 4, "kept": 2, "skipped": 2,
        "skipped_no_question_entities": 1, "skipped_no_supporting_entities": 1, "skipped_no_supporting_docs": 1,
        "unknown_question_entities": 2, "unknown_supporting_entities": 1, "unknown_supporting_docs": 2,
    }
    assert ds.stats["test"]["kept"] == 1 and ds.stats["test"]["skipped"] == 0
    assert "tiny_qa/train: skipped 2 of 4 questions" in caplog.text
    assert "tiny_qa/test: skipped" not in caplog.text

    train = ds.split("train")
    assert len(train) == 2 and train.ids == ["q1", "q2"] and train.sample_index.tolist() == [0, 1]
    q1, q2 = train[0], train[1]
    assert q1["id"] == "q1"
    assert q1["question_entities"].tolist() == [0]
    assert q1["supporting_entities"].tolist() == [1, 0]
    assert q1["supporting_docs"].tolist() == [0]
    assert q2["question_entities"].tolist() == [3] and q2["supporting_docs"].tolist() == [1]
    assert train[-1]["id"] == "q2"
    with pytest.raises(IndexError, match="index 2 out of range for 2 questions"):
        train[2]
    t1 = ds.split("test")[0]  # names stripped, duplicates dropped
    assert t1["question_entities"].tolist() == [1]
    assert t1["supporting_entities"].tolist() == [2, 1]
    assert t1["supporting_docs"].tolist() == [2, 0]
    with pytest.raises(KeyError, match="available"):
        ds.split("valid")

    # questions embedded as queries, only the kept ones; relation names first
    assert emb.calls[1] == (["Where does Alice work?", "Where does Bob live?"], True)
    assert emb.calls[2] == (["Which town is Acme in?"], True)
    torch.testing.assert_close(q1["question_embeddings"], StubEmb().encode(["Where does Alice work?"])[0])


def test_ent2doc_and_doc2id(root):
    ds = QADataset(root, "tiny_qa", text_emb_model=StubEmb())
    # corpus key order, not document2entities order; "Doc Z" (not in the corpus) ignored
    assert ds.doc2id == {"Doc A": 0, "Doc B": 1, "Doc C": 2, "Doc D": 3}
    assert json.loads((Path(ds.processed_dir) / "doc2id.json").read_text()) == ds.doc2id
    assert ds.ent2doc.is_sparse and ds.ent2doc.dtype == torch.float32 and ds.ent2doc.shape == (6, 4)
    expected = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert ds.ent2doc.to_dense().tolist() == expected
    assert ds.stats["documents"]["unknown_docs"] == 1 and ds.stats["documents"]["unknown_entities"] == 1
    assert ds.entities_weight().tolist() == [1.0, 0.5, 1.0, 1.0, 1.0, 0.0]


def test_documents_from_document2entities_without_corpus(root):
    (root / "tiny_qa" / "raw" / "dataset_corpus.json").unlink()
    ds = QADataset(root, "tiny_qa", text_emb_model=StubEmb())
    assert list(ds.doc2id) == ["Doc B", "Doc A", "Doc C", "Doc Z"]
    assert ds.split("train")[0]["supporting_docs"].tolist() == [1]


# --------------------------------------------------------------------------- cache
def test_cache_hit_does_not_call_text_model(root):
    first = QADataset(root, "tiny_qa", text_emb_model=StubEmb())
    again = QADataset(root, "tiny_qa", text_emb_model=RaisingEmb())
    assert again.fingerprint == first.fingerprint and again.processed_dir == first.processed_dir
    for key in ("edge_index", "edge_type", "rel_emb", "target_edge_index"):
        assert torch.equal(again.graph[key], first.graph[key])
    assert again.ent2doc.to_dense().equal(first.ent2doc.to_dense())
    assert again.stats == first.stats
    assert again.split("train")[1]["supporting_docs"].tolist() == [1]


def test_edited_input_rebuilds(root):
    emb = StubEmb()
    old = KGDataset(root, "tiny_kg", text_emb_model=emb)
    with open(stage1(root, "tiny_kg") / "kg.txt", "a") as fout:
        fout.write("rome,capital of,italy\n")
    new = KGDataset(root, "tiny_kg", text_emb_model=emb)
    assert new.fingerprint != old.fingerprint and len(emb.calls) == 2
    assert new.graph.target_edge_index.shape[1] == old.graph.target_edge_index.shape[1] + 1
    assert new.stats["valid"]["new_entities"] == 0  # rome, italy now in kg.txt
    (stage1(root, "tiny_kg") / "test.txt").unlink()  # an optional file going away counts too
    assert KGDataset(root, "tiny_kg", text_emb_model=emb).fingerprint != new.fingerprint


def test_fingerprint_follows_text_model_config(root):
    base = KGDataset(root, "tiny_kg", text_emb_model=StubEmb()).fingerprint
    assert KGDataset(root, "tiny_kg", text_emb_model=StubEmb(query_instruct="q: ")).fingerprint != base
    assert KGDataset(root, "tiny_kg", text_emb_model=StubEmb(name="other")).fingerprint != base
    # QA and KG data from the same files live in different folders
    assert QADataset(root, "tiny_qa", text_emb_model=StubEmb()).fingerprint != KGDataset(
        root, "tiny_qa", text_emb_model=StubEmb()).fingerprint
    a, b = TextEmbModel().config_dict(), TextEmbModel(normalize=False).config_dict()
    assert fingerprint("kg", a, {}, {}) != fingerprint("kg", b, {}, {})
    # batch size changes speed, not vectors (GFM-RAG leaves it out too)
    assert fingerprint("kg", a, {}, {}) == fingerprint("kg", TextEmbModel(batch_size=7).config_dict(), {}, {})


def test_force_rebuild_calls_model_again(root):
    emb = StubEmb()
    KGDataset(root, "tiny_kg", text_emb_model=emb)
    ds = KGDataset(root, "tiny_kg", text_emb_model=emb, force_rebuild=True)
    assert len(emb.calls) == 2 and ds.num_nodes == 10
    # the replaced folder is gone; the build lock file stays (deleting it would race with waiters)
    assert sorted(os.listdir(Path(ds.processed_dir).parent)) == [f".lock-{ds.fingerprint}", ds.fingerprint]


def test_failed_build_leaves_no_cache(root):
    with pytest.raises(AssertionError, match="the text model must not be called"):
        KGDataset(root, "tiny_kg", text_emb_model=RaisingEmb())
    assert [e for e in os.listdir(root / "tiny_kg" / "processed" / "stage2") if not e.startswith(".lock-")] == []


def test_load_datasets_shares_one_model(root):
    emb = StubEmb()
    kgs = load_datasets(root, ["tiny_kg", "tiny_qa"], kind="kg", text_emb_model=emb)
    assert [d.data_name for d in kgs] == ["tiny_kg", "tiny_qa"] and all(type(d) is KGDataset for d in kgs)
    (qa,) = load_datasets(root, "tiny_qa", text_emb_model=emb)
    assert isinstance(qa, QADataset) and len(emb.calls) == 2 + 3
    with pytest.raises(ValueError, match="kind"):
        load_datasets(root, ["tiny_kg"], kind="graph")


# --------------------------------------------------------------------------- batching
def test_collate_shapes_and_values(root):
    ds = QADataset(root, "tiny_qa", text_emb_model=StubEmb())
    train = ds.split("train")
    loader = DataLoader(train, batch_size=2, shuffle=False, collate_fn=train.collate_fn)
    (batch,) = list(loader)
    assert batch["ids"] == ["q1", "q2"]
    assert batch["question_embeddings"].shape == (2, DIM)
    assert batch["question_embeddings"].equal(train.question_embeddings)
    assert batch["question_entities_masks"].tolist() == [[1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]]
    assert batch["supporting_entities_masks"].tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0]]
    assert batch["supporting_docs_masks"].tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]
    for key in ("question_entities_masks", "supporting_entities_masks", "supporting_docs_masks"):
        assert batch[key].dtype == torch.float32
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        collate_qa([dict(train[0], supporting_docs=torch.tensor([3]))], num_entities=6, num_docs=3)


def test_entities_weight_sparse_and_dense():
    dense = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    expected = [0.5, 0.0, 1.0]
    assert entities_weight(dense).tolist() == expected
    assert entities_weight(dense.to_sparse()).tolist() == expected


# --------------------------------------------------------------------------- shared data
@pytest.fixture(scope="module")
def minilm():
    return TextEmbModel(device="cpu")


def copy_shared(kind, name, tmp_path):
    src = SHARED / kind / name
    if not src.is_dir():
        pytest.skip(f"{src} not present")
    shutil.copytree(src, tmp_path / name)
    for folder, _, _ in os.walk(tmp_path / name):  # shared/ files are read-only
        os.chmod(folder, 0o755)
    return tmp_path


def test_shared_umls_with_minilm(tmp_path, minilm):
    root = copy_shared("kg", "umls", tmp_path)
    ds = KGDataset(root, "umls", text_emb_model=minilm)
    assert (ds.num_nodes, ds.num_relations // 2) == (135, 46)
    assert ds.graph.target_edge_index.shape == (2, 5216) and ds.graph.edge_index.shape == (2, 10432)
    assert (ds.graph.valid_triples.shape[0], ds.graph.test_triples.shape[0]) == (652, 661)
    assert ds.graph.rel_emb.shape == (92, 384)
    torch.testing.assert_close(ds.graph.rel_emb.norm(dim=1), torch.ones(92))


def test_shared_musique_hippo(tmp_path):
    # A stub stands in for the text model: the 9,878 relation names take ~50 s to embed on
    # 2 CPU cores, and the sizes checked here do not depend on the vectors.
    root = copy_shared("qa", "musique_hippo", tmp_path)
    ds = QADataset(root, "musique_hippo", text_emb_model=StubEmb())
    assert ds.num_nodes == 16234 and ds.graph.target_edge_index.shape[1] == 30759
    # data README says 4,940 relation names; kg.txt holds 4,939 distinct ones
    assert ds.num_relations == 2 * 4939
    assert ds.num_docs == 1890
    assert (len(ds.split("train")), len(ds.split("test"))) == (70, 10)
    assert ds.stats["train"]["skipped"] == ds.stats["test"]["skipped"] == 0
    batch = ds.split("test").collate_fn([ds.split("test")[i] for i in range(4)])
    assert batch["question_entities_masks"].shape == (4, 16234)
    assert batch["supporting_docs_masks"].shape == (4, 1890)
    assert ((batch["supporting_docs_masks"].sum(1) >= 2) & (batch["supporting_docs_masks"].sum(1) <= 4)).all()
