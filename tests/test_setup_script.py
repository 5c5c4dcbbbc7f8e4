"""scripts/setup.sh: compiles only when a source or a build switch changed, and shows progress.

The script runs in a copy of the repository's layout whose ``setup.py`` is a stand-in (it prints
ninja-style progress lines, writes ``gfmrag_fast/_C.so`` and counts its runs) and whose venv is a
wrapper around this interpreter that refuses ``pip``: the dependency stamp is written beforehand, so
no real package is installed or compiled. A stand-in ``torch`` module answers the script's questions
about the installed torch.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH_SPEC = "torch==2.14.1"

FAKE_SETUP = """\
import os, sys
with open("runs.txt", "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_BUILD_FAILS"):
    print("csrc/a.cpp:1:1: error: boom", flush=True)
    sys.exit(1)
print("  noise the user does not need", flush=True)
print("[1/2] c++ -MMD -c " + os.path.abspath("csrc/a.cpp") + " -o build/a.o", flush=True)
if os.environ.get("FAKE_WAIT_FOR"):  # go on only once the test has seen the first progress line
    import time
    for _ in range(600):
        if os.path.exists(os.environ["FAKE_WAIT_FOR"]):
            break
        time.sleep(0.1)
    else:
        sys.exit("the first progress line was not shown while the build ran")
print("[2/2] c++ -MMD -c " + os.path.abspath("csrc/cpu/b.cpp") + " -o build/b.o", flush=True)
print("g++ -shared build/a.o build/b.o -o " + os.path.abspath("gfmrag_fast/_C.so"), flush=True)
open("gfmrag_fast/_C.so", "w").close()
"""

FAKE_LIBRARY = """\
def has_kernels_for(device):
    return device.type == "cpu"
"""

# Importing the real torch takes seconds on a loaded machine, and the script asks it twice a run.
FAKE_TORCH = """\
import types
__version__ = "0.0-stand-in"
version = types.SimpleNamespace(cuda=None)
def device(kind):
    return types.SimpleNamespace(type=kind)
"""


def _digest(*items: str) -> str:
    """The key scripts/setup.sh computes: each item, and a file's bytes when the item is a file."""
    h = hashlib.sha256()
    for item in items:
        h.update(item.encode() + b"\0")
        if os.path.isfile(item):
            h.update(Path(item).read_bytes())
    return h.hexdigest()


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", root / "scripts" / "setup.sh")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    (root / "CMakeLists.txt").write_text("project(x)\n")
    (root / "setup.py").write_text(FAKE_SETUP)
    (root / "csrc" / "cpu").mkdir(parents=True)
    (root / "csrc" / "a.cpp").write_text("int a;\n")
    (root / "csrc" / "cpu" / "b.cpp").write_text("int b;\n")
    (root / "gfmrag_fast" / "ops").mkdir(parents=True)
    (root / "gfmrag_fast" / "__init__.py").write_text("")
    (root / "gfmrag_fast" / "ops" / "__init__.py").write_text("")
    (root / "gfmrag_fast" / "ops" / "_library.py").write_text(FAKE_LIBRARY)
    (root / "torch").mkdir()
    (root / "torch" / "__init__.py").write_text(FAKE_TORCH)
    venv = root / ".venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$1" == "-m" && "$2" == "pip" ]]; then echo "test: pip must not run" >&2; exit 97; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    python_version = subprocess.run([str(python), "-VV"], capture_output=True, text=True, check=True).stdout.strip()
    old = os.getcwd()
    os.chdir(root)
    try:
        deps_key = _digest("pyproject.toml", f"torch={TORCH_SPEC}", python_version)
    finally:
        os.chdir(old)
    (venv / ".gfmrag_fast-deps").write_text(deps_key + "\n")
    return root


def run_setup(root, **env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("FORCE_CUDA", "FORCE_ONLY_CPU", "DEBUG", "CUDA_HOME", "CXX", "REBUILD", "VENV")}
    base.update(TORCH_SPEC=TORCH_SPEC, TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS="1", PYTHONPATH=str(root))
    base.update(env)
    return subprocess.run(["bash", "scripts/setup.sh"], cwd=root, env=base, capture_output=True, text=True,
                          timeout=300)


