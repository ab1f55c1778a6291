"""``select.prefilter.exact_duplicates``: samples with the same image bytes keep the earliest, the
others leave the pool before β and the budget (reason ``exact_duplicate``, ``blame_uid`` = the kept
sample), found by hash buckets with no process holding the digests; the same for any number of
partitions and after a kill; the embed stage records each image member's sha256."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_select import ENGLISH, make_workdir, run_select_stage

from pipeline import workdir
from pipeline.core import d2
from pipeline.core.exact_duplicates import digest_words, first_of_groups
from pipeline.stage import Hooks
from pipeline.storage import join
from pipeline.testing import commit_stage

N = 600


def _digest(i: int) -> str:
    return hashlib.sha256(f"picture {i}".encode()).hexdigest()


def planted(n: int = N, seed: int = 3):
    """Digests of n nodes in 3 parts: every node its own picture, except 60 copies (in parts 1-2) of
    40 pictures of part 0 (groups of 2-3), and two nodes whose digest is unknown. Returns (digests,
    {copy node: the node it copies})."""
    rng = np.random.default_rng(seed)
    digests = [_digest(i) for i in range(n)]
    sources = rng.choice(n // 3, 40, replace=False)
    targets = rng.choice(np.arange(n // 3, n - 2), 60, replace=False)
    copies = {}
    for j, t in enumerate(targets.tolist()):
        s = int(sources[j % len(sources)])
        digests[t] = digests[s]
        copies[t] = s
    digests[n - 1] = digests[n - 2] = None  # unknown: never a duplicate (and not of each other)
    return digests, copies


def decisions_of(cfg):
    """The committed decisions.parquet, as columns."""
    return pq.read_table(join(workdir.stage_dir(cfg.workdir, "select"), "decisions.parquet")).to_pydict()


def selection_bytes(cfg) -> dict[str, bytes]:
    """The selection's committed outputs (selected.parquet, subset.npy, decisions), file by file."""
    sel = workdir.stage_dir(cfg.workdir, "select")
    names = ["selected.parquet", "subset.npy"] + [join("decisions.parquet", f) for f in
                                                  sorted(os.listdir(join(sel, "decisions.parquet")))]
    return {name: open(join(sel, name), "rb").read() for name in names}


def kill_select_after(cfg, store, *tasks: int) -> None:
    """Run the select stage once per number in `tasks`, stopping it (an exception from its hook, in
    the driver) right after that many of its tasks finished."""
    from pipeline.job import run_one

    for after in tasks:
        def kill(stage, index, after=after):
            if stage == "select" and index == after:
                raise KeyboardInterrupt(f"killed after task {after}")

        with pytest.raises(KeyboardInterrupt):
            run_one(cfg, store, "select", Hooks(part_committed=kill))


# -- the pure core ----------------------------------------------------------------------------------

def test_groups_keep_their_earliest_node_whatever_the_row_order():
    digests = [_digest(i % 3) for i in range(7)] + [None, "not hex", _digest(9)[:-1]]
    words, valid = digest_words(digests)
    assert valid.tolist() == [True] * 7 + [False] * 3
    nodes = np.array([50, 10, 20, 0, 40, 30, 60])  # node order is not row order
    rows, kept = first_of_groups(words[:7], nodes)
    # digest 0: rows 0, 3, 6 (nodes 50, 0, 60) keep row 3; digest 1: rows 1, 4 keep row 1; digest 2: rows 2, 5 keep 2
    assert dict(zip(rows.tolist(), kept.tolist())) == {0: 3, 6: 3, 4: 1, 5: 2}
    assert nodes[rows].tolist() == sorted(nodes[rows].tolist())


# -- the select stage ---------------------------------------------------------------------------------

