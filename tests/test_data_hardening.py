"""Hostile and broken inputs for gfmrag_fast.data (issue 10): the stage-2 cache under concurrent
builders, killed builders and damaged files; relation names that collide with inverse names;
and input files that must give errors naming the file and the record or line.

The concurrency tests use real processes (fork) and a hash-based stub text model, and run for
about two seconds each.
"""

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from gfmrag_fast.data import KGDataset, QADataset, load_datasets, read_json, read_triples
from gfmrag_fast.data.cache import META_FILE, CacheError, CacheReader

FIXTURES = Path(__file__).parent / "data"
DIM = 8
FORK = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
needs_fork = pytest.mark.skipif(FORK is None, reason="needs the fork start method")


class StubEmb:
    """Deterministic text → [DIM] vectors from a hash; counts its calls."""

    def __init__(self, name="stub"):
        self.name = name
        self.calls = 0

    def config_dict(self):
        return {"text_emb_model_name": self.name}

    def encode(self, texts, is_query=False, show_progress_bar=False):
        self.calls += 1
        rows = [list(hashlib.sha256(t.encode()).digest()[:DIM]) for t in texts]
        return torch.tensor(rows, dtype=torch.float32).view(len(texts), DIM) / 255


class BlockingEmb(StubEmb):
    """Announces that a build has started (``started``), then waits for ``release`` (or forever)."""

    def __init__(self, started, release=None):
        super().__init__()
        self.started, self.release = started, release

    def encode(self, texts, is_query=False, show_progress_bar=False):
        self.started.set()
        while self.release is None or not self.release.is_set():
            time.sleep(0.01)
        return super().encode(texts, is_query, show_progress_bar)


class RaisingEmb(StubEmb):
    def encode(self, texts, is_query=False, show_progress_bar=False):
        raise AssertionError("the text model must not be called: a complete cache exists")


@pytest.fixture
def root(tmp_path):
    for name in ("tiny_kg", "tiny_qa"):
        shutil.copytree(FIXTURES / name, tmp_path / name)
    return tmp_path


def stage1(root, name):
    return Path(root) / name / "processed" / "stage1"


def stage2(root, name):
    return Path(root) / name / "processed" / "stage2"


def write_kg(root, name, text, mode="w"):
    folder = stage1(root, name)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "kg.txt", mode + "b") as fout:
        fout.write(text.encode("utf-8") if isinstance(text, str) else text)


def leftovers(root, name):
    """Entries of stage2/ other than published caches and their lock files."""
    return sorted(e for e in os.listdir(stage2(root, name)) if e.startswith(".") and not e.startswith(".lock-"))


def signature(ds):
    g = ds.graph
    return (g.edge_index.tolist(), g.edge_type.tolist(), g.rel_emb.tolist(), ds.rel2id, ds.ent2id, ds.stats)


# --------------------------------------------------------------------------- concurrent builders
def _hammer(root, name, kind, seconds, force_every, start, results, min_loads=4):
    # At least min_loads loads whatever the machine's load (no timing condition), more while time is left.
    torch.set_num_threads(1)
    cls = QADataset if kind == "qa" else KGDataset
    emb = StubEmb()
    loads, errors, sigs = 0, [], set()
    start.wait()
    deadline = time.monotonic() + seconds
    while loads < min_loads or time.monotonic() < deadline:
        loads += 1
        try:
            ds = cls(root, name, text_emb_model=emb, force_rebuild=bool(force_every) and loads % force_every == 0)
            sigs.add(json.dumps(signature(ds)[:5]))
        except Exception as err:  # any failed load is what the test is about
            errors.append(f"{type(err).__name__}: {err}")
    results.put((loads, len(errors), errors[:3], sorted(sigs)))


@needs_fork
@pytest.mark.parametrize("kind,name,locks", [("kg", "tiny_kg", True), ("qa", "tiny_qa", True),
                                             ("kg", "tiny_kg", False)])
