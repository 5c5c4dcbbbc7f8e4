"""The retrieval layer: entity linking, rankers, path explanations, GFMRetriever, checkpoint loading.

A stub text model (character-trigram vectors: similar strings get similar vectors) keeps these
in milliseconds; one test loads a saved checkpoint with its real text model (MiniLM, offline).
"""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from gfmrag_fast import GFMRetriever
from gfmrag_fast.data import QADataset, read_triples
from gfmrag_fast.models import GNNRetriever
from gfmrag_fast.checkpoints import build_model, save_pretrained
from gfmrag_fast.doc_rankers import HybridRanker, IDFWeightedTopKRanker
from gfmrag_fast.checkpoints import CheckpointError
from gfmrag_fast.retrieval import EntityLinker, load_checkpoint, make_doc_ranker, normalize_name, text_model_from_config
from gfmrag_fast.retrieval.evaluation import evaluate_split
from gfmrag_fast.retrieval.paths import beam_search_paths, describe_step, edge_importance, layered_forward

from helpers import TRIGRAM_DIM, TrigramEmb, trigram_vectors

FIXTURES = Path(__file__).parent / "data"
DIM = TRIGRAM_DIM


class Unsafe:
    """Any class: unpickling it means calling code, which weights_only loading refuses."""


class RaisingEmb(TrigramEmb):
    def encode(self, texts, is_query=False, show_progress_bar=False):
        raise AssertionError("the text model must not be called when the cache is valid")


@pytest.fixture
def root(tmp_path):
    shutil.copytree(FIXTURES / "tiny_qa", tmp_path / "tiny_qa")
    return tmp_path


@pytest.fixture
def dataset(root):
    return QADataset(root, "tiny_qa", text_emb_model=TrigramEmb())


def tiny_model(dim=DIM, layers=2, seed=0):
    torch.manual_seed(seed)
    return build_model({
        "_target_": "gfmrag.models.GNNRetriever", "rel_emb_dim": dim,
        "entity_model": {"_target_": "gfmrag.ultra.models.QueryNBFNet", "input_dim": 8, "hidden_dims": [8] * layers,
                         "message_func": "distmult", "aggregate_func": "sum", "short_cut": True, "layer_norm": True},
    }).eval()


@pytest.fixture
def retriever(dataset):
    return GFMRetriever(tiny_model(), dataset, device="cpu")


# --------------------------------------------------------------------------- entity linking
NAMES = ["new york", "york", "the who", "the", "country", "director", "battle of mine creek", "germany", "uk",
         "hello love", "1930", "mr  cool"]


def linked(linker, question):
    return [e.name for e in linker(question)]


def test_string_match_prefers_longest_and_named():
    linker = EntityLinker(NAMES)
    assert normalize_name("Mr. Cool's") == "mr cool s"
    # "york" lies inside "new york"; "the" is a function word; "country" is a common noun and
    # a name is present; "Hello Love's" matches through the normalisation
    assert linked(linker, "Which country did Hello Love's singer leave for New York in 1930?") == [
        "hello love", "new york", "1930"]
    assert linked(linker, "Who is the director of the country?") == ["director", "country"]
    assert linked(linker, "Is the Mr. Cool show good?") == ["mr  cool"]
    assert linked(linker, "What is it?") == []  # nothing linkable: empty, no error


