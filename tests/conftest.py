import pytest
import torch

CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]),
]


def random_graph(num_nodes, num_edges, num_relations, seed=0, duplicates=True, special=True):
    """edge_index [2, E], edge_type [E] with parallel edges, self-loops, a hub and isolated nodes.

    Node num_nodes - 1 is isolated (no edge at all) and node 0 receives a quarter of the edges
    (a hub), when `special`.
    """
    gen = torch.Generator().manual_seed(seed)
    high = num_nodes - 1 if special and num_nodes > 2 else num_nodes
    edge_index = torch.randint(0, high, (2, num_edges), generator=gen)
    edge_type = torch.randint(0, num_relations, (num_edges,), generator=gen)
    if special and num_edges >= 8:
        edge_index[0, : num_edges // 4] = 0  # hub destination
        edge_index[1, num_edges // 4 : num_edges // 4 + 3] = edge_index[0, num_edges // 4 : num_edges // 4 + 3]  # self-loops
    if duplicates and num_edges >= 10:
        k = num_edges // 10
        edge_index[:, -k:] = edge_index[:, :k]
        edge_type[-k:] = edge_type[:k]
    return edge_index, edge_type


class HashEmb:
    """Deterministic text -> 8-d vectors (crc32 of the text: the same in every process), no model."""

    def config_dict(self):
        return {"text_emb_model_name": "crc32-8"}

    def encode(self, texts, is_query=False, show_progress_bar=False):
        import zlib

        rows = [[((zlib.crc32(f"{t}|{i}".encode()) % 1000) / 1000) for i in range(8)] for t in texts]
        return torch.tensor(rows, dtype=torch.float32).view(len(texts), 8)


def write_qa_dataset(folder, k):
    """A small GFM-RAG QA dataset: a chain of 6 + k % 3 entities, one document per edge,
    3 + k % 4 training and 2 test questions (question entity e_j, answer e_{j+1} in doc_j)."""
    import json

    n = 6 + k % 3
    stage1 = folder / "processed" / "stage1"
    stage1.mkdir(parents=True)
    (folder / "raw").mkdir()
    lines = [f"e{j},r{j % 2},e{j + 1}" for j in range(n - 1)] + [f"e0,r2,e{n - 1}"]
    (stage1 / "kg.txt").write_text("".join(line + "\n" for line in lines))
    docs = {f"doc{j}": [f"e{j}", f"e{j + 1}"] for j in range(n - 1)}
    (stage1 / "document2entities.json").write_text(json.dumps(docs))
    (folder / "raw" / "dataset_corpus.json").write_text(json.dumps({title: f"{title} of {k}" for title in docs}))

    def questions(count, prefix):
        return [{"id": f"{prefix}{i}", "question": f"{prefix} {i} of {k}?", "answer": "",
                 "question_entities": [f"e{i % (n - 1)}"], "supporting_entities": [f"e{i % (n - 1) + 1}"],
                 "supporting_facts": [f"doc{i % (n - 1)}"]} for i in range(count)]

    (stage1 / "train.json").write_text(json.dumps(questions(3 + k % 4, "q")))
    (stage1 / "test.json").write_text(json.dumps(questions(2, "t")))


def write_kg_dataset(folder, k):
    """A small KG: 10 + k entities, 3 relations, 10 + k training triples, 3 valid and 3 test."""
    import random

    rng = random.Random(k)
    triples = sorted({(f"n{rng.randrange(10 + k)}", f"rel{rng.randrange(3)}", f"n{rng.randrange(10 + k)}")
                      for _ in range(200)})
    rng.shuffle(triples)
    train = triples[:10 + k]
    relations = {r for _, r, _ in train}
    held_out = [t for t in triples[10 + k:] if t[1] in relations][:6]
    stage1 = folder / "processed" / "stage1"
    stage1.mkdir(parents=True)
    for name, part in (("kg.txt", train), ("valid.txt", held_out[:3]), ("test.txt", held_out[3:])):
        (stage1 / name).write_text("".join(",".join(t) + "\n" for t in part))


@pytest.fixture(scope="session")
def many_datasets_root(tmp_path_factory):
    """12 QA datasets qa00..qa11 and 12 KG datasets kg00..kg11, their stage-2 caches built."""
    from gfmrag_fast.data import KGDataset, QADataset

    root = tmp_path_factory.mktemp("many")
    for k in range(12):
        write_qa_dataset(root / f"qa{k:02d}", k)
        write_kg_dataset(root / f"kg{k:02d}", k)
        QADataset(str(root), f"qa{k:02d}", text_emb_model=HashEmb())
        KGDataset(str(root), f"kg{k:02d}", text_emb_model=HashEmb())
    return root


class Census:
    """Loads datasets from disk as a run would (LazyDataset) and counts how many of the loaded
    objects are alive (weak references: a dataset kept by anyone counts)."""

    def __init__(self, root, kind):
        self.root, self.kind, self.refs, self.loaded = str(root), kind, [], []

    def load(self, name):
        import weakref

        from gfmrag_fast.data import KGDataset, QADataset

        ds = (QADataset if self.kind == "qa" else KGDataset)(self.root, name, text_emb_model=HashEmb())
        self.refs.append(weakref.ref(ds))
        self.loaded.append(name)
        return ds

    def alive(self):
        return sum(ref() is not None for ref in self.refs)

    def lazy(self, names, describe):
        """LazyDatasets of ``names``, described once (as the workflows' scan does)."""
        import functools

        from gfmrag_fast.data import KGDataset, LazyDataset, QADataset

        cls = QADataset if self.kind == "qa" else KGDataset
        infos = [describe(cls(self.root, name, text_emb_model=HashEmb())) for name in names]
        return [LazyDataset(name, functools.partial(self.load, name), info) for name, info in zip(names, infos)]


@pytest.fixture
def one_thread():
    """Tiny graphs: one thread is fastest, and OpenMP threads spinning on a shared CPU are slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_model(kind):
    """A 2 x 8 GNNRetriever ("qa") or QueryGNN ("kg") over 8-d text embeddings, seeded."""
    from gfmrag_fast.models import build_model

    torch.manual_seed(0)
    target, entity = (("GNNRetriever", "QueryNBFNet") if kind == "qa" else ("QueryGNN", "EntityNBFNet"))
    return build_model({"_target_": f"gfmrag.models.{target}", "rel_emb_dim": 8,
                        "entity_model": {"_target_": f"gfmrag.ultra.models.{entity}", "input_dim": 8,
                                         "hidden_dims": [8, 8], "message_func": "distmult", "aggregate_func": "sum",
                                         "short_cut": True, "layer_norm": True}})


def make_task(kind, train_sets, valid_sets, **kwargs):
    """The fine-tuning ("qa") or pre-training ("kg") task with small batches (GFM-RAG's losses)."""
    from gfmrag_fast.models.doc_ranker import IDFWeightedTopKRanker
    from gfmrag_fast.training.kg_task import KGCompletionTask
    from gfmrag_fast.training.qa_task import QAFinetuneTask

    if kind == "qa":
        losses = [{"name": "bce", "loss": {"_target_": "gfmrag.losses.BCELoss", "adversarial_temperature": 0.2},
                   "cfg": {"weight": 0.3}}, {"name": "pcr", "loss": {"_target_": "gfmrag.losses.ListCELoss"},
                                             "cfg": {"weight": 0.7}}]
        return QAFinetuneTask(train_sets, valid_sets, losses, IDFWeightedTopKRanker, ["mrr", "recall@2"], 2, 2, True,
                              None, {}, torch.device("cpu"), seed=5, **kwargs)
    return KGCompletionTask(train_sets, valid_sets, num_negative=4, strict_negative=True, adversarial_temperature=1.0,
                            batch_size=4, eval_batch_size=8, metrics=["mrr", "hits@1"], fast_test=None,
                            text_emb_conf={}, device=torch.device("cpu"), seed=5, **kwargs)


def describe_for(kind):
    from gfmrag_fast.training.kg_task import describe_kg_dataset
    from gfmrag_fast.training.qa_task import describe_qa_dataset

    return describe_qa_dataset if kind == "qa" else describe_kg_dataset


METRIC = {"qa": "ent_mrr", "kg": "mrr"}