def test_exact_copies_leave_the_pool_naming_the_kept_sample(tmp_path):
    digests, copies = planted()
    cfg, store, a = make_workdir(tmp_path, select={"partitions": 1, "beta": 0.1,
                                                   "prefilter": {"exact_duplicates": True}},
                                 filter_columns={"sha256s": digests})
    stats = run_select_stage(cfg, store)
    assert stats["exact_duplicates"] == {"dropped": 60, "sha256_unknown": 2}
    assert stats["candidates"] == N - 60 and stats["budget"] == d2.budget_for(N - 60, 0.7)
    assert stats["prefiltered_beta"] == round(0.1 * (N - 60))
    dec = decisions_of(cfg)
    uids = a["uids"]
    got = {u: b for u, r, b in zip(dec["uid"], dec["reason"], dec["blame_uid"]) if r == "exact_duplicate"}
    assert got == {uids[t]: uids[s] for t, s in copies.items()}
    # the exact-duplicate rows are pre-filtered, not candidates: β and the budget see the others
    survivors = np.array(sorted(set(range(N)) - set(copies)))
    kept = survivors[d2.prefilter_mask(a["scores"][survivors], 0.1)]
    graph = d2.symmetrize_knn(a["neighbors"], a["sq"])
    shifted, _ = d2.shift_nonnegative(a["scores"][kept], None)
    top = d2.d2_select(d2.subgraph(graph, kept), shifted, stats["budget"], 1.0, 1.0, 1)
    selected = pq.read_table(join(workdir.stage_dir(cfg.workdir, "select"), "selected.parquet")).column("uid")
    assert selected.to_pylist() == np.array(uids)[kept[top.order]].tolist()
    # the nodes files say which pre-filter dropped each node
    nodes = pq.read_table(join(workdir.stage_dir(cfg.workdir, "select"), "nodes")).to_pydict()
    label = dict(zip(nodes["node"], nodes["prefilter"]))
    assert {i for i in range(N) if label[i] == "exact_duplicate"} == set(copies)


def test_basic_filter_runs_first_and_the_earliest_passing_copy_stays(tmp_path):
    digests, copies = planted()
    groups: dict[int, list[int]] = {}
    for t, s in copies.items():
        groups.setdefault(s, [s]).append(t)
    source, members = next((s, sorted(m)) for s, m in groups.items() if len(m) == 3)
    captions = [ENGLISH[i % len(ENGLISH)] for i in range(N)]
    captions[source] = "x"  # fails the basic filter: its copies are judged among themselves
    cfg, store, a = make_workdir(tmp_path, select={"partitions": 1,
                                                   "prefilter": {"basic": True, "exact_duplicates": True}},
                                 filter_columns={"sha256s": digests, "captions": captions, "widths": [640] * N,
                                                 "heights": [480] * N})
    stats = run_select_stage(cfg, store)
    dec = decisions_of(cfg)
    reason = dict(zip(dec["uid"], dec["reason"]))
    blame = dict(zip(dec["uid"], dec["blame_uid"]))
    uids = a["uids"]
    first, second = members[1], members[2]
    assert reason[uids[source]] == "caption_too_few_words"
    assert reason[uids[first]] != "exact_duplicate"  # the earliest copy the basic filter keeps stays
    assert reason[uids[second]] == "exact_duplicate" and blame[uids[second]] == uids[first]
    assert stats["exact_duplicates"]["dropped"] == 59
    assert stats["basic_filter"]["dropped"] == 1 and stats["candidates"] == N - 60


def test_partitions_one_and_eight_write_the_same_selection(tmp_path):
    digests, _ = planted()
    outputs = []
    for p in (1, 8):
        cfg, store, _ = make_workdir(tmp_path / f"p{p}", select={"partitions": p, "beta": 0.1,
                                                                 "prefilter": {"exact_duplicates": True}},
                                     filter_columns={"sha256s": digests})
        stats = run_select_stage(cfg, store)
        assert stats["partitions"] == p
        outputs.append(selection_bytes(cfg))
    assert outputs[0] == outputs[1]


def test_a_killed_stage_resumes_to_the_same_bytes(tmp_path):
    digests, _ = planted()
    select = {"partitions": 4, "prefilter": {"exact_duplicates": True}}
    ref, store, _ = make_workdir(tmp_path / "ref", select=select, filter_columns={"sha256s": digests})
    run_select_stage(ref, store)
    reference = selection_bytes(ref)

    cfg, store, _ = make_workdir(tmp_path / "killed", select=select, filter_columns={"sha256s": digests})
    kill_select_after(cfg, store, 2, 6, 11)  # three kills, each further into the stage
    run_select_stage(cfg, store)
    assert selection_bytes(cfg) == reference