def test_embedding_neighbours_threshold_cap_and_pieces():
    embeddings = trigram_vectors(NAMES)
    linker = EntityLinker(NAMES, embeddings, trigram_vectors, threshold=0.6, max_entities=5)
    found = linker("When did the Battle of Mine Creeks happen?")  # a near miss of a name
    assert [(e.name, e.method) for e in found] == [("battle of mine creek", "embedding")]
    assert 0.6 <= found[0].score < 1.0 and found[0].mention == "Battle of Mine Creeks"
    # the whole mention has no near name (0.73 < 0.8): its pieces are tried, "UKs" is not near enough
    linker = EntityLinker(NAMES, embeddings, trigram_vectors, threshold=0.8)
    assert linked(linker, "Did Germanys and the UKs trade?") == ["germany"]
    # "UK" is a string match; the rest of the mention still gets its neighbour
    assert [(e.name, e.method) for e in linker("Did Germanys and the UK trade?")] == [
        ("uk", "string"), ("germany", "embedding")]
    strict = EntityLinker(NAMES, embeddings, trigram_vectors, threshold=0.999)
    assert linked(strict, "When did the Battle of Mine Creeks happen?") == []
    capped = EntityLinker(NAMES, embeddings, trigram_vectors, max_entities=1)
    assert linked(capped, "Did Hello Love leave New York in 1930?") == ["hello love"]
    assert EntityLinker(NAMES, embeddings, trigram_vectors).link_many(["Zxqv?", ""]) == [[], []]
    with pytest.raises(ValueError, match="rows"):
        EntityLinker(NAMES, embeddings[:3], trigram_vectors)


# --------------------------------------------------------------------------- rankers
def test_hybrid_ranker_mixes_min_max_scores(dataset):
    ent2doc = dataset.ent2doc
    docs = torch.eye(4, DIM)
    ent_pred = torch.randn(2, dataset.num_nodes)
    questions = torch.stack([docs[3], docs[1]])  # question 0 nearest document 3, question 1 document 1
    gnn = IDFWeightedTopKRanker(ent2doc, top_k=2)(ent_pred)
    only_gnn = HybridRanker(ent2doc, docs, dense_weight=0.0, gnn_ranker=IDFWeightedTopKRanker(ent2doc, top_k=2))
    assert torch.equal(only_gnn(ent_pred, questions).argsort(descending=True, stable=True),
                       gnn.argsort(descending=True, stable=True))
    dense = HybridRanker(ent2doc, docs, dense_weight=1.0)(ent_pred, questions)
    assert dense.argmax(-1).tolist() == [3, 1] and dense.max() == 1.0 and dense.min() == 0.0
    mixed = HybridRanker(ent2doc, docs, dense_weight=0.5)
    no_entities = mixed(ent_pred, questions, has_entities=torch.tensor([False, True]))
    assert torch.equal(no_entities[0], dense[0])
    with pytest.raises(ValueError, match="question embeddings"):
        mixed(ent_pred)
    with pytest.raises(ValueError, match="dense_weight"):
        HybridRanker(ent2doc, docs, dense_weight=1.5)
    with pytest.raises(ValueError, match="doc_embeddings"):
        HybridRanker(ent2doc, docs[:3])


def test_make_doc_ranker_names_and_configs(dataset):
    calls = []

    def embeddings():
        calls.append(1)
        return torch.eye(4, DIM)

    ent2doc = dataset.ent2doc
    assert type(make_doc_ranker("idf_topk", ent2doc, embeddings)) is IDFWeightedTopKRanker
    assert type(make_doc_ranker("topk_ranker", ent2doc, embeddings)).__name__ == "TopKRanker"
    assert not calls  # GNN rankers never build document embeddings
    assert make_doc_ranker("dense", ent2doc, embeddings).dense_weight == 1.0
    ranker = make_doc_ranker({"_target_": "gfmrag_fast.doc_rankers.HybridRanker", "dense_weight": 0.2,
                              "gnn_ranker": {"_target_": "gfmrag.doc_rankers.TopKRanker", "top_k": 3}}, ent2doc, embeddings)
    assert ranker.dense_weight == 0.2 and ranker.gnn_ranker.top_k == 3
    with pytest.raises(ValueError, match="unknown doc_ranker"):
        make_doc_ranker("bm25", ent2doc, embeddings)


