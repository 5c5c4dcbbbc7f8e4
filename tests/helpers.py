"""What several test modules share: device parameters, small models and graphs, tiny datasets,
multi-process launching. Test modules import from here, never from each other or from conftest."""

import datetime
import functools
import json
import os
import random
import socket
import weakref
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gfmrag_fast.atomic_io import atomic_torch_save
from gfmrag_fast.data.readers import normalize_name
from gfmrag_fast.synthetic import random_graph

CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]),
]

try:
    import pymetis  # noqa: F401

    HAS_METIS = True
except ImportError:
    HAS_METIS = False


def workflow_config(name, overrides=()):
    """The config of workflow ``name`` (e.g. "finetune") as Hydra composes it for a run."""
    from hydra import compose, initialize_config_dir

    import gfmrag_fast

    config_dir = os.path.join(os.path.dirname(gfmrag_fast.__file__), "workflow", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name=name, overrides=list(overrides))


# ---------------------------------------------------------------- models over a small random graph

TEXT_DIM = 12  # text-embedding width of make_graph / make_batch / retriever


def make_graph(num_nodes=30, num_edges=120, num_relations=6, seed=0):
    """An asymmetric graph (no inverse edges, so direction matters) with an isolated node and a hub."""
    from torch_geometric.data import Data

    edge_index, edge_type = random_graph(num_nodes, num_edges, num_relations, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    return Data(edge_index=edge_index, edge_type=edge_type, num_nodes=num_nodes, num_relations=num_relations,
                rel_emb=torch.randn(num_relations, TEXT_DIM, generator=gen))


def make_batch(graph, batch_size=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch_size, graph.num_nodes, generator=gen) < 0.15).float()
    mask[:, graph.num_nodes - 1] = 1.0  # the isolated node is a question entity
    return {"question_embeddings": torch.randn(batch_size, TEXT_DIM, generator=gen), "question_entities_masks": mask}