def test_progress_is_shown_while_the_build_runs(project, tmp_path):
    go = tmp_path / "go"
    env = {**os.environ, "TORCH_SPEC": TORCH_SPEC, "TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "1",
           "PYTHONPATH": str(project), "FAKE_WAIT_FOR": str(go)}
    proc = subprocess.Popen(["bash", "scripts/setup.sh"], cwd=project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "[1/2] compiling csrc/a.cpp" in line:
            go.touch()
    assert proc.wait(timeout=120) == 0, "".join(seen)
    assert go.exists(), "".join(seen)


def builds(root):
    runs = root / "runs.txt"
    return runs.read_text().splitlines() if runs.exists() else []


def test_builds_once_then_only_when_inputs_change(project):
    first = run_setup(project)
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    assert "dependencies up to date" in out
    assert "setup:   [1/2] compiling csrc/a.cpp" in out and "setup:   [2/2] compiling csrc/cpu/b.cpp" in out
    assert "setup:   linking gfmrag_fast/_C.so" in out
    assert "noise the user does not need" not in out
    assert "noise the user does not need" in (project / "build" / "setup-build.log").read_text()
    assert "setup: gfmrag_fast ready" in out and "source .venv/bin/activate" in out
    assert builds(project) == ["build_ext --inplace"]

    again = run_setup(project)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "extension up to date" in again.stdout and "compiling" not in again.stdout
    assert len(builds(project)) == 1

    (project / "csrc" / "cpu" / "b.cpp").write_text("int b = 1;\n")
    assert run_setup(project).returncode == 0
    assert len(builds(project)) == 2

    assert run_setup(project, FORCE_ONLY_CPU="1").returncode == 0  # a build switch changed
    assert len(builds(project)) == 3
    assert run_setup(project, FORCE_ONLY_CPU="1").returncode == 0
    assert len(builds(project)) == 3

    (project / "gfmrag_fast" / "_C.so").unlink()  # the library went missing
    assert run_setup(project, FORCE_ONLY_CPU="1").returncode == 0
    assert len(builds(project)) == 4

    rebuild = run_setup(project, FORCE_ONLY_CPU="1", REBUILD="1")  # REBUILD=1 reinstalls too
    assert rebuild.returncode == 1 and "test: pip must not run" in rebuild.stdout


def test_failed_build_shows_the_error_and_records_nothing(project):
    failed = run_setup(project, FAKE_BUILD_FAILS="1")
    assert failed.returncode == 1
    assert "setup:   csrc/a.cpp:1:1: error: boom" in failed.stdout
    assert "FAILED" in failed.stdout and "last lines of build/setup-build.log" in failed.stdout
    assert not (project / ".venv" / ".gfmrag_fast-build").exists()
    ok = run_setup(project)  # the next run builds again
    assert ok.returncode == 0 and len(builds(project)) == 2


def test_changed_dependencies_reinstall(project):
    with open(project / "pyproject.toml", "a") as f:
        f.write("# edited\n")
    result = run_setup(project)
    # It went on to pip, which the stand-in refuses: the script stops, showing pip's output.
    assert result.returncode == 1, result.stdout + result.stderr
    assert "installing pip, setuptools" in result.stdout and "test: pip must not run" in result.stdout


def test_real_build_uses_one_fixed_object_folder():
    # The stand-in above cannot check setup.py itself: its build_ext must compile into build/ext,
    # the folder ninja's incremental builds depend on, also under pip's editable builds.
    code = (
        "import sys, setuptools; sys.argv = ['setup.py', '--name'];"
        "captured = {};"
        "setuptools.setup = lambda **kw: captured.update(kw);"
        "import runpy; runpy.run_path('setup.py');"
        "from setuptools import Distribution;"
        "cmd = captured['cmdclass']['build_ext'](Distribution({'ext_modules': captured['ext_modules']}));"
        "cmd.initialize_options(); cmd.build_temp = '/tmp/elsewhere'; cmd.finalize_options();"
        "print(cmd.build_temp)"
    )
    env = {**os.environ, "FORCE_ONLY_CPU": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(REPO / "build" / "ext")