# --------------------------------------------------------------------------- path explanations
def test_layered_forward_matches_model_and_edge_gradients_sum_over_layers(dataset):
    model = tiny_model()
    graph = dataset.graph
    q = torch.randn(1, DIM)
    mask = torch.zeros(1, dataset.num_nodes)
    mask[0, 0] = 1
    weight = dataset.entities_weight()
    ones = [torch.ones(graph.edge_index.shape[1]) for _ in range(2)]
    expected = model(graph, {"question_embeddings": q, "question_entities_masks": mask}, entities_weight=weight)
    torch.testing.assert_close(layered_forward(model, graph, q, mask, weight, ones), expected)
    # chain rule: one shared edge weight's gradient is the sum of the per-layer ones
    doc_weights = (dataset.ent2doc.to_dense() * dataset.entities_weight()[:, None]).t()  # [D, N]
    per_layer = edge_importance(model, graph, q[0], torch.tensor([0]), weight, doc_weights)  # [D, L, E]
    shared = torch.ones(graph.edge_index.shape[1], requires_grad=True)
    logits = model(graph, {"question_embeddings": q, "question_entities_masks": mask}, entities_weight=weight,
                   edge_weight=shared)[0]
    (grad,) = torch.autograd.grad((doc_weights[1] @ torch.sigmoid(logits)), shared)
    torch.testing.assert_close(per_layer[1].sum(0), grad)


def test_beam_search_finds_the_important_path():
    # edge e carries edge_index[1, e] -> edge_index[0, e]; a chain 0 -> 1 -> 2 -> 3 plus a shortcut 0 -> 3
    # and edges back, over 3 layers
    edge_index = torch.tensor([[1, 2, 3, 3, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3]])
    importance = torch.zeros(3, 7)
    importance[:, :3] = 1.0  # the chain is important at every layer
    importance[:, 3] = 0.5  # the shortcut less so
    importance[:, 4:] = 5.0  # going back would be, but 1 -> 0 after 0 -> 1 is straight back
    paths = beam_search_paths(edge_index, importance, torch.tensor([0]), torch.tensor([3]), 4, top_k=2)
    assert [p.edges for p in paths] == [[0, 1, 2], [3]]
    assert [p.nodes for p in paths] == [[0, 1, 2, 3], [0, 3]]
    assert paths[0].importance == pytest.approx(3.0) and paths[1].importance == pytest.approx(0.5)
    # two layers: the chain no longer fits; a path of fewer edges than layers is found
    (short,) = beam_search_paths(edge_index, importance[:2], torch.tensor([0]), torch.tensor([3]), 4, top_k=3)
    assert short.edges == [3]
    # a path does not go on from a target it reached
    assert beam_search_paths(edge_index, importance, torch.tensor([0]), torch.tensor([1, 3]), 4, top_k=5)[0].nodes \
        == [0, 1]


def test_describe_step_reports_the_kg_triple(dataset):
    graph, names, rels = dataset.graph, list(dataset.ent2id), dataset.rel_names
    num_triples = graph.target_edge_index.shape[1]
    # direct edge 0 stores (alice, works at, acme) as edge_index (alice, acme): messages acme -> alice
    step, triple = describe_step(0, graph.edge_index, graph.edge_type, dataset.num_relations, names, rels)
    assert triple == ("alice", "works at", "acme") and step == " <-[works at]- alice"
    step, triple = describe_step(num_triples, graph.edge_index, graph.edge_type, dataset.num_relations, names, rels)
    assert triple == ("alice", "works at", "acme") and step == " -[works at]-> acme"


# --------------------------------------------------------------------------- GFMRetriever
def test_entity_and_document_embeddings_built_once_and_cached(root, dataset):
    emb = dataset.text_emb_model
    documents = dataset.document_embeddings()
    assert documents.shape == (4, DIM) and emb.calls[-1] == ([f"Doc {c}\n" + t for c, t in zip(
        "ABCD", json.loads((root / "tiny_qa" / "raw" / "dataset_corpus.json").read_text()).values())], False)
    calls = len(emb.calls)
    assert dataset.document_embeddings() is documents and len(emb.calls) == calls  # kept, not rebuilt
    torch.testing.assert_close(dataset.entity_embeddings(), trigram_vectors(list(dataset.ent2id)))
    torch.testing.assert_close(documents[0], trigram_vectors([emb.calls[calls - 1][0][0]])[0])
    again = QADataset(root, "tiny_qa", text_emb_model=RaisingEmb())  # both load from their caches
    torch.testing.assert_close(again.document_embeddings(), documents)
    torch.testing.assert_close(again.entity_embeddings(), dataset.entity_embeddings())
    stage2 = sorted(e for e in os.listdir(Path(dataset.processed_dir).parent) if not e.startswith("."))
    assert len(stage2) == 3  # the dataset's folder and one per kind of embeddings


