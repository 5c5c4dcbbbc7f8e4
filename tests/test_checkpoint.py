"""GFM-RAG checkpoint folders: original layout, our writer, the Hugging Face cache, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch_geometric.data import Data

from gfmrag_fast.models import GNNRetriever, QueryGNN, QueryNBFNet, EntityNBFNet
from gfmrag_fast.checkpoints import load_pretrained, save_pretrained
from gfmrag_fast.checkpoints import resolve_target

TEXT_EMB_CONFIG = {
    "_target_": "gfmrag.text_emb_models.BaseTextEmbModel",
    "text_emb_model_name": "sentence-transformers/all-mpnet-base-v2",
    "normalize": True,
}


def original_config(dim=8, layers=2, text_dim=12):
    return {
        "text_emb_model_config": TEXT_EMB_CONFIG,
        "model_config": {
            "_target_": "gfmrag.models.GNNRetriever",
            "entity_model": {
                "_target_": "gfmrag.ultra.models.QueryNBFNet", "input_dim": dim, "hidden_dims": [dim] * layers,
                "message_func": "distmult", "aggregate_func": "sum", "short_cut": True, "layer_norm": True,
            },
            "rel_emb_dim": text_dim,
        },
    }


def original_state_dict(dim=8, layers=2, text_dim=12, seed=0):
    """Keys and shapes written out as GFM-RAG's GNNRetriever has them."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"question_mlp.weight": (dim, text_dim), "question_mlp.bias": (dim,),
              "rel_mlp.weight": (dim, text_dim), "rel_mlp.bias": (dim,)}
    for layer in range(layers):
        prefix = f"entity_model.layers.{layer}."
        shapes.update({prefix + "linear.weight": (dim, 2 * dim), prefix + "linear.bias": (dim,),
                       prefix + "layer_norm.weight": (dim,), prefix + "layer_norm.bias": (dim,)})
        for i in (0, 2):
            shapes.update({prefix + f"relation_projection.{i}.weight": (dim, dim),
                           prefix + f"relation_projection.{i}.bias": (dim,)})
    shapes.update({"entity_model.mlp.0.weight": (2 * dim, 2 * dim), "entity_model.mlp.0.bias": (2 * dim,),
                   "entity_model.mlp.2.weight": (1, 2 * dim), "entity_model.mlp.2.bias": (1,)})
    return {key: torch.randn(shape, generator=gen) for key, shape in shapes.items()}


def write_folder(folder, config, state):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    torch.save({"model": state}, os.path.join(folder, "model.pth"))
    return str(folder)


def small_graph(text_dim=12):
    gen = torch.Generator().manual_seed(1)
    edge_index = torch.randint(0, 20, (2, 50), generator=gen)
    return Data(edge_index=edge_index, edge_type=torch.randint(0, 4, (50,), generator=gen), num_nodes=20,
                num_relations=4, rel_emb=torch.randn(4, text_dim, generator=gen))


def small_batch(text_dim=12):
    gen = torch.Generator().manual_seed(2)
    return {"question_embeddings": torch.randn(2, text_dim, generator=gen),
            "question_entities_masks": (torch.rand(2, 20, generator=gen) < 0.2).float()}


def test_original_layout_loads_strictly_from_a_folder(tmp_path):
    state = original_state_dict()
    folder = write_folder(tmp_path / "ckpt", original_config(), state)
    model, config = load_pretrained(folder)
    assert isinstance(model, GNNRetriever) and isinstance(model.entity_model, QueryNBFNet)
    assert config == original_config()
    assert not model.training
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_missing_or_extra_keys_fail(tmp_path):
    state = original_state_dict()
    del state["entity_model.layers.1.layer_norm.bias"]
    with pytest.raises(RuntimeError, match="layer_norm.bias"):
        load_pretrained(write_folder(tmp_path / "missing", original_config(), state))
    state = original_state_dict()
    state["entity_model.layers.0.relation.weight"] = torch.zeros(4, 8)
    with pytest.raises(RuntimeError, match="relation.weight"):
        load_pretrained(write_folder(tmp_path / "extra", original_config(), state))


