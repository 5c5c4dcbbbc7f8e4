"""train.checkpoint handling: a KG-pre-trained model as the start of fine-tuning."""

from types import SimpleNamespace

import pytest
import torch

from gfmrag_fast.models import EntityNBFNet, GNNRetriever, QueryGNN, QueryNBFNet
from gfmrag_fast.models.checkpoint import save_pretrained
from gfmrag_fast.training import DistEnv
from gfmrag_fast.workflow.common import apply_checkpoint

ENTITY = dict(input_dim=8, hidden_dims=[8, 8], message_func="distmult", aggregate_func="sum", short_cut=True,
              layer_norm=True)


def test_retriever_starts_from_a_kg_pretrained_model(tmp_path):
    torch.manual_seed(0)
    pretrained = QueryGNN(EntityNBFNet(**ENTITY), 12)
    save_pretrained(pretrained, {"text_emb_model_name": "x"}, str(tmp_path / "pt"))
    retriever = GNNRetriever(QueryNBFNet(**ENTITY), 12)
    fresh_question_mlp = retriever.question_mlp.weight.detach().clone()
    apply_checkpoint(SimpleNamespace(raw_model=retriever), str(tmp_path / "pt"), DistEnv())
    for key, value in pretrained.state_dict().items():
        assert torch.equal(retriever.state_dict()[key], value), key
    assert torch.equal(retriever.question_mlp.weight, fresh_question_mlp)


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    save_pretrained(QueryGNN(EntityNBFNet(**{**ENTITY, "hidden_dims": [8, 8, 8]}), 12), {}, str(tmp_path / "pt"))
    with pytest.raises(ValueError, match="does not fit the configured model"):
        apply_checkpoint(SimpleNamespace(raw_model=GNNRetriever(QueryNBFNet(**ENTITY), 12)), str(tmp_path / "pt"),
                         DistEnv())