def test_retrieve_ranks_documents(retriever, caplog):
    docs = retriever.retrieve("Where does Alice work?", top_k=3)
    assert len(docs) == 3 and set(docs[0]) == {"title", "text", "score"}
    assert [d["score"] for d in docs] == sorted((d["score"] for d in docs), reverse=True)
    assert docs[0]["text"] == json.loads((Path(retriever.dataset.dataset_dir) / "raw" / "dataset_corpus.json").read_text())[docs[0]["title"]]
    many = retriever.retrieve(["Where does Alice work?", "Where does Bob live?"], top_k=2)
    assert len(many) == 2 and many[0] == docs[:2]
    given = retriever.retrieve("Where does she work?", entities=["alice ", "nobody"], top_k=3, return_entities=True)
    assert given["question_entities"] == ["alice"] and given["documents"] == docs
    assert len(given["entities"]) == 6 and all(0 <= e["score"] <= 1 for e in given["entities"])
    assert "unknown entities ignored: ['nobody']" in caplog.text
    with pytest.raises(ValueError, match="one list of names per question"):
        retriever.retrieve(["a?", "b?"], entities=[["alice"]])


def test_retriever_prepares_its_graph_once(retriever, monkeypatch):
    """The graph is prepared (RelGraph built) when the retriever is made, not per retrieve/explain call."""
    from gfmrag_fast.models.graph_input import rel_graph_of
    from gfmrag_fast.ops import RelGraph

    built, init = [], RelGraph.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(RelGraph, "__init__", counting)
    assert rel_graph_of(retriever.graph) is retriever.graph.rel_graph
    retriever.retrieve("Where does Alice work?", top_k=2)
    retriever.explain("Where does Bob live?", entities=["carol"], top_k_docs=1, top_k_paths=1)
    assert built == []


def test_question_with_no_linkable_entity(dataset, caplog):
    with caplog.at_level(logging.WARNING):
        gnn = GFMRetriever(tiny_model(), dataset, device="cpu")
        assert gnn.retrieve("What is it?") == []
        assert gnn.retrieve(["What is it?"], return_entities=True) == [
            {"documents": [], "entities": [], "question_entities": []}]
        assert gnn.explain("What is it?") == []
    assert "no entity of the knowledge graph found in the question" in caplog.text
    hybrid = GFMRetriever(tiny_model(), dataset, device="cpu", doc_ranker="hybrid")
    docs = hybrid.retrieve("What is in Doc D?", top_k=4)  # ranked by dense similarity alone
    assert len(docs) == 4 and docs[0]["title"] == "Doc D"


def test_explain_paths_are_kg_edges(retriever):
    triples = set(read_triples(Path(retriever.dataset.stage1_dir) / "kg.txt")[0])
    ent2doc = retriever.dataset.ent2doc.to_dense()
    explained = retriever.explain("Where does Bob live?", entities=["carol"], top_k_docs=2, top_k_paths=3)
    assert len(explained) == 2 and any(doc["paths"] for doc in explained)
    for doc in explained:
        doc_entities = {name for name, i in retriever.dataset.ent2id.items()
                        if ent2doc[i, retriever.dataset.doc2id[doc["title"]]] > 0}
        assert len(doc["paths"]) <= 3
        for path in doc["paths"]:
            assert path["path"].startswith("carol") and path["entities"][0] == "carol"
            assert path["entities"][-1] in doc_entities and len(path["triples"]) == len(path["entities"]) - 1
            for (head, relation, tail), a, b in zip(path["triples"], path["entities"], path["entities"][1:]):
                assert (head, relation, tail) in triples and {head, tail} == {a, b}


