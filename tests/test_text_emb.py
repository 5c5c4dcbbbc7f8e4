"""TextEmbModel: GFM-RAG's text_emb_model config, lazy shared loading, instructions, shapes."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from gfmrag_fast import text_emb
from gfmrag_fast.text_emb import DEFAULT_MODEL_NAME, TextEmbModel

ORIGINAL_CONFIG = {  # as in a released GFM-RAG checkpoint's config.json
    "_target_": "gfmrag.text_emb_models.BaseTextEmbModel",
    "text_emb_model_name": "sentence-transformers/all-mpnet-base-v2",
    "normalize": True,
    "batch_size": 32,
    "query_instruct": None,
    "passage_instruct": None,
    "model_kwargs": None,
}


@pytest.fixture(scope="module")
def model():
    return TextEmbModel(device="cpu")


def test_construction_is_lazy_and_config_is_portable():
    before = dict(text_emb._LOADED)
    m = TextEmbModel("no-such-org/no-such-model", query_instruct=None)
    cfg = m.config_dict()
    assert text_emb._LOADED == before  # nothing loaded, no network needed
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg == {
        "text_emb_model_name": "no-such-org/no-such-model", "normalize": True, "batch_size": 32,
        "query_instruct": "", "passage_instruct": "", "model_kwargs": None,
    }
    # the default records the Hugging Face name, not this machine's path to the bundled copy
    assert TextEmbModel().config_dict()["text_emb_model_name"] == DEFAULT_MODEL_NAME


def test_from_config_dict_and_omegaconf():
    m = TextEmbModel.from_config(ORIGINAL_CONFIG)
    expected = {k: v for k, v in ORIGINAL_CONFIG.items() if k != "_target_"}
    expected.update(query_instruct="", passage_instruct="")
    assert m.config_dict() == expected
    omegaconf = pytest.importorskip("omegaconf")
    node = omegaconf.OmegaConf.create({"text_emb_model_name": "x", "query_instruct": "${prefix}", "prefix": "q: "})
    with pytest.raises(ValueError, match="unknown keys"):
        TextEmbModel.from_config(node)
    node = omegaconf.OmegaConf.create({"text_emb_model_name": "x", "query_instruct": "q: ", "batch_size": 4})
    assert TextEmbModel.from_config(node).config_dict()["batch_size"] == 4
    roundtrip = TextEmbModel.from_config(TextEmbModel(query_instruct="q: ").config_dict())
    assert roundtrip.config_dict() == TextEmbModel(query_instruct="q: ").config_dict()


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        TextEmbModel(batch_size=0)
    with pytest.raises(ValueError, match="JSON"):
        TextEmbModel(model_kwargs={"dtype": torch.float16})


def test_encode_shapes_and_normalisation(model):
    emb = model.encode(["capital of", "inverse_capital of", "member of"])
    assert emb.shape == (3, 384) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert model.dim == 384
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    assert model.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="sequence"):
        model.encode("one string")


def test_instructions_are_prefixed(model):
    inst = TextEmbModel(device="cpu", query_instruct="query: ", passage_instruct="passage: ")
    assert inst.model is model.model  # one loaded copy per (name, device)
    text = ["Who founded Acme?"]
    torch.testing.assert_close(inst.encode(text, is_query=True), model.encode(["query: " + text[0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(inst.encode(text), model.encode(["passage: " + text[0]]), atol=1e-5, rtol=0)
    assert not torch.allclose(inst.encode(text, is_query=True), model.encode(text), atol=1e-3)


def test_similar_texts_are_closer(model):
    a, b, c = model.encode(["capital city of", "is the capital of", "won an award for"])
    assert a @ b > a @ c


# --------------------------------------------------------------------------- remote code
def write_model_with_code(folder):
    """A model folder whose config points at Python files that leave a mark when imported."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "gfmrag_untrusted",
        "auto_map": {"AutoConfig": "configuration_untrusted.Config", "AutoModel": "modeling_untrusted.Model"},
    }))
    marker = folder.parent / "CODE_RAN"  # an absolute path: transformers runs a copy of the files
    for name in ("configuration_untrusted.py", "modeling_untrusted.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('yes')\n")
    return marker


def test_model_code_is_not_run_by_default(tmp_path):
    marker = write_model_with_code(tmp_path / "model")
    for m in (TextEmbModel(str(tmp_path / "model"), device="cpu"),
              TextEmbModel.from_config({"text_emb_model_name": str(tmp_path / "model")}, device="cpu"),
              TextEmbModel.from_config({"text_emb_model_name": str(tmp_path / "model"), "trust_remote_code": None})):
        with pytest.raises(ValueError, match=r"ships its own Python code.*trust_remote_code=true"):
            m.encode(["x"])
    assert not marker.exists()


class RecordingSentenceTransformer:
    calls = []

    def __init__(self, path, **kwargs):
        self.calls.append((path, kwargs))


def test_trust_remote_code_only_when_the_config_asks(monkeypatch):
    import sentence_transformers

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", RecordingSentenceTransformer)
    monkeypatch.setattr(text_emb, "_LOADED", {})
    RecordingSentenceTransformer.calls.clear()
    TextEmbModel.from_config(dict(ORIGINAL_CONFIG, text_emb_model_name="org/a")).model
    TextEmbModel.from_config(dict(ORIGINAL_CONFIG, text_emb_model_name="org/b", trust_remote_code=True)).model
    assert [(path, kw["trust_remote_code"]) for path, kw in RecordingSentenceTransformer.calls] == [
        ("org/a", False), ("org/b", True)]
    # a permission, not a setting of the vectors: not in fingerprints or saved configs
    assert "trust_remote_code" not in TextEmbModel(trust_remote_code=True).config_dict()
    with pytest.raises(ValueError, match="trust_remote_code must be true or false"):
        TextEmbModel(trust_remote_code="yes")
    with pytest.raises(ValueError, match="not inside model_kwargs"):
        TextEmbModel(model_kwargs={"trust_remote_code": True})
