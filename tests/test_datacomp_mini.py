"""The DataComp-in-miniature benchmark (benchmarks/datacomp_mini.py): its pure helpers on small
synthetic data, and ``--quick`` end to end (the scenes pool only: no dataset to install).

The quick run checks that the protocol runs through the pipeline's stages and produces every
method's scores and ``d2_minus_topk``; it asserts no expected result (the figures live in
benchmarks/results/datacomp_mini.md).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dm():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("datacomp_mini", REPO / "benchmarks" / "datacomp_mini.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["datacomp_mini"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_recall_counts_identical_captions_as_hits(dm):
    sims = np.array([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.0, 0.1, 0.2]])
    same = np.eye(3, dtype=bool)
    r = dm.recall_at(sims, same, ks=(1, 2))
    assert r[1] == pytest.approx(2 / 3) and r[2] == 1.0  # query 1's own item is second
    same[1, 0] = True  # items 0 and 1 carry the same caption
    assert dm.recall_at(sims, same, ks=(1,))[1] == 1.0


def test_a_logged_result_stands_only_for_the_subset_selected_today(dm, tmp_path):
    """Resuming after the pipeline changed (D2's rule, the select stage's seeding): a result
    trained on another subset than the one the method selects now is retrained, not reported."""
    import coreset_quality as cq

    today = {"random": np.array([3, 1, 2]), "topk": np.array([4, 5, 6])}

    class Today:  # the Selections interface: today's subset of each method
        def rows(self, pool, method, kept, seed):
            return today[method.name]

    log = cq.ResultLog(tmp_path / "results.jsonl")
    jobs = {name: dm.Job("scenes", dm.Method(name), 0.3, 0, "test") for name in today}
    log.add({"key": jobs["random"].key(), "rows_sha": cq.rows_hash(np.array([1, 2, 3]))})  # same rows, other order
    log.add({"key": jobs["topk"].key(), "rows_sha": cq.rows_hash(np.array([4, 5, 7]))})  # an older selection
    messages = []
    runner = dm.Runner(dm.quick_settings(), {"scenes": None}, Today(), cq.ResultLog(log.path), None, messages.append)
    assert runner.current(jobs["random"])
    assert not runner.current(jobs["topk"]) and runner.results.stale == 1
    assert jobs["topk"].key() not in runner.results.done and "stale result" in messages[0]
    assert cq.rows_hash(np.array([1, 2, 3])) != cq.rows_hash(np.array([1, 2, 4]))


def test_validation_noise_trains_the_chosen_d2_and_references_over_seeds(dm):
    import dataclasses

    settings = dataclasses.replace(dm.quick_settings(), val_noise_seeds=(1, 2))
    chosen = {"d2": {"gamma": 1.0, "beta": 0.2, "k": 5, "vector": "image+text"}}

    class FakeRunner:  # the Runner interface: results of the jobs asked for
        asked: list = []

        def log(self, msg):
            pass

        def run(self, jobs, deadline=None):
            self.asked += jobs
            return {j.key(): {"metrics": {"zeroshot_avg": 0.4 + 0.01 * j.seed + (0.05 if j.method.name == "d2" else 0)}}
                    for j in jobs if not (j.method.name == "topk" and j.seed == 2)}  # one cut by the deadline

    runner = FakeRunner()
    pool = type("P", (), {"name": "scenes"})()
    out = dm.validation_noise(settings, runner, pool, chosen, None)
    assert {(j.method.name, j.seed, j.split, j.kept) for j in runner.asked} == {
        (m, s, "val", 0.3) for m in ("d2", "random", "topk") for s in (0, 1, 2)}
    assert out["d2"]["n"] == 3 and out["d2"]["mean"] == pytest.approx(0.46)
    assert out["topk"]["n"] == 2 and out["random"]["values"] == pytest.approx([0.40, 0.41, 0.42])
    assert dm.validation_noise(dm.quick_settings(), runner, pool, chosen, None) == {}


def test_semdedup_drops_the_asked_fraction_near_copies_first(dm):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 16))
    copies = base[:40] + rng.normal(scale=1e-3, size=(40, 16))
    x = np.concatenate([base, copies])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    keep, eps = dm.semdedup_keep(x, drop=40 / 240, seed=0)
    assert (~keep).sum() == 40 and 0 <= eps < 1e-3
    # one of each (original, copy) pair goes, nothing else
    assert all(keep[i] != keep[200 + i] for i in range(40)) and keep[40:200].all()


def test_basic_filter_rules(dm):
    keep, drops = dm.basic_filter_mask([
        "a small red striped circle on the left over a grey background",
        "IMG_4821.jpg",
        "une image avec un cercle rouge, fond gris",
        "photo of a dog",
        "ab cd e",
    ])
    assert keep.tolist() == [True, False, False, True, True]
    assert drops["words_le_2"] == 1 and drops["dropped"] == 2


def test_fashion_pool_plan_plants_what_it_says(dm):
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), 400)
    images = rng.integers(0, 255, size=(len(labels), 28, 28), dtype=np.uint8)
    settings = dm.Settings(mode="test", pools=("fashion",), pool_size=2000, kept=(0.3,), seeds=(0,))
    plan = dm.plan_fashion_pool(labels, images, np.arange(len(labels)), settings)
    assert len(plan) == 2000
    assert sum(p["mismatched"] for p in plan) == 200
    assert sum(bool(p["junk"]) for p in plan) == 120
    for c in dm.FASHION_RARE:
        assert sum(p["label"] == c for p in plan) == 20
    for p in plan:
        if p["mismatched"]:
            assert p["caption"] != p["true_caption"]
    assert plan == dm.plan_fashion_pool(labels, images, np.arange(len(labels)), settings)  # seeded
    image_ids = [p["image_id"] for p in plan if p["dup_variant"] in ("", "original")]
    assert len(set(image_ids)) == len(image_ids)  # originals are distinct pictures


def test_demo_pool_junk_captions_and_tail(tmp_path):
    from pipeline.demo import pool as demo_pool

    spec = demo_pool.PoolSpec(n_samples=600, samples_per_shard=300, seed=3, junk_caption_rate=0.1, tail_exponent=1.0)
    manifest = demo_pool.generate_pool(str(tmp_path), spec)
    gt = pq.read_table(manifest["ground_truth"]).to_pydict()
    junk = np.array(gt["junk"])
    assert (junk != "").sum() == 60 == manifest["planted"]["junk_captions"]
    assert not (np.array(gt["mismatched"]) & (junk != "")).any()
    shapes = [s for s, r in zip(gt["shape"], gt["rare"]) if not r]
    counts = [shapes.count(s) for s in demo_pool.scenes.COMMON_SHAPES]
    assert counts[0] > 2 * counts[-1]  # Zipf weights: the first common shape far more frequent than the last


@pytest.mark.timeout(2400)
def test_quick_run_end_to_end(tmp_path):
    """Over 60 s (76 s idle; 15 minutes at load 20): --quick, the protocol's smallest run, trains 14
    small CLIPs through the pipeline's stages, then reruns to show every training resumes."""
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "datacomp_mini.py"), "--quick", "--cache", str(tmp_path / "cache"),
         "--json", str(out), "--md", str(tmp_path / "quick.md"), "--plot", str(tmp_path / "quick.png")],
        cwd=REPO, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    scenes = report["pools"]["scenes"]
    assert set(scenes["methods"]) == {"full", "random", "topk", "d2", "d2_basic", "ccs", "semdedup_topk", "kcenter"}
    for name, entry in scenes["methods"].items():
        cell = entry["by_kept"]["0.0" if name == "full" else "0.3"]
        for metric in ("zeroshot_avg", "zeroshot_shape", "zeroshot_colour", "zeroshot_texture", "rare_acc",
                       "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
            assert 0.0 <= cell["metrics"][metric]["mean"] <= 1.0
    d2 = scenes["methods"]["d2"]["by_kept"]["0.3"]["metrics"]["zeroshot_avg"]["mean"]
    topk = scenes["methods"]["topk"]["by_kept"]["0.3"]["metrics"]["zeroshot_avg"]["mean"]
    assert math.isclose(scenes["d2_minus_topk"], d2 - topk) and report["d2_minus_topk"]["scenes"] == scenes["d2_minus_topk"]
    assert scenes["sweep"]["chosen"]["d2"]["vector"] == "image+text"
    assert (tmp_path / "quick.png").stat().st_size > 0
    # a rerun resumes: every training is in the result log
    again = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "datacomp_mini.py"), "--quick", "--cache", str(tmp_path / "cache")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert again.returncode == 0 and "(14 trainings already done)" in again.stdout