def test_concurrent_builds_and_force_rebuilds_never_fail_a_load(root, monkeypatch, kind, name, locks):
    # 2 processes force-rebuild every other load, 4 only load: every load must succeed and see
    # the same data, and nothing may be left behind; also where the file system has no locks.
    if not locks:
        from gfmrag_fast.data import cache

        monkeypatch.setattr(cache._BuildLock, "acquire", lambda self: None)
    start, results = FORK.Event(), FORK.Queue()
    force = [2, 2, 0, 0, 0, 0]
    procs = [FORK.Process(target=_hammer, args=(root, name, kind, 1.5, f, start, results)) for f in force]
    for p in procs:
        p.start()
    start.set()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    total = sum(o[0] for o in outcomes)
    failures = sum(o[1] for o in outcomes)
    assert failures == 0, f"{failures} of {total} loads failed, e.g. {[e for o in outcomes for e in o[2]][:3]}"
    assert len({s for o in outcomes for s in o[3]}) == 1  # one and the same dataset everywhere
    assert leftovers(root, name) == []
    cls = QADataset if kind == "qa" else KGDataset
    published = [e for e in os.listdir(stage2(root, name)) if not e.startswith(".")]
    assert published == [cls(root, name, text_emb_model=RaisingEmb()).fingerprint]


class BarrierEmb(StubEmb):
    """Waits until every process of the test is inside its build, so that all of them build."""

    def __init__(self, barrier):
        super().__init__()
        self.barrier = barrier

    def encode(self, texts, is_query=False, show_progress_bar=False):
        self.barrier.wait(30)
        return super().encode(texts, is_query, show_progress_bar)


def _load_once(root, emb, start, results):
    torch.set_num_threads(1)
    start.wait()
    try:
        ds = KGDataset(root, "tiny_kg", text_emb_model=emb)
        results.put((emb.calls, os.stat(ds.processed_dir).st_ino, json.dumps(signature(ds)[:5]), None))
    except Exception as err:
        results.put((emb.calls, None, None, f"{type(err).__name__}: {err}"))


def _race(root, embs):
    start, results = FORK.Event(), FORK.Queue()
    procs = [FORK.Process(target=_load_once, args=(root, emb, start, results)) for emb in embs]
    for p in procs:
        p.start()
    start.set()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(30)
    assert [o[3] for o in outcomes] == [None] * len(procs)
    return outcomes


@needs_fork
def test_simultaneous_builders_build_once(root):
    outcomes = _race(root, [StubEmb() for _ in range(6)])
    assert sum(o[0] for o in outcomes) == 1  # one process built, five waited and loaded its folder
    assert len({o[1] for o in outcomes}) == 1 and len({o[2] for o in outcomes}) == 1


@needs_fork
def test_without_locks_the_first_published_folder_is_never_replaced(root, monkeypatch):
    # As on a file system without flock: all six build at once, and publication alone decides.
    from gfmrag_fast.data import cache

    monkeypatch.setattr(cache._BuildLock, "acquire", lambda self: None)
    barrier = FORK.Barrier(6)
    outcomes = _race(root, [BarrierEmb(barrier) for _ in range(6)])
    assert [o[0] for o in outcomes] == [1] * 6  # every process built ...
    assert len({o[1] for o in outcomes}) == 1  # ... and all loaded the one folder published first
    assert len({o[2] for o in outcomes}) == 1
    assert leftovers(root, "tiny_kg") == []


def _build_slowly(root, started, release, on_error="raise"):
    KGDataset(root, "tiny_kg", text_emb_model=BlockingEmb(started, release), on_error=on_error)


@needs_fork
def test_second_builder_waits_and_reads_the_first_ones_cache(root):
    started, release = FORK.Event(), FORK.Event()
    first = FORK.Process(target=_build_slowly, args=(root, started, release))
    first.start()
    try:
        assert started.wait(30)
        assert [e for e in leftovers(root, "tiny_kg") if e.startswith(".tmp-")]  # the first is building
        FORK.Process(target=lambda: (time.sleep(0.3), release.set())).start()
        # Blocks until the first build is published, then reads it: the text model is never called.
        ds = KGDataset(root, "tiny_kg", text_emb_model=RaisingEmb())
    finally:
        release.set()
        first.join(30)
    assert first.exitcode == 0
    assert ds.num_nodes == 10 and leftovers(root, "tiny_kg") == []


