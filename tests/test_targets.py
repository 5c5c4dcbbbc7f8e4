"""The one ``_target_`` resolver: GFM-RAG's names, ours, and what is refused."""

import functools
import sys

import pytest
import torch

from gfmrag_fast import losses, targets
from gfmrag_fast.models import EntityNBFNet, GNNRetriever, QueryGNN, QueryNBFNet
from gfmrag_fast.doc_rankers import HybridRanker, IDFWeightedRanker, IDFWeightedTopKRanker, SimpleRanker, TopKRanker
from gfmrag_fast.text_emb import TextEmbModel

GFMRAG_NAMES = [
    ("model", "gfmrag.models.GNNRetriever", GNNRetriever),
    ("model", "gfmrag.models.QueryGNN", QueryGNN),
    ("model", "gfmrag.ultra.models.QueryNBFNet", QueryNBFNet),
    ("model", "gfmrag.ultra.models.EntityNBFNet", EntityNBFNet),
    ("loss", "gfmrag.losses.BCELoss", losses.adversarial_bce),
    ("loss", "gfmrag.losses.ListCELoss", losses.list_ce),
    ("doc_ranker", "gfmrag.doc_rankers.SimpleRanker", SimpleRanker),
    ("doc_ranker", "gfmrag.doc_rankers.IDFWeightedRanker", IDFWeightedRanker),
    ("doc_ranker", "gfmrag.doc_rankers.TopKRanker", TopKRanker),
    ("doc_ranker", "gfmrag.doc_rankers.IDFWeightedTopKRanker", IDFWeightedTopKRanker),
    ("text_emb_model", "gfmrag.text_emb_models.BaseTextEmbModel", TextEmbModel),
]


@pytest.mark.parametrize("kind,name,expected", GFMRAG_NAMES)
def test_gfmrag_names_resolve_to_ours_and_back(kind, name, expected):
    assert targets.resolve(name, kind) is expected
    # GFM-RAG moved modules between versions: the class name decides, in its namespaces.
    assert targets.resolve("gfmrag.somewhere.else." + name.rsplit(".", 1)[1], kind) is expected
    assert targets.gfmrag_target(kind, expected) == name


def test_every_table_entry_resolves_by_its_own_path_and_is_listed():
    for kind, table in targets.KINDS.items():
        for name, (path, original) in table.items():
            obj = targets.resolve(path, kind)
            assert obj is targets.resolve(name, kind)
            assert path in targets.known_targets(kind) and (original is None or original in targets.known_targets(kind))
    assert targets.resolve("gfmrag_fast.doc_rankers.HybridRanker", "doc_ranker") is HybridRanker


@pytest.mark.parametrize("kind,target", [
    ("model", "gfmrag.models.GraphRetriever"), ("model", "other.models.GNNRetriever"), ("model", "os.system"),
    ("loss", "torch.nn.MSELoss"), ("doc_ranker", "bm25"), ("text_emb_model", "gfmrag.text_emb_models.NVEmbedV2"),
])
def test_unknown_targets_are_refused_naming_the_known_ones(kind, target):
    with pytest.raises(ValueError, match=f"unknown {kind} _target_ '{target}': known targets are") as info:
        targets.resolve(target, kind)
    assert targets.known_targets(kind)[0] in str(info.value)


def test_a_checkpoint_config_never_imports_a_module():
    """A model target outside the table is refused before anything is imported."""
    name = "gfmrag_fast_test_never_imported"
    with pytest.raises(ValueError, match="unknown model _target_"):
        targets.instantiate({"_target_": f"{name}.GNNRetriever"}, "model")
    assert name not in sys.modules


def test_optimizers_are_imported_by_path_or_torch_optim_name():
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = targets.instantiate({"_target_": "torch.optim.SGD", "lr": 0.5}, "optimizer", params)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["lr"] == 0.5
    assert targets.resolve("AdamW", "optimizer") is torch.optim.AdamW
    with pytest.raises(ValueError, match="optimizer _target_ 'torch.optim.Adamm' cannot be imported"):
        targets.resolve("torch.optim.Adamm", "optimizer")
    with pytest.raises(ValueError, match="unknown target kind 'scheduler'"):
        targets.resolve("x", "scheduler")


def test_instantiate_nested_partial_args_and_hydra_keys():
    entity = {"_target_": "gfmrag.ultra.models.QueryNBFNet", "input_dim": 8, "hidden_dims": [8, 8]}
    model = targets.instantiate({"_target_": "gfmrag.models.GNNRetriever", "entity_model": entity, "rel_emb_dim": 12,
                                 "_recursive_": True, "_convert_": "all"}, "model")
    assert type(model) is GNNRetriever and type(model.entity_model) is QueryNBFNet
    assert model.entity_model.dims == [8, 8, 8]

    bce = targets.instantiate({"_target_": "gfmrag.losses.BCELoss", "adversarial_temperature": 0.2,
                               "_partial_": True}, "loss")
    assert isinstance(bce, functools.partial) and bce.keywords == {"adversarial_temperature": 0.2}
    pred, target = torch.randn(2, 5, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 5)
    target[:, 0] = 1
    torch.testing.assert_close(bce(pred, target), losses.adversarial_bce(pred, target, adversarial_temperature=0.2))

    ent2doc = torch.eye(4)
    ranker = targets.instantiate({"_target_": "gfmrag.doc_rankers.TopKRanker", "top_k": 2}, "doc_ranker", ent2doc,
                                 top_k=3)  # keyword arguments override the config's
    assert type(ranker) is TopKRanker and ranker.top_k == 3
    ranker = targets.instantiate({"_target_": "TopKRanker", "_args_": [ent2doc]}, "doc_ranker")
    assert ranker.top_k == 20

    kept = targets.instantiate({"_target_": "gfmrag_fast.doc_rankers.HybridRanker", "_recursive_": False,
                                "_partial_": True, "gnn_ranker": {"_target_": "TopKRanker"}}, "doc_ranker")
    assert kept.keywords["gnn_ranker"] == {"_target_": "TopKRanker"}  # not built: _recursive_ is false
    with pytest.raises(ValueError, match="loss config has no _target_"):
        targets.instantiate({"adversarial_temperature": 0.2}, "loss")


def test_loss_specs_of_the_fine_tune_config():
    from gfmrag_fast.training.tasks_common import resolve_loss

    pred, target = torch.randn(3, 6, generator=torch.Generator().manual_seed(1)), torch.zeros(3, 6)
    target[:, 1] = 1
    fn = resolve_loss({"_target_": "gfmrag.losses.ListCELoss"})
    torch.testing.assert_close(fn(pred, target), losses.list_ce(pred, target))
    with pytest.raises(ValueError, match="unknown loss _target_ 'gfmrag.losses.MSELoss'"):
        resolve_loss({"_target_": "gfmrag.losses.MSELoss"})


def test_text_model_targets(caplog):
    conf = {"text_emb_model_name": "some/model"}
    TextEmbModel.from_config({"_target_": "gfmrag.text_emb_models.BaseTextEmbModel", **conf})
    TextEmbModel.from_config({"_target_": "gfmrag_fast.text_emb.TextEmbModel", **conf})
    assert "_target_" not in caplog.text
    TextEmbModel.from_config({"_target_": "gfmrag.text_emb_models.NVEmbedV2", **conf})
    assert "text_emb_model _target_ gfmrag.text_emb_models.NVEmbedV2: encoding as sentence-transformers" in caplog.text