def test_save_pretrained_round_trip_uses_original_targets(tmp_path):
    torch.manual_seed(0)
    model = GNNRetriever(QueryNBFNet(8, [8, 8], aggregate_func="max", short_cut=True, layer_norm=True), 12)
    folder = tmp_path / "saved"
    save_pretrained(model, TEXT_EMB_CONFIG, str(folder))
    assert sorted(os.listdir(folder)) == ["config.json", "model.pth"]  # no temporary file left
    config = json.loads((folder / "config.json").read_text())
    assert config["text_emb_model_config"] == TEXT_EMB_CONFIG
    assert config["model_config"]["_target_"] == "gfmrag.models.GNNRetriever"
    entity = config["model_config"]["entity_model"]
    assert entity["_target_"] == "gfmrag.ultra.models.QueryNBFNet"
    assert entity["aggregate_func"] == "max" and entity["hidden_dims"] == [8, 8]
    assert config["model_config"]["rel_emb_dim"] == 12
    assert set(torch.load(folder / "model.pth", weights_only=True)) == {"model"}

    loaded, _ = load_pretrained(str(folder))
    graph, batch = small_graph(), small_batch()
    assert torch.equal(loaded(graph, batch), model.eval()(graph, batch))

    save_pretrained(loaded, TEXT_EMB_CONFIG, str(folder))  # overwriting in place works too
    assert sorted(os.listdir(folder)) == ["config.json", "model.pth"]


def test_query_gnn_round_trip(tmp_path):
    model = QueryGNN(EntityNBFNet(8, [8, 8], message_func="transe", short_cut=True), 12)
    save_pretrained(model, {}, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())["model_config"]
    assert config["_target_"] == "gfmrag.models.QueryGNN"
    assert config["entity_model"]["_target_"] == "gfmrag.ultra.models.EntityNBFNet"
    loaded, _ = load_pretrained(str(tmp_path))
    assert isinstance(loaded.entity_model, EntityNBFNet) and loaded.entity_model.layers[0].message_func == "transe"


def _write_hub_cache(cache, repo_id, config, state, revision="0123456789abcdef0123456789abcdef01234567"):
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    write_folder(repo_dir / "snapshots" / revision, config, state)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)


def test_load_through_hub_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub  # noqa: F401  (imported before the env vars change: they must be read at call time)

    state = original_state_dict(seed=4)
    _write_hub_cache(tmp_path / "hub", "someone/gfm-rag-tiny", original_config(), state)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # "someone/gfm-rag-tiny" is not a local folder here
    model, config = load_pretrained("someone/gfm-rag-tiny")
    assert config["model_config"]["rel_emb_dim"] == 12
    assert torch.equal(model.state_dict()["rel_mlp.weight"], state["rel_mlp.weight"])

    # offline and not cached: fails at once, no network, saying where it looked
    with pytest.raises(FileNotFoundError, match=r"'someone/not-cached': no such local folder, and not fetched from "
                                                r"the local Hugging Face cache \(HF_HUB_OFFLINE is set\)"):
        load_pretrained("someone/not-cached")


@pytest.mark.parametrize("target", ["gfmrag.models.GNNRetriever", "gfmrag.models.gfm_rag_v1.GNNRetriever",
                                    "gfmrag_fast.models.GNNRetriever"])
def test_target_names_resolve(target):
    assert resolve_target(target) is GNNRetriever


@pytest.mark.parametrize("target", ["gfmrag.models.GraphRetriever", "other.models.GNNRetriever"])
def test_unknown_target_is_a_clear_error(tmp_path, target):
    config = original_config()
    config["model_config"]["_target_"] = target
    folder = write_folder(tmp_path, config, original_state_dict())
    with pytest.raises(ValueError, match="unknown model _target_") as info:
        load_pretrained(folder)
    assert target in str(info.value) and "gfmrag.ultra.models.QueryNBFNet" in str(info.value)


def test_package_exports_load_pretrained_lazily():
    code = ("import sys, gfmrag_fast; assert 'gfmrag_fast.models' not in sys.modules; "
            "from gfmrag_fast import load_pretrained; from gfmrag_fast.checkpoints import load_pretrained as direct; "
            "assert load_pretrained is direct")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