@needs_fork
def test_killed_builder_leftovers_are_cleaned_but_live_ones_kept(root, caplog):
    # A live builder of another fingerprint (on_error="skip") in the same stage2 folder.
    started, release = FORK.Event(), FORK.Event()
    live = FORK.Process(target=_build_slowly, args=(root, started, release, "skip"))
    live.start()
    try:
        assert started.wait(30)
        live_staging = leftovers(root, "tiny_kg")
        assert len(live_staging) == 1 and live_staging[0].startswith(".tmp-")

        started = FORK.Event()
        killed = FORK.Process(target=_build_slowly, args=(root, started, None))
        killed.start()
        assert started.wait(30)
        os.kill(killed.pid, signal.SIGKILL)
        killed.join(30)
        dead_staging = [e for e in leftovers(root, "tiny_kg") if e not in live_staging]
        assert len(dead_staging) == 1 and dead_staging[0].startswith(".tmp-")

        with caplog.at_level(logging.INFO, logger="gfmrag_fast.data.cache"):
            ds = KGDataset(root, "tiny_kg", text_emb_model=StubEmb())
        assert leftovers(root, "tiny_kg") == live_staging  # the dead one went, the live one stayed
        assert f"removed {dead_staging[0]}, left by an interrupted build" in caplog.text
    finally:
        release.set()
        live.join(30)
    assert live.exitcode == 0 and leftovers(root, "tiny_kg") == []
    assert ds.num_nodes == KGDataset(root, "tiny_kg", text_emb_model=RaisingEmb(), on_error="skip").num_nodes


def test_stale_aside_folder_of_a_dead_process_is_cleaned(root):
    ds = KGDataset(root, "tiny_kg", text_emb_model=StubEmb())
    # As left by a force rebuild killed between its two renames, on this host, by a dead pid.
    dead = FORK.Process(target=lambda: None) if FORK else None
    pid = 2 ** 22 + 12345
    if dead is not None:
        dead.start()
        dead.join()
        pid = dead.pid
    from gfmrag_fast.data import cache

    aside = stage2(root, "tiny_kg") / f".old-0123456789abcdef-{cache._HOST}-{pid}-deadbeef"
    shutil.copytree(ds.processed_dir, aside)
    KGDataset(root, "tiny_kg", text_emb_model=StubEmb(), force_rebuild=True)
    assert not aside.exists() and leftovers(root, "tiny_kg") == []


# --------------------------------------------------------------------------- damaged caches
def test_truncated_graph_is_detected_and_rebuilt(root, caplog):
    emb = StubEmb()
    first = KGDataset(root, "tiny_kg", text_emb_model=emb)
    graph = Path(first.processed_dir) / "graph.pt"
    data = graph.read_bytes()
    graph.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        again = KGDataset(root, "tiny_kg", text_emb_model=emb)
    assert emb.calls == 2  # rebuilt
    assert f"{graph}: size {len(data) // 2} bytes, expected {len(data)}" in caplog.text and "rebuilding" in caplog.text
    assert signature(again) == signature(first) and graph.read_bytes() == data
    assert leftovers(root, "tiny_kg") == []


@pytest.mark.parametrize("damage", ["flip_byte", "delete_meta", "delete_file", "edit_meta_json"])
def test_damaged_cache_files_are_detected(root, caplog, damage):
    emb = StubEmb()
    first = QADataset(root, "tiny_qa", text_emb_model=emb)
    folder = Path(first.processed_dir)
    if damage == "flip_byte":
        path = folder / "train.pt"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        expected = f"{path}: sha256 mismatch"
    elif damage == "delete_meta":
        (folder / META_FILE).unlink()
        expected = f"{folder}: no {META_FILE}"
    elif damage == "delete_file":
        (folder / "ent2doc.pt").unlink()
        expected = f"{folder / 'ent2doc.pt'}: missing"
    else:
        (folder / META_FILE).write_text('{"fingerprint": ')
        expected = f"{folder / META_FILE}: unreadable"
    with caplog.at_level(logging.WARNING):
        again = QADataset(root, "tiny_qa", text_emb_model=emb)
    assert expected in caplog.text
    assert emb.calls == 6  # 3 encode calls per build (relations, train, test): rebuilt once
    assert signature(again) == signature(first)