def perturb(model, seed=0):
    """Seeded noise on every parameter: freshly initialised layers hide mistakes (zero biases,
    identity-like layer norms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def retriever(seed=0, **cfg):
    """A perturbed 3 x 8 GNNRetriever over TEXT_DIM-d text, and its entity-model config."""
    from gfmrag_fast.models import GNNRetriever, QueryNBFNet

    torch.manual_seed(seed)
    cfg = {"input_dim": 8, "hidden_dims": [8, 8, 8], "message_func": "distmult", "aggregate_func": "sum",
           "short_cut": True, "layer_norm": True, **cfg}
    return perturb(GNNRetriever(QueryNBFNet(**cfg), TEXT_DIM), seed), cfg


# ---------------------------------------------------------------- tiny datasets on disk


class HashEmb:
    """Deterministic text -> 8-d vectors (crc32 of the text: the same in every process), no model."""

    def config_dict(self):
        return {"text_emb_model_name": "crc32-8"}

    def encode(self, texts, is_query=False, show_progress_bar=False):
        rows = [[((zlib.crc32(f"{t}|{i}".encode()) % 1000) / 1000) for i in range(8)] for t in texts]
        return torch.tensor(rows, dtype=torch.float32).view(len(texts), 8)


TRIGRAM_DIM = 32


def trigram_vectors(texts, dim=TRIGRAM_DIM):
    """[n, dim] normalised bags of hashed character trigrams of each normalised name: similar names
    get similar vectors (entity linking), no model."""
    out = torch.zeros(len(texts), dim)
    for row, text in enumerate(texts):
        padded = f"  {normalize_name(text)} "
        for i in range(len(padded) - 2):
            out[row, zlib.crc32(padded[i:i + 3].encode()) % dim] += 1
    return torch.nn.functional.normalize(out, dim=-1)


class TrigramEmb:
    """A text model of :func:`trigram_vectors`, recording its calls (texts, is_query)."""

    def __init__(self):
        self.calls = []

    def config_dict(self):
        return {"text_emb_model_name": "trigram-stub"}

    def encode(self, texts, is_query=False, show_progress_bar=False):
        self.calls.append((list(texts), is_query))
        return trigram_vectors(list(texts))


def write_chain_dataset(folder, n, num_train, num_test, num_valid=0, shortcut=False, tag=""):
    """A GFM-RAG QA dataset over a chain of n entities e0..e{n-1}, one document per edge (doc_j holds
    e_j and e_{j+1}); question i asks from e_{i % (n-1)} to the next entity (in doc_{i % (n-1)}).
    ``shortcut`` adds an edge e0 -> e{n-1}; ``tag`` goes into every text (distinct datasets)."""
    stage1 = folder / "processed" / "stage1"
    stage1.mkdir(parents=True)
    (folder / "raw").mkdir()
    lines = [f"e{j},r{j % 2},e{j + 1}" for j in range(n - 1)] + ([f"e0,r2,e{n - 1}"] if shortcut else [])
    (stage1 / "kg.txt").write_text("".join(line + "\n" for line in lines))
    docs = {f"doc{j}": [f"e{j}", f"e{j + 1}"] for j in range(n - 1)}
    (stage1 / "document2entities.json").write_text(json.dumps(docs))
    (folder / "raw" / "dataset_corpus.json").write_text(json.dumps({title: f"{title}{tag}" for title in docs}))

    def questions(count, prefix):
        return [{"id": f"{prefix}{i}", "question": f"{prefix} {i}{tag}?", "answer": "",
                 "question_entities": [f"e{i % (n - 1)}"], "supporting_entities": [f"e{i % (n - 1) + 1}"],
                 "supporting_facts": [f"doc{i % (n - 1)}"]} for i in range(count)]

    (stage1 / "train.json").write_text(json.dumps(questions(num_train, "q")))
    (stage1 / "test.json").write_text(json.dumps(questions(num_test, "t")))
    if num_valid:
        (stage1 / "valid.json").write_text(json.dumps(questions(num_valid, "v")))


def write_qa_dataset(folder, k):
    """A small GFM-RAG QA dataset, different for each k: a chain of 6 + k % 3 entities with a short
    cut from its first to its last entity, 3 + k % 4 training and 2 test questions."""
    write_chain_dataset(folder, 6 + k % 3, 3 + k % 4, 2, shortcut=True, tag=f" of {k}")


def write_kg_dataset(folder, k):
    """A small KG: 10 + k entities, 3 relations, 10 + k training triples, 3 valid and 3 test."""
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


class Census:
    """Loads datasets from disk as a run would (LazyDataset) and counts how many of the loaded
    objects are alive (weak references: a dataset kept by anyone counts)."""

    def __init__(self, root, kind):
        self.root, self.kind, self.refs, self.loaded = str(root), kind, [], []

    def load(self, name):
        from gfmrag_fast.data import KGDataset, QADataset

        ds = (QADataset if self.kind == "qa" else KGDataset)(self.root, name, text_emb_model=HashEmb())
        self.refs.append(weakref.ref(ds))
        self.loaded.append(name)
        return ds

    def alive(self):
        return sum(ref() is not None for ref in self.refs)

    def lazy(self, names, describe):
        """LazyDatasets of ``names``, described once (as the workflows' scan does)."""
        from gfmrag_fast.data import KGDataset, LazyDataset, QADataset

        cls = QADataset if self.kind == "qa" else KGDataset
        infos = [describe(cls(self.root, name, text_emb_model=HashEmb())) for name in names]
        return [LazyDataset(name, functools.partial(self.load, name), info) for name, info in zip(names, infos)]


def small_model(kind):
    """A 2 x 8 GNNRetriever ("qa") or QueryGNN ("kg") over 8-d text embeddings, seeded."""
    from gfmrag_fast.checkpoints import build_model

    torch.manual_seed(0)
    target, entity = (("GNNRetriever", "QueryNBFNet") if kind == "qa" else ("QueryGNN", "EntityNBFNet"))
    return build_model({"_target_": f"gfmrag.models.{target}", "rel_emb_dim": 8,
                        "entity_model": {"_target_": f"gfmrag.ultra.models.{entity}", "input_dim": 8,
                                         "hidden_dims": [8, 8], "message_func": "distmult", "aggregate_func": "sum",
                                         "short_cut": True, "layer_norm": True}})


def make_task(kind, train_sets, valid_sets, **kwargs):
    """The fine-tuning ("qa") or pre-training ("kg") task with small batches (GFM-RAG's losses)."""
    from gfmrag_fast.doc_rankers import IDFWeightedTopKRanker
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


# ---------------------------------------------------------------- several gloo processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world_size, *args):
    """Runs ``fn(rank, *args)`` in ``world_size`` CPU processes joined in one gloo group."""
    # The children share 2 cores: their OpenMP threads must sleep, not spin, while waiting.
    # Spawned children copy this process's environment, so it is set around the spawn only.
    before = os.environ.get("OMP_WAIT_POLICY")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        mp.spawn(_init_and_run, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
    finally:
        if before is None:
            del os.environ["OMP_WAIT_POLICY"]


def _init_and_run(rank, world_size, port, fn, args):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # in the child process only
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


# --- a toy task for the trainer alone ---------------------------------------------------------
class Killed(BaseException):
    """What a SIGKILL looks like to the code after it: nothing more runs."""


class ScriptedTask:
    """Fits a linear model on batches that are a function of (epoch, step) alone (so a run can
    start at any step); the evaluation rows of each epoch are scripted per split."""

    def __init__(self, valid=None, test=None, steps=5, kill_at=None, with_num_batches=True):
        self.valid, self.test, self.steps, self.kill_at, self.epoch = valid, test, steps, kill_at, None
        if with_num_batches:
            self.num_batches = lambda epoch, env: self.steps

    def train_batches(self, epoch, env, start=0, max_steps=None):
        self.epoch = epoch
        for step in range(start, self.steps if max_steps is None else min(self.steps, max_steps)):
            if (epoch, step) == self.kill_at:
                raise Killed
            x = torch.randn(4, 3, generator=torch.Generator().manual_seed(100 * epoch + step))
            yield x, x.sum(1, keepdim=True)

    def queries(self, batch):
        return len(batch[0])

    def loss(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean(), {}

    def evaluate(self, model, env):
        rows = []
        for split, scores in (("valid", self.valid), ("test", self.test)):
            if scores is not None:
                rows.append({"dataset": "toy", "split": split, "questions": 3, "score": scores[self.epoch],
                             "ent_mrr": scores[self.epoch] / 2, "doc_mrr": scores[self.epoch] / 3})
        return rows

    def save_pretrained(self, model, folder):
        atomic_torch_save({"model": model.state_dict()}, os.path.join(folder, "model.pth"))
