"""Fixtures and hooks only; shared functions live in helpers.py."""

import os

import pytest
import torch

from helpers import HashEmb, write_kg_dataset, write_qa_dataset

_OFFLINE = "HF_HUB_OFFLINE"


def pytest_configure(config):
    # Tests never reach the network: the text model is the bundled offline copy. huggingface_hub
    # reads HF_HUB_OFFLINE once, when first imported, so it is set before any test module is
    # collected (and restored when the session ends).
    config._hf_offline_before = os.environ.get(_OFFLINE)
    os.environ.setdefault(_OFFLINE, "1")


def pytest_unconfigure(config):
    before = getattr(config, "_hf_offline_before", None)
    if before is None:
        os.environ.pop(_OFFLINE, None)
    else:
        os.environ[_OFFLINE] = before


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


@pytest.fixture
def one_thread():
    """Tiny graphs: one thread is fastest, and OpenMP threads spinning on a shared CPU are slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
