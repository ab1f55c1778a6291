"""``select.prefilter.decontaminate``: pool samples whose image vector is at or above the cosine
threshold to an evaluation image leave the pool before β and the budget (reason
``eval_duplicate``, with the set, the item and the similarity), from precomputed vectors (npy, npz,
parquet) or from evaluation shards embedded with the job's model; exact and the same bits whatever
the blocks, partitions or a kill; sets that cannot work are refused before any work (exit 2)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_exact_duplicates import decisions_of, kill_select_after, selection_bytes
from test_select import make_workdir, run_select_stage

from pipeline import workdir
from pipeline.core import decontaminate as core
from pipeline.core.decontaminate import nearest_evaluation
from pipeline.errors import EXIT_CONFIG
from pipeline.storage import join

N, DIM, THRESHOLD = 600, 16, 0.97


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def eval_vectors(pool: np.ndarray, seed: int = 5):
    """40 evaluation vectors: 20 near-copies of pool rows 100..119 (a little noise) and 20 others
    (random directions, far from the clustered pool). Returns (vectors, {pool row: eval row})."""
    rng = np.random.default_rng(seed)
    copies = pool[100:120].astype(np.float64) + 0.01 * rng.normal(size=(20, pool.shape[1]))
    others = rng.normal(size=(20, pool.shape[1]))
    return np.concatenate([copies, others]).astype(np.float32), {100 + j: j for j in range(20)}


def reference(pool, evals, threshold):
    """Best evaluation row and cosine of each pool row above the threshold, in float64 numpy."""
    sims = _unit(pool) @ _unit(evals).T
    best = sims.argmax(axis=1)
    top = sims[np.arange(len(pool)), best]
    return {i: (int(best[i]), float(top[i])) for i in np.flatnonzero(top >= threshold)}


def _config(tmp_path, vectors_url, name="val", **select):
    return {"partitions": 1, "prefilter": {"decontaminate": {"threshold": THRESHOLD,
                                                             "sets": [{"name": name, "vectors": vectors_url}]}},
            **select}


# -- the pure core ----------------------------------------------------------------------------------

def test_nearest_evaluation_is_exact_and_the_same_for_any_block(monkeypatch):
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(900, 24)).astype(np.float16)
    evals = np.concatenate([pool[:30].astype(np.float32) + 0.02 * rng.normal(size=(30, 24)),
                            rng.normal(size=(70, 24))]).astype(np.float32)
    evals[40] = evals[3]  # a tie: the lower evaluation row wins
    best, sim = nearest_evaluation(pool, evals, 0.5)
    want = reference(pool.astype(np.float32), evals, 0.5)
    assert set(np.flatnonzero(best >= 0).tolist()) == set(want)
    for i, (b, s) in want.items():
        assert best[i] == b and abs(sim[i] - s) < 1e-9
    assert np.isnan(sim[best < 0]).all()
    monkeypatch.setattr(core, "POOL_BLOCK_ROWS", 7)  # other blocks, other BLAS calls: the same bits
    best7, sim7 = nearest_evaluation(pool, evals, 0.5)
    assert np.array_equal(best7, best) and np.array_equal(sim7, sim, equal_nan=True)
    with pytest.raises(ValueError, match="differ in width"):
        nearest_evaluation(pool, evals[:, :8], 0.5)


# -- the select stage, precomputed vectors ------------------------------------------------------------

@pytest.mark.parametrize("form", ["npy", "npz", "parquet"])
def test_copies_of_evaluation_vectors_leave_the_pool_with_their_match(tmp_path, form):
    cfg, store, a = make_workdir(tmp_path, n=N, dim=DIM, select=_config(tmp_path, str(tmp_path / f"val.{form}"),
                                                                         beta=0.1))
    pool16 = a["vectors"].astype(np.float16)  # as the parts hold them
    evals, _ = eval_vectors(a["vectors"])
    ids = [f"item-{j}" for j in range(len(evals))]
    if form == "npy":
        np.save(tmp_path / "val.npy", evals)
        ids = [str(j) for j in range(len(evals))]  # a .npy's ids are its row numbers
    elif form == "npz":
        np.savez(tmp_path / "val.npz", vectors=evals, ids=np.array(ids))
    else:
        pq.write_table(pa.table({"id": ids, "vector": pa.array(list(evals.astype(np.float64)),
                                                                pa.list_(pa.float64()))}), tmp_path / "val.parquet")
    stats = run_select_stage(cfg, store)
    want = reference(pool16.astype(np.float32), evals, THRESHOLD)
    assert len(want) >= 20  # the planted copies, and whatever pool rows lie as close
    assert stats["decontaminate"] == {"threshold": THRESHOLD, "dropped": len(want), "dropped_by_set": {"val": len(want)},
                                      "matches": len(want)}
    assert stats["candidates"] == N - len(want) and stats["prefiltered_beta"] == round(0.1 * (N - len(want)))
    dec = decisions_of(cfg)
    assert list(dec)[-3:] == ["eval_set", "eval_id", "eval_similarity"]  # appended after the columns of before
    row = {u: i for i, u in enumerate(dec["uid"])}
    for node, uid in enumerate(a["uids"]):
        r = row[uid]
        if node in want:
            item, similarity = want[node]
            assert (dec["reason"][r], dec["eval_set"][r], dec["eval_id"][r]) == ("eval_duplicate", "val", ids[item])
            assert abs(dec["eval_similarity"][r] - similarity) < 1e-9 and dec["eval_similarity"][r] >= THRESHOLD
        else:
            assert dec["reason"][r] != "eval_duplicate"
            assert dec["eval_set"][r] is None and dec["eval_id"][r] is None and dec["eval_similarity"][r] is None


def test_exact_duplicates_come_before_decontamination(tmp_path):
    import hashlib

    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(N)]
    digests[400] = digests[100]  # node 400 repeats node 100's bytes, and node 100 copies an evaluation image
    select = _config(tmp_path, str(tmp_path / "val.npy"))
    select["prefilter"]["exact_duplicates"] = True
    cfg, store, a = make_workdir(tmp_path, n=N, dim=DIM, select=select, filter_columns={"sha256s": digests})
    evals, _ = eval_vectors(a["vectors"])
    np.save(tmp_path / "val.npy", evals)
    stats = run_select_stage(cfg, store)
    dec = decisions_of(cfg)
    reason = dict(zip(dec["uid"], dec["reason"]))
    assert reason[a["uids"][100]] == "eval_duplicate" and reason[a["uids"][400]] == "exact_duplicate"
    assert stats["exact_duplicates"]["dropped"] == 1
    # a match counts on its own; a sample dropped as an exact duplicate first is not dropped again
    want = reference(a["vectors"].astype(np.float16).astype(np.float32), evals, THRESHOLD)
    assert stats["decontaminate"]["matches"] == len(want)
    assert stats["decontaminate"]["dropped"] == len(set(want) - {400})


def test_partitions_one_and_eight_and_a_kill_give_the_same_bytes(tmp_path):
    outputs = []
    for name, partitions, kills in (("p1", 1, ()), ("p8", 8, ()), ("killed", 8, (2, 5))):
        root = tmp_path / name
        root.mkdir()
        cfg, store, a = make_workdir(root, n=N, dim=DIM, select=_config(root, str(root / "val.npy"),
                                                                         partitions=partitions, beta=0.1))
        np.save(root / "val.npy", eval_vectors(a["vectors"])[0])
        kill_select_after(cfg, store, *kills)
        run_select_stage(cfg, store)
        outputs.append(selection_bytes(cfg))
    assert outputs[0] == outputs[1] == outputs[2]


# -- refused before any work -------------------------------------------------------------------------

def _cli_config(tmp_path, cfg, sets, threshold=THRESHOLD) -> str:
    raw = cfg.model_dump(mode="json")
    raw["select"]["prefilter"]["decontaminate"] = {"threshold": threshold, "sets": sets}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("case", ["wide", "missing", "corrupt", "no_vectors_key", "threshold_0", "threshold_above_1",
                                  "both_sources"])
def test_sets_that_cannot_work_exit_2_before_any_work(tmp_path, capsys, case):
    from pipeline.cli import main

    cfg, store, _ = make_workdir(tmp_path, n=N, dim=DIM)
    url = str(tmp_path / "val.npy")
    sets = [{"name": "val", "vectors": url}]
    threshold = {"threshold_0": 0.0, "threshold_above_1": 1.5}.get(case, THRESHOLD)
    if case == "wide":
        np.save(url, np.ones((5, DIM + 1), np.float32))
    elif case == "corrupt":
        open(url, "wb").write(b"not a numpy file")
    elif case == "no_vectors_key":
        url = str(tmp_path / "val.npz")
        np.savez(url, embeddings=np.ones((5, DIM), np.float32))
        sets = [{"name": "val", "vectors": url}]
    elif case == "both_sources":
        np.save(url, np.ones((5, DIM), np.float32))
        sets = [{"name": "val", "vectors": url, "shards": str(tmp_path / "e.tar")}]
    elif case != "missing":
        np.save(url, np.ones((5, DIM), np.float32))
    code = main(["run", _cli_config(tmp_path, cfg, sets, threshold)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == EXIT_CONFIG, err
    expected = {"wide": f"vectors {url} are {DIM + 1} wide, the pool's image vectors", "missing": "does not exist",
                "corrupt": "cannot be read", "no_vectors_key": "needs an array 'vectors'",
                "threshold_0": "threshold", "threshold_above_1": "threshold",
                "both_sources": "give exactly one of shards or vectors"}[case]
    assert expected in err and (case.startswith("threshold") or "'val'" in err)
    assert not os.path.exists(workdir.stage_dir(cfg.workdir, "select"))  # nothing written


def test_relative_set_paths_are_relative_to_the_config_file(tmp_path):
    from pipeline.config import load_config

    (tmp_path / "configs").mkdir()
    raw = {"workdir": "w", "input": {"shards": "pool/{0..1}.tar"}, "output": {"url": "out"},
           "select": {"prefilter": {"decontaminate": {"sets": [{"name": "a", "vectors": "evals/a.npy"},
                                                                {"name": "b", "shards": "evals/b/{0..1}.tar"}]}}}}
    (tmp_path / "configs" / "job.yaml").write_text(yaml.safe_dump(raw))
    sets = load_config(str(tmp_path / "configs" / "job.yaml")).select.prefilter.decontaminate.sets
    assert [s.vectors or s.shards for s in sets] == [str(tmp_path / "configs" / "evals" / "a.npy"),
                                                      str(tmp_path / "configs" / "evals" / "b" / "{0..1}.tar")]


# -- a real pool: evaluation shards embedded with the job's model -------------------------------------

@pytest.mark.slow
def test_embedded_evaluation_shards_and_their_vectors_find_the_same_copies(tmp_path, ray_local):
    """Evaluation shards embedded with the demo's CLIP; the pool holds transformed copies of some
    evaluation pictures and look-alikes (same shape and colour, another picture) of others. Every
    sample at or above the threshold, and only those, leaves with its best match and that exact
    cosine; re-encoded and resized copies are removed (how well the model tells
    crops, flips, grey-scale and look-alikes apart is the benchmark's business:
    benchmarks/decontaminate.py); the set's vectors as a file remove exactly the same samples."""
    import shutil

    from pipeline.config import config_from_dict
    from pipeline.demo.contamination import ContaminationSpec, generate
    from pipeline.demo.run import demo_config
    from pipeline.formats.columns import fixed_list_to_numpy
    from pipeline.formats.embeddings import list_parts
    from pipeline.job import run_one
    from pipeline.storage import Store

    manifest = generate(str(tmp_path / "data"), ContaminationSpec(n_pool=80, n_eval=20, planted_share=0.5,
                                                                  lookalike_share=0.25, exact_copies=2,
                                                                  samples_per_shard=40, seed=13))
    raw = demo_config(str(tmp_path), manifest["pool"], quick=True)
    raw["embed"].update(batch_size=32, num_gpus_per_actor=0)
    raw["graph"].update(nprobe=2, recall_sample=0)
    raw["select"].update(partitions=1, beta=0.0, prune_rate=0.5)
    threshold = 0.98
    raw["select"]["prefilter"] = {"exact_duplicates": True, "decontaminate": {
        "threshold": threshold, "sets": [{"name": "eval", "shards": manifest["eval"]}]}}
    cfg = config_from_dict(raw)
    store = Store()
    for stage in ("embed", "graph", "select"):
        run_one(cfg, store, stage)
    dec = decisions_of(cfg)
    # the rule, on the committed vectors: flagged iff the best cosine reaches the threshold, with that cosine
    evals = pq.read_table(join(workdir.stage_dir(cfg.workdir, "select"), "eval", "eval", "part-00000.parquet"))
    assert sorted(evals.column("id").to_pylist()) == [f"eval-{i:06d}" for i in range(20)]
    listed, _ = list_parts(store, workdir.stage_dir(cfg.workdir, "embed"))
    pool = pa.concat_tables([store.read_parquet(p.url, columns=["uid", "image_embedding"]) for p in listed])
    vectors = fixed_list_to_numpy(pool.column("image_embedding"), "image_embedding", "parts").astype(np.float32)
    want = reference(vectors, fixed_list_to_numpy(evals.column("vector"), "vector", "eval"), threshold)
    ids = evals.column("id").to_pylist()
    uids = pool.column("uid").to_pylist()
    got = {u: (e, s) for u, r, e, s in zip(dec["uid"], dec["reason"], dec["eval_id"], dec["eval_similarity"])
           if r == "eval_duplicate"}
    exact = {u for u, r in zip(dec["uid"], dec["reason"]) if r == "exact_duplicate"}
    assert len(exact) == 2  # the planted byte copies; a copy dropped as one is not judged again
    assert set(got) == {uids[i] for i in want} - exact
    for i, (item, similarity) in want.items():
        if uids[i] in exact:
            continue
        assert got[uids[i]][0] == ids[item] and abs(got[uids[i]][1] - similarity) < 1e-9
    truth = pq.read_table(manifest["ground_truth"]).to_pydict()
    easy = {u: e for u, r, e, t in zip(truth["uid"], truth["role"], truth["eval_id"], truth["transform"])
            if r == "eval_copy" and t in ("jpeg_quality", "resize")}
    # re-encoded and resized copies are removed: their own picture is at or above the threshold
    # (the decision names the most similar picture, which for this small model may be another one)
    evals_unit = _unit(fixed_list_to_numpy(evals.column("vector"), "vector", "eval"))
    own = {u: float((_unit(vectors[[uids.index(u)]]) @ evals_unit[ids.index(e)])[0]) for u, e in easy.items()}
    assert len(easy) == 4 and all(s >= threshold for s in own.values()) and set(easy) <= set(got), own
    assert sum(r == "lookalike" for r in truth["role"]) == 5  # in the pool, judged by the same rule
    # the report: the exact-duplicate count, and the removed samples beside the evaluation pictures
    from pipeline.report import EVAL_COPY_TITLE, build_report

    page = store.read_bytes(build_report(cfg.workdir, store, input_cfg=cfg.input)).decode()
    assert "exact duplicates (same image bytes as an earlier sample)</td><td>2<" in page
    assert EVAL_COPY_TITLE in page
    top = sorted(got.items(), key=lambda kv: (-kv[1][1], kv[0]))[:12]
    for uid, (eval_id, similarity) in top:
        assert f'data-removed="{uid}" data-eval="{eval_id}" data-similarity="{similarity!r}"' in page
    assert page.count('data-removed="') == len(top) and page.count("image not available") == 0
    # the evaluation set's vectors, given as a file, remove exactly the same samples with the same numbers
    pq.write_table(pa.table({"id": evals.column("id"), "vector": evals.column("vector")}), tmp_path / "eval.parquet")
    raw["workdir"] = str(tmp_path / "vectors-work")
    raw["select"]["prefilter"] = {"exact_duplicates": True, "decontaminate": {"threshold": threshold, "sets": [
        {"name": "eval", "vectors": str(tmp_path / "eval.parquet")}]}}
    again = config_from_dict(raw)
    for stage in ("embed", "graph"):
        shutil.copytree(workdir.stage_dir(cfg.workdir, stage), workdir.stage_dir(again.workdir, stage))
    run_one(again, store, "select")
    other = decisions_of(again)
    assert other["eval_id"] == dec["eval_id"] and other["eval_similarity"] == dec["eval_similarity"]
    assert other["reason"] == dec["reason"]