def test_cache_reader_reports_the_damaged_path(root):
    ds = KGDataset(root, "tiny_kg", text_emb_model=StubEmb())
    path = Path(ds.processed_dir) / "rel2id.json"
    path.write_text(path.read_text()[:-3])
    reader = CacheReader(ds.processed_dir, ds.fingerprint)
    assert reader.has("graph.pt") and not reader.has("train.pt")
    assert reader.json("ent2id.json") == ds.ent2id
    with pytest.raises(CacheError, match=rf"{path}: size \d+ bytes, expected \d+"):
        reader.json("rel2id.json")
    with pytest.raises(CacheError, match="fingerprint"):
        CacheReader(ds.processed_dir, "0" * 16)
    meta = json.loads((Path(ds.processed_dir) / META_FILE).read_text())
    assert meta["files"]["graph.pt"]["size"] == (Path(ds.processed_dir) / "graph.pt").stat().st_size
    assert set(meta["files"]) == {"graph.pt", "ent2id.json", "rel2id.json"}


def test_unwritable_cache_is_reported_not_hidden(root, monkeypatch):
    ds = KGDataset(root, "tiny_kg", text_emb_model=StubEmb())
    (Path(ds.processed_dir) / "graph.pt").write_bytes(b"garbage")
    from gfmrag_fast.data import cache

    def no_rename(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", src)

    monkeypatch.setattr(cache.os, "rename", no_rename)
    graph = Path(ds.processed_dir) / "graph.pt"
    with pytest.raises(CacheError, match=rf"{graph}: size 7 bytes, expected \d+ .*could not be rebuilt: .*Read-only"):
        KGDataset(root, "tiny_kg", text_emb_model=StubEmb())
    assert leftovers(root, "tiny_kg") == []


# --------------------------------------------------------------------------- relation names
def test_inverse_names_unique_when_input_has_inverse_prefix(root):
    write_kg(root, "clash", "a,x,b\nb,inverse_x,c\nc,y,a\na,x (2),c\nb,inverse_y,a\n")
    ds = KGDataset(root, "clash", text_emb_model=StubEmb())
    names = ds.rel_names
    assert len(names) == len(set(names)) == len(ds.rel2id) == ds.num_relations == 10
    assert names[:5] == ["x", "inverse_x", "y", "x (2)", "inverse_y"]
    # Non-colliding inverses keep GFM-RAG's "inverse_" + name, as released checkpoints expect;
    # "inverse_x (2)" is the plain inverse of "x (2)", so the inverse of "x" skips to (3).
    assert names[5:] == ["inverse_x (3)", "inverse_inverse_x", "inverse_y (2)", "inverse_x (2)", "inverse_inverse_y"]
    assert ds.rel2id == {n: i for i, n in enumerate(names)}
    assert ds.graph.rel_emb.shape == (10, DIM)


def test_inverse_names_without_collision_are_unchanged(root):
    ds = KGDataset(root, "tiny_kg", text_emb_model=StubEmb())
    assert ds.rel_names == ["capital of", "member of", "located in",
                            "inverse_capital of", "inverse_member of", "inverse_located in"]


# --------------------------------------------------------------------------- input hygiene
def test_bom_at_start_of_kg_and_of_a_concatenated_part_is_stripped(root):
    write_kg(root, "bom", "\ufeffa,r,b\n\ufeffb,r,c\n")
    ds = KGDataset(root, "bom", text_emb_model=StubEmb())
    assert list(ds.ent2id) == ["a", "b", "c"]
    assert read_triples(stage1(root, "bom") / "kg.txt") == ([("a", "r", "b"), ("b", "r", "c")], 0)


def test_nul_byte_in_kg_names_file_and_line(root):
    write_kg(root, "nul", b"a,r,b\nb,r\x00x,c\n")
    with pytest.raises(ValueError, match=r"kg\.txt:2: malformed triple: NUL byte at column 4"):
        KGDataset(root, "nul", text_emb_model=StubEmb())
    assert read_triples(stage1(root, "nul") / "kg.txt", on_error="skip") == ([("a", "r", "b")], 1)


def test_deeply_nested_json_names_its_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=rf"{path}: JSON nested too deeply"):
        read_json(path)


