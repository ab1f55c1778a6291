"""Smoke tests of the coreset-quality benchmark's pure helpers, on tiny synthetic arrays.

No dataset, no training: the benchmark itself (benchmarks/coreset_quality.py) is run by hand.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cq():
    spec = importlib.util.spec_from_file_location("coreset_quality", REPO / "benchmarks" / "coreset_quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["coreset_quality"] = mod
    spec.loader.exec_module(mod)
    return mod


def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def test_parse_idx_round_trip_and_errors(cq):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(cq.parse_idx(idx_bytes(arr)), arr)
    with pytest.raises(ValueError, match="bad magic"):
        cq.parse_idx(b"\x01\x00\x08\x01" + b"\x00" * 8, "x.idx")
    with pytest.raises(ValueError, match="body has"):
        cq.parse_idx(idx_bytes(arr)[:-1], "short.idx")


def test_read_idx_gz_and_missing(cq, tmp_path):
    import gzip

    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    with gzip.open(tmp_path / "lab-idx1-ubyte.gz", "wb") as f:
        f.write(idx_bytes(labels))
    np.testing.assert_array_equal(cq.read_idx(tmp_path / "lab-idx1-ubyte"), labels)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        cq.read_idx(tmp_path / "nope-idx1-ubyte")


def test_stratified_split_disjoint_sized_and_balanced(cq):
    labels = np.repeat(np.arange(10), 100)
    pool, val = cq.stratified_split(labels, val_size=200, pool_size=500, seed=1)
    assert len(val) == 200 and len(pool) == 500
    assert not set(pool) & set(val)
    assert (np.bincount(labels[val]) == 20).all() and (np.bincount(labels[pool]) == 50).all()
    pool_all, val2 = cq.stratified_split(labels, 200, None, 1)
    assert len(pool_all) == 800 and np.array_equal(val, val2)  # deterministic for a seed
    with pytest.raises(ValueError, match="exceed"):
        cq.stratified_split(labels, 600, 500, 0)


def test_dynamics_recorder_forgetting_and_aum(cq):
    labels = np.array([0, 1, 2])
    rec = cq.DynamicsRecorder(labels)
    right = lambda y: np.eye(3)[y] * 2.0  # noqa: E731  logit 2 on class y, 0 elsewhere
    wrong = lambda y: np.eye(3)[(y + 1) % 3] * 2.0  # noqa: E731
    # sample 0: right, wrong, right, wrong -> 2 forgetting events
    # sample 1: always right -> 0 events; sample 2: never right -> never learned
    for epoch in range(4):
        logits = np.stack([right(0) if epoch % 2 == 0 else wrong(0), right(1), wrong(2)])
        rec.update(np.array([0, 1, 2]), logits)
    f = rec.forgetting()
    assert f[0] == 2 and f[1] == 0 and f[2] == 3  # never learned = max learned + 1
    np.testing.assert_allclose(rec.aum(), [0.0, 2.0, -2.0])  # margins +2/-2 alternate for sample 0


def test_el2n_and_softmax(cq):
    probs = cq.softmax(np.array([[0.0, 0.0], [100.0, 0.0]]))
    np.testing.assert_allclose(probs[0], [0.5, 0.5])
    e = cq.el2n(probs, np.array([0, 1]))
    np.testing.assert_allclose(e, [np.sqrt(0.5), np.sqrt(2.0)], atol=1e-9)


def test_d2_scores_nonnegative_ranked_with_floor(cq):
    d = np.array([-3.0, 1.0, 5.0, 1.0])
    s, shift = cq.d2_scores(d, floor=0.05)
    assert shift == 3.0
    np.testing.assert_allclose(s, [0.05, 0.55, 1.05, 0.55])


def test_batch_plan_epochs_cover_every_sample(cq):
    plan = cq.batch_plan(10, 4, 6, np.random.default_rng(0))
    assert [len(b) for b in plan] == [4, 4, 2, 4, 4, 2]
    assert sorted(np.concatenate(plan[:3])) == list(range(10))
    with pytest.raises(ValueError):
        cq.batch_plan(0, 4, 1, np.random.default_rng(0))


def test_lr_schedule_warms_up_and_decays(cq):
    r = cq.Recipe(lr=0.1, warmup_fraction=0.1)
    lrs = [cq.lr_at(i, 100, r) for i in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3


def test_result_log_resumes_and_skips_cut_line(cq, tmp_path):
    path = tmp_path / "results.jsonl"
    log = cq.ResultLog(path)
    log.add({"key": "a", "acc": 0.5})
    with open(path, "a") as f:
        f.write('{"key": "b", "ac')  # a crash mid-write
    again = cq.ResultLog(path)
    assert set(again.done) == {"a"} and again.done["a"]["acc"] == 0.5


def _toy_selector(cq, n_per_class=40, n_classes=3, dim=6):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    centres = rng.normal(size=(n_classes, dim)) * 3
    feats = (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32)
    n = len(labels)
    dyn = {
        "labels": labels,
        "features": feats,
        "aum": rng.normal(size=n),
        "forgetting": rng.integers(0, 3, size=n).astype(float),
        "el2n": rng.random(n),
        "pool": np.arange(n),
    }
    settings = cq.Settings(
        mode="test", pool_size=None, val_size=0, split_seed=0, dyn_epochs=1, dyn_seeds=(0,), el2n_epoch=1,
        train_steps=1, seeds=(0,), rates=(0.5,),
    )
    graphs = cq.build_class_graphs(feats, labels, k_max=5)
    return cq.Selector(settings, dyn, graphs), dyn


def test_selections_exact_budget_and_label_balanced(cq):
    sel, dyn = _toy_selector(cq)
    n = len(dyn["labels"])
    for method in [
        cq.Method("random"),
        cq.Method("forgetting"),
        cq.Method("el2n"),
        cq.ccs_method(0.1),
        cq.Method("moderate"),
        cq.Method("kcenter"),
        cq.d2_method("aum", 5, 1.0, 0.0),
        cq.d2_method("forgetting", 3, 0.1, 0.2, gamma_f=10.0),
    ]:
        ids = sel.select(method, 0.5, 0)
        assert len(ids) == n // 2 and len(np.unique(ids)) == len(ids), method
    d2_ids = sel.select(cq.d2_method("aum", 5, 1.0, 0.2), 0.5, 0)
    assert (np.bincount(dyn["labels"][d2_ids]) == 20).all()  # uniform class budgets
    dropped = np.argsort(dyn["aum"])[: int(round(0.2 * n))]  # beta removes the lowest AUM
    assert not set(dropped) & set(d2_ids)
    # deterministic
    sel2, _ = _toy_selector(cq)
    np.testing.assert_array_equal(sel2.select(cq.d2_method("aum", 5, 1.0, 0.2), 0.5, 0), d2_ids)
    diag = sel.diagnostics(d2_ids, np.arange(n))
    assert 0 <= diag["hardness_pct"] <= 1 and diag["coverage_sqdist"] >= 0


def test_render_markdown_from_report(cq):
    report = {
        "settings": {
            "mode": "test", "rates": [0.5], "train_steps": 10, "recipe": {"batch_size": 8},
            "d2_score_floor": 0.05, "ccs_strata": 50, "workers": 1, "threads_per_worker": 1,
        },
        "data": {"pool": 100, "val": 10, "test": 10},
        "table": {
            "random": {"0.5": cq.summarise([0.8, 0.82])},
            "d2": {"0.5": cq.summarise([0.85, 0.86])},
        },
        "labels": {"random": "Random", "d2": "D2 (ours)"},
        "full": cq.summarise([0.9, 0.9]),
        "sweep": {"chosen": {"d2": {"0.5": {"difficulty": "aum", "k": 5, "gamma_f": 10.0, "gamma_r": 1.0, "beta": 0.0, "val_acc": 0.8}},
                             "ccs": {"0.5": {"beta": 0.1, "val_acc": 0.7}}}},
        "graph": {"unit": 0.03},
        "machine": {"description": "test box", "contention": ""},
        "timing": {"total_s": 60.0, "trainings": 4},
    }
    md = cq.render_markdown(report)
    assert "| D2 (ours) | **85.50 ± 0.71** |" in md
    assert "| 50% | aum | 5 | 10.0 | 1.0 | 0.0 | 80.00 | 0.1 | 70.00 |" in md
    assert "| Random | 81.00 ± 1.41 |" in md
    report["table"]["random"]["0.5"] = cq.summarise([0.8])  # one seed: no std shown
    assert "| Random | 80.00 |" in cq.render_markdown(report)
    json.dumps(report)  # the report is JSON-serialisable


def test_full_mode_trains_each_coreset_for_epochs_of_itself(cq):
    full = cq.full_settings()
    batch = full.recipe.batch_size
    assert full.steps_for(55_000) == full.train_epochs * -(-55_000 // batch)
    assert full.steps_for(100) == full.min_train_steps  # never fewer steps than that
    assert full.steps_for(5_500) < full.steps_for(55_000)  # a smaller coreset: fewer steps, same epochs
    assert 20 in full.d2_k_grid  # k searched up to 20 at every rate
    quick = cq.quick_settings()
    assert quick.steps_for(10) == quick.steps_for(10_000) == quick.train_steps
    assert full.run_key() != cq.dataclasses.replace(full, train_epochs=6).run_key()