def test_kill_9_inside_the_pre_filters_then_the_same_bytes(tmp_path):
    """The real CLI, parked by tests/stop_point.py right after the select stage's first task (the
    first sha256 map), killed with SIGKILL, run again: the same files as a run that went through."""
    import hashlib
    import signal
    import subprocess
    import sys

    from tiny_job import wait_for

    digests = [hashlib.sha256(str(i % 550).encode()).hexdigest() for i in range(N)]  # 50 exact copies
    outputs = []
    for name, killed in (("through", False), ("killed", True)):
        root = tmp_path / name
        root.mkdir()
        select = _config(root, str(root / "val.npy"), partitions=3)
        select["prefilter"]["exact_duplicates"] = True
        cfg, store, a = make_workdir(root, n=N, dim=DIM, select=select, filter_columns={"sha256s": digests})
        np.save(root / "val.npy", eval_vectors(a["vectors"])[0])
        config = root / "job.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        command = [sys.executable, "-m", "pipeline.cli", "select", str(config)]
        if killed:
            marker = root / "parked"
            proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "stop_point.py"),
                                     "select:part", str(marker), "d2prune", "select", str(config)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert wait_for(str(marker), proc, timeout=300), proc.communicate()[1][-2000:]
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            assert proc.returncode == -signal.SIGKILL
            assert not os.path.exists(join(workdir.stage_dir(cfg.workdir, "select"), "_SUCCESS.json"))
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(selection_bytes(cfg))
    assert outputs[0] == outputs[1]
    reasons = set(decisions_of(cfg)["reason"])
    assert {"exact_duplicate", "eval_duplicate"} <= reasons