@pytest.mark.parametrize("record,message", [
    ({"question": None}, r"question 1 \(id 'q2'\): 'question' must be a string, got null"),
    ({"question": ["Where?"]}, r"question 1 \(id 'q2'\): 'question' must be a string, got array"),
    ({"question_entities": None}, r"question 1 \(id 'q2'\): 'question_entities' must be a list of names, got null"),
    ({"supporting_facts": ["Doc B", None]},
     r"question 1 \(id 'q2'\): 'supporting_facts' must be a list of names, item 1 is null"),
    ({"supporting_entities": [3]},
     r"question 1 \(id 'q2'\): 'supporting_entities' must be a list of names, item 0 is number"),
    ({"id": None}, r"question 1: 'id' must be a string or an integer, got null"),
])
def test_wrong_types_in_question_records_name_file_and_record(root, record, message):
    path = stage1(root, "tiny_qa") / "train.json"
    items = json.loads(path.read_text())
    items[1].update(record)
    path.write_text(json.dumps(items))
    with pytest.raises(ValueError, match=rf"{path}: {message}"):
        QADataset(root, "tiny_qa", text_emb_model=StubEmb())


def test_question_record_that_is_not_an_object(root):
    path = stage1(root, "tiny_qa") / "test.json"
    path.write_text('[null]')
    with pytest.raises(ValueError, match=rf"{path}: question 0: expected an object, got null"):
        QADataset(root, "tiny_qa", text_emb_model=StubEmb())


def test_non_string_entity_in_document2entities_names_file_and_document(root):
    path = stage1(root, "tiny_qa") / "document2entities.json"
    d2e = json.loads(path.read_text())
    d2e["Doc B"].append(None)
    path.write_text(json.dumps(d2e))
    with pytest.raises(ValueError, match=rf"{path}: document 'Doc B': item \d+ is null, expected an entity name"):
        QADataset(root, "tiny_qa", text_emb_model=StubEmb())


def test_duplicate_triples_are_counted(root, caplog):
    write_kg(root, "dups", "a,r,b\nb,r,c\na,r,b\n a , r , b \na,s,b\n")
    with caplog.at_level(logging.WARNING):
        ds = KGDataset(root, "dups", text_emb_model=StubEmb())
    assert ds.stats["duplicate_triples"] == 2 and ds.stats["triples"] == 5
    assert ds.graph.target_edge_index.shape[1] == 5  # kept, as GFM-RAG keeps them
    assert "2 duplicate triple(s)" in caplog.text


@pytest.mark.parametrize("name", ["/etc", "..", "../tiny_kg", "tiny_kg/../../x", "a/..", "", "a\\..\\..\\b", "a\x00b"])
def test_dataset_names_outside_root_are_refused(root, name):
    with pytest.raises(ValueError, match="dataset name"):
        KGDataset(root, name, text_emb_model=StubEmb())
    with pytest.raises(ValueError, match="dataset name"):
        load_datasets(root, [name], kind="kg", text_emb_model=StubEmb())
    assert sorted(os.listdir(root)) == ["tiny_kg", "tiny_qa"]


def test_nested_dataset_name_is_allowed(root):
    shutil.copytree(root / "tiny_kg", root / "kg" / "tiny")
    assert KGDataset(root, "kg/tiny", text_emb_model=StubEmb()).num_nodes == 10