def test_evaluate_split_with_linked_entities(retriever, dataset):
    row, predictions = evaluate_split(retriever, dataset.split("test"), ["mrr", "recall@2"], entities="linked", top_k=2)
    assert row["link_precision"] == 1.0 and row["link_recall"] == 1.0 and row["no_entities"] == 0
    assert predictions[0]["question_entities"] == ["acme"] and predictions[0]["gold_documents"] == ["Doc C", "Doc A"]
    blind = GFMRetriever(tiny_model(), dataset, device="cpu", entity_linker=EntityLinker(["zzz"] * dataset.num_nodes))
    row, predictions = evaluate_split(blind, dataset.split("test"), ["mrr", "recall@2"], entities="linked")
    assert row["no_entities"] == 1 and row["doc_recall@2"] == 0.0 and predictions[0]["documents"] == []


# --------------------------------------------------------------------------- loading
def test_checkpoint_text_config_cannot_enable_remote_code(caplog):
    config = {"_target_": "gfmrag.text_emb_models.BaseTextEmbModel", "text_emb_model_name": "some/model",
              "trust_remote_code": True, "model_kwargs": {"trust_remote_code": True, "torch_dtype": "float32"},
              "surprise": 1}
    with caplog.at_level(logging.WARNING):
        model = text_model_from_config(config)
    assert model.trust_remote_code is False and model.model_kwargs == {"torch_dtype": "float32"}
    assert "trust_remote_code: ignored" in caplog.text and "unknown keys ['surprise']" in caplog.text
    assert text_model_from_config(config, trust_remote_code=True).trust_remote_code is True


def test_load_checkpoint_forms(tmp_path):
    model = tiny_model()
    run = tmp_path / "run"
    save_pretrained(model, {"text_emb_model_name": "trigram-stub", "trust_remote_code": True}, str(run / "pretrained"))
    for spec in (run, run / "pretrained"):
        loaded, text = load_checkpoint(str(spec))
        assert isinstance(loaded, GNNRetriever) and text["text_emb_model_name"] == "trigram-stub"
        torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    # a training checkpoint, rebuilt from the run's Hydra config
    training = tmp_path / "run2"
    (training / ".hydra").mkdir(parents=True)
    (training / ".hydra" / "config.yaml").write_text(
        "model:\n  _target_: gfmrag.models.GNNRetriever\n  rel_emb_dim: null\n  entity_model:\n"
        "    _target_: gfmrag.ultra.models.QueryNBFNet\n    input_dim: 8\n    hidden_dims: [8, 8]\n"
        "    short_cut: true\n    layer_norm: true\ntext_emb_model:\n  text_emb_model_name: trigram-stub\n")
    torch.save({"model": model.state_dict(), "epoch": 1}, training / "model_best.pth")
    for spec in (training, training / "model_best.pth"):
        loaded, text = load_checkpoint(str(spec))
        torch.testing.assert_close(loaded.state_dict(), model.state_dict())
        assert text == {"text_emb_model_name": "trigram-stub"}
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(str(tmp_path / "nowhere"))
    # a file that asks to run code when unpickled is refused, not loaded
    torch.save({"model": model.state_dict(), "evil": Unsafe()}, training / "model_best.pth")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(str(training))


def test_from_pretrained_with_the_checkpoints_text_model(root, tmp_path):
    """The saved text_emb_model_config (MiniLM, offline) embeds the dataset; its trust_remote_code is dropped."""
    text_config = {"text_emb_model_name": "sentence-transformers/all-MiniLM-L6-v2", "normalize": True,
                   "batch_size": 32, "query_instruct": "", "passage_instruct": "", "model_kwargs": None,
                   "trust_remote_code": True}
    save_pretrained(tiny_model(dim=384), text_config, str(tmp_path / "pretrained"))
    r = GFMRetriever.from_pretrained(str(tmp_path / "pretrained"), data_root=root, data_name="tiny_qa", device="cpu")
    assert r.text_emb_model.trust_remote_code is False and r.dataset.feat_dim == 384
    assert [e.name for e in r.link("Which town is Acme in?")] == ["acme"]
    assert len(r.retrieve("Which town is Acme in?", top_k=2)) == 2
    with pytest.raises(ValueError, match="384-d"):
        GFMRetriever(tiny_model(dim=DIM), r.dataset)
