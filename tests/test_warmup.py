"""The numba warm-up (pipeline/warmup.py): it writes a cache the select stage then loads without
compiling anything, and the stage's outputs are the same bytes with and without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline import warmup
from pipeline.config import config_from_dict
from pipeline.select.driver import compute
from pipeline.storage import Store
from pipeline.testing import write_graph_stages
from pipeline.workdir import EMBED, GRAPH, SELECT

REPO = Path(__file__).resolve().parents[1]

# the select stage in a process of its own, on the case in argv[1], writing into argv[2]
STAGE_SCRIPT = textwrap.dedent("""
    import json, sys
    from pipeline.config import config_from_dict
    from pipeline.select.driver import compute
    from pipeline.storage import Store
    compute(config_from_dict(json.loads(sys.argv[1])), Store(), sys.argv[2], use_ray=False)
""")


def _case(tmp: Path, partitions: int):
    rng = np.random.default_rng(11)
    n, k = 500, 5
    nb = rng.integers(0, n, size=(n, k))
    nb[rng.random((n, k)) < 0.1] = -1
    sq = (rng.random((n, k)) * 2).astype(np.float32)
    sq[nb < 0] = np.inf
    cells = rng.integers(0, 20, n).astype(np.int32)
    scores = rng.normal(0.3, 0.1, n)
    raw = {"workdir": str(tmp / "work"), "input": {"shards": str(tmp / "pool/{00000..00002}.tar")},
           "output": {"url": str(tmp / "out")}, "graph": {"k": k},
           "select": {"partitions": partitions, "prune_rate": 0.6, "beta": 0.1, "keep_rates": [0.1]}}
    cfg = config_from_dict(raw)
    write_graph_stages(Store(), cfg, nb, sq, cells, scores, n_parts=4, return_uids=False)
    return raw, cfg


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _cache_files(cache: Path) -> set[str]:
    return {str(p) for p in cache.rglob("*.nbc")}


@pytest.mark.slow  # compiles every select kernel from a cold cache: ~25 CPU seconds
@pytest.mark.timeout(900)
def test_warmup_writes_a_cache_the_stage_loads_and_outputs_are_the_same_bytes(tmp_path):
    """Over 60 s when the cores are busy (153 s at load 35): the kernels compile from a cold cache,
    which is what is tested, and stages then run warm and cold in subprocesses."""
    cache = tmp_path / "numba-cache"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO), "D2PRUNE_WARMUP": "0"}
    # the warm-up, as the job runner starts it, but in the foreground (a cold cache: ~20 s of compiling)
    done = subprocess.run([sys.executable, "-m", "pipeline.warmup"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    stamps = list(cache.glob("d2prune-warmup-*.json"))
    assert len(stamps) == 1
    stamp = json.loads(stamps[0].read_text())
    assert stamp["index_files"] and all(os.path.exists(p) for p in stamp["index_files"])
    after_warmup = _cache_files(cache)

    for partitions in (1, 4):  # the in-process path with one partition (direct) and with a shuffle
        case = tmp_path / f"P{partitions}"
        raw, cfg = _case(case, partitions)
        # with the warm cache, in a fresh process: nothing compiled (no new cache entries)
        run = subprocess.run([sys.executable, "-c", STAGE_SCRIPT, json.dumps(raw), str(case / "warm")], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        assert _cache_files(cache) == after_warmup, "the select stage compiled kernels the warm-up had not cached"
        # without it: this process's own kernels (compiled or loaded from the in-tree cache)
        compute(cfg, Store(), str(case / "cold"), use_ray=False)
        warm, cold = _files(case / "warm"), _files(case / "cold")
        assert {"selected.parquet", "subset.npy"} <= set(cold)
        assert warm.keys() == cold.keys()
        for name in cold:
            assert warm[name] == cold[name], name


def test_warm_stamp_needs_its_index_files(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    key = warmup.cache_key()
    assert not warmup.is_warm(key)
    index = tmp_path / "x.nbi"
    index.write_bytes(b"")
    warmup.stamp_path(key).write_text(json.dumps({"key": key, "index_files": [str(index)]}))
    assert warmup.is_warm(key)
    index.unlink()  # caches cleared: cold again
    assert not warmup.is_warm(key)


def test_the_job_runner_starts_it_only_before_a_select_stage_with_work_before_it(monkeypatch):
    started = []
    monkeypatch.setattr(warmup, "start", lambda: started.append(1) or "proc")
    committed = {EMBED: False, GRAPH: False, SELECT: False}
    assert warmup.start_for_job([EMBED, GRAPH, SELECT], committed.get) == "proc"
    assert warmup.start_for_job([SELECT], committed.get) is None  # nothing to overlap with
    assert warmup.start_for_job([EMBED, GRAPH], committed.get) is None  # no select stage
    committed.update({EMBED: True, GRAPH: True})
    assert warmup.start_for_job([EMBED, GRAPH, SELECT], committed.get) is None
    committed.update({GRAPH: False, SELECT: True})
    assert warmup.start_for_job([EMBED, GRAPH, SELECT], committed.get) is None
    assert len(started) == 1


def test_start_is_off_with_the_switch_and_never_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(warmup.ENV_SWITCH, "0")
    assert warmup.start() is None
    monkeypatch.setenv(warmup.ENV_SWITCH, "1")
    monkeypatch.setattr(warmup, "cache_key", lambda: 1 / 0)
    assert warmup.start() is None
