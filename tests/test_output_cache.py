"""The CPU output buffer cache's switch: gfmrag_fast.ops.set_output_cache / output_cache_info and
the GFMRAG_FAST_OUTPUT_CACHE_MB environment variable."""

import os
import subprocess
import sys

import pytest
import torch

from gfmrag_fast.ops import RelGraph, output_cache_info, rel_aggregate, rel_aggregate_reference, set_output_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def default_cache():
    yield
    set_output_cache(256)


def _big_case():
    gen = torch.Generator().manual_seed(0)
    num_nodes = 5003  # [1, 5003, 256] float32 = 4.9 MiB: above the 4 MiB the cache starts at
    edge_index = torch.randint(0, num_nodes, (2, 20_000), generator=gen)
    edge_type = torch.randint(0, 7, (20_000,), generator=gen)
    graph = RelGraph(edge_index, edge_type, num_nodes, 7)
    return graph, torch.randn(1, num_nodes, 256, generator=gen), torch.randn(7, 256, generator=gen)


def test_limit_keeps_and_frees_buffers(default_cache):
    graph, x, relation = _big_case()
    expected = rel_aggregate_reference(x, relation, graph)
    set_output_cache(0)
    assert output_cache_info() == {"limit_mb": 0.0, "cached_mb": 0.0, "buffers": 0}
    torch.testing.assert_close(rel_aggregate(x, relation, graph), expected)  # off: plain memory
    assert output_cache_info()["buffers"] == 0

    set_output_cache(64)
    out = rel_aggregate(x, relation, graph)
    torch.testing.assert_close(out, expected)
    del out  # its buffer is kept for the next output of that size
    info = output_cache_info()
    assert info["limit_mb"] == 64.0 and info["buffers"] == 1
    assert info["cached_mb"] == pytest.approx(x.nbytes / 2**20)
    again = rel_aggregate(x, relation, graph)
    torch.testing.assert_close(again, expected)
    assert output_cache_info()["buffers"] == 0  # taken from the cache
    del again

    set_output_cache(4)  # below the kept buffer's 4.9 MiB: it is freed at once
    assert output_cache_info() == {"limit_mb": 4.0, "cached_mb": 0.0, "buffers": 0}
    del_me = rel_aggregate(x, relation, graph)
    del del_me
    assert output_cache_info()["buffers"] == 0  # does not fit under the limit: not kept


@pytest.mark.parametrize("bad", [-1, 2.5, "64", True, None])
def test_set_output_cache_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="set_output_cache: megabytes must be an int >= 0"):
        set_output_cache(bad)


def _import_with_env(value):
    code = "import gfmrag_fast.ops as ops; print(ops.output_cache_info()['limit_mb'])"
    env = dict(os.environ, GFMRAG_FAST_OUTPUT_CACHE_MB=value, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_environment_variable_sets_the_limit():
    result = _import_with_env("0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0.0"
    result = _import_with_env("lots")
    assert result.returncode != 0
    assert "GFMRAG_FAST_OUTPUT_CACHE_MB must be a whole number of MiB >= 0" in result.stderr
    assert "'lots'" in result.stderr
