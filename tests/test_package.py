"""Packaging behaviour: the error without a built library, the demo, the synthetic KG, the sdist."""

import os
import subprocess
import sys

import pytest
import torch

from gfmrag_fast import demo
from gfmrag_fast.synthetic import synthetic_kg


def test_import_without_built_library_says_how_to_build():
    # sys.modules[name] = None makes that import fail, as it does when the library was never built.
    code = "import sys; sys.modules['gfmrag_fast._C'] = None; import gfmrag_fast.ops"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "gfmrag_fast._C is not built" in result.stderr
    assert "pip install --no-build-isolation" in result.stderr


def test_synthetic_kg_has_inverse_edges():
    graph = synthetic_kg(50, 200, 10, seed=3)
    assert graph.num_edges == 400 and graph.num_relations == 10
    direct, inverse = graph.edge_index[:, :200], graph.edge_index[:, 200:]
    assert torch.equal(direct.flip(0), inverse)
    assert torch.equal(graph.edge_type[200:], graph.edge_type[:200] + 5)
    with pytest.raises(ValueError, match="num_relations counts direct and inverse types"):
        synthetic_kg(50, 200, 7)


def test_demo_runs(capsys):
    demo.main(["--nodes", "300", "--triples", "2000", "--relations", "20", "--batch", "2", "--dim", "8",
               "--repeat", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "fused kernel" in out and "speed-up" in out
    diff = float(out.split("(output and gradients): ")[1].split()[0])
    assert diff < 1e-5


def test_source_distribution_holds_every_kernel_file(tmp_path):
    # pip builds the kernels from an sdist on machines without a wheel: every source, header and
    # the build configuration must be in it (the headers once were not: MANIFEST.in).
    import tarfile

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # A fresh egg-info (setuptools would otherwise also pack what an earlier one listed).
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "-d",
                    str(tmp_path)], cwd=repo, check=True, env={**os.environ, "FORCE_ONLY_CPU": "1"},
                   capture_output=True)
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {"CMakeLists.txt", "setup.py", "pyproject.toml"}
    for folder, _, files in os.walk(os.path.join(repo, "csrc")):
        wanted |= {os.path.relpath(os.path.join(folder, f), repo) for f in files
                   if f.endswith((".h", ".cpp", ".cu", ".py"))}
    assert not wanted - names, sorted(wanted - names)