def test_parts_without_sha256_name_the_part_and_the_fix(tmp_path):
    cfg, store, _ = make_workdir(tmp_path, select={"partitions": 1, "prefilter": {"exact_duplicates": True}})
    part = join(workdir.stage_dir(cfg.workdir, "embed"), "part-00001.parquet")
    table = pq.read_table(part)
    pq.write_table(table.drop_columns(["sha256"]), part)  # as the embed stage wrote parts before the column
    commit_stage(store, cfg, "embed", {"samples": N, "skipped": {}})  # its manifest as then
    with pytest.raises(ValueError, match=r"part-00001\.parquet has no column 'sha256'.*--force-from embed"):
        run_select_stage(cfg, store)


def test_bad_digests_are_an_error_naming_the_part_and_a_count(tmp_path):
    digests, _ = planted()
    digests[250] = digests[251] = "g" * 64
    cfg, store, _ = make_workdir(tmp_path, select={"partitions": 1, "prefilter": {"exact_duplicates": True}},
                                 filter_columns={"sha256s": digests})
    with pytest.raises(ValueError, match=r"part-00001\.parquet: 2 sha256 values are not 64 hex digits"):
        run_select_stage(cfg, store)


def test_the_select_settings_without_the_new_pre_filters_are_those_of_before():
    from pipeline.select.stage import settings
    from pipeline.testing import make_config

    cfg = make_config("/tmp/w", ["a.tar"])
    assert settings(cfg)["select"]["prefilter"] == {"basic": False}  # as before the new pre-filters existed
    on = make_config("/tmp/w", ["a.tar"], overrides=["select.prefilter.exact_duplicates=true"])
    assert settings(on)["select"]["prefilter"] == {"basic": False, "exact_duplicates": True}


# -- the embed stage's sha256, on a real pool ---------------------------------------------------------

@pytest.mark.slow
def test_embedded_pool_with_planted_copies_across_shards(tmp_path, ray_local):
    from pipeline.demo.contamination import ContaminationSpec, generate
    from pipeline.formats.webdataset import iter_shard_samples
    from pipeline.job import run_one
    from pipeline.storage import Store, expand_urls
    from pipeline.testing import make_config

    manifest = generate(str(tmp_path / "data"), ContaminationSpec(n_pool=60, n_eval=8, exact_copies=6,
                                                                  samples_per_shard=20, seed=11))
    cfg = make_config(str(tmp_path / "work"), manifest["pool"],
                      select={"prune_rate": 0.5, "partitions": 1, "prefilter": {"exact_duplicates": True}})
    store = Store()
    for stage in ("embed", "graph", "select"):
        run_one(cfg, store, stage)
    # each part's sha256 is that of the image member's bytes, read back from the shards
    from pipeline.formats.embeddings import list_parts

    listed, _ = list_parts(store, workdir.stage_dir(cfg.workdir, "embed"))
    parts = pa.concat_tables([store.read_parquet(p.url, columns=["uid", "sha256"]) for p in listed]).to_pydict()
    truth_bytes = {s.uid: hashlib.sha256(s.image_bytes).hexdigest()
                   for url in expand_urls(manifest["pool"]) for s in iter_shard_samples(store, url, cfg.input)}
    assert dict(zip(parts["uid"], parts["sha256"])) == truth_bytes
    truth = pq.read_table(manifest["ground_truth"]).to_pydict()
    planted_copies = {u: c for u, c in zip(truth["uid"], truth["copy_of"]) if c}
    assert len(planted_copies) == 6 and len({truth["shard"][truth["uid"].index(u)] for u in planted_copies}) > 1
    dec = decisions_of(cfg)
    found = {u: b for u, r, b in zip(dec["uid"], dec["reason"], dec["blame_uid"]) if r == "exact_duplicate"}
    assert found == planted_copies
