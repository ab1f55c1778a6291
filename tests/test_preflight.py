"""Configs that cannot work fail with one line naming the field, exit 2, before any work and before
anything is written: overlapping locations, missing buckets, a pool too small for k or the budget,
unreadable checkpoints, --set typos; and every error keeps the names it lists on its one line."""

from __future__ import annotations

import io
import os
import zipfile

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import ConfigError, config_from_dict
from pipeline.errors import EXIT_CONFIG, one_line
from pipeline.formats.webdataset import ShardReadError
from pipeline.storage import Store
from pipeline.testing import commit_stage


def _write(tmp_path, raw, name="job.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _raw(tmp_path, pool, **extra):
    raw = {"workdir": str(tmp_path / "work"), "input": {"shards": pool.shards},
           "output": {"url": str(tmp_path / "out")}, "embed": {"torch_threads": 1}}
    raw.update(extra)
    return raw


def _last_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("d2prune: error:")
    return lines[-1]


def _nothing_written(tmp_path):
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("output,needle", [
    ("{work}/embeddings", "workdir ({work}) contains output.url ({work}/embeddings)"),
    ("{work}", "workdir ({work}) is the same location as output.url"),
    ("{pool}", "output.url ({pool}) is the same location as input.shards"),
    ("{parent}", "output.url ({parent}) contains input.shards"),
])
def test_overlapping_locations_refused_at_load(tmp_path, small_pool, capsys, output, needle):
    pool = os.path.dirname(small_pool.shards[0])
    places = {"work": str(tmp_path / "work"), "pool": pool, "parent": os.path.dirname(pool)}
    config = _write(tmp_path, _raw(tmp_path, small_pool, output={"url": output.format(**places)}))
    assert main(["run", config]) == EXIT_CONFIG
    line = _last_error_line(capsys)
    assert needle.format(**places) in line and ":;" not in line
    assert not (tmp_path / "work").exists()


def test_missing_buckets_named_before_any_write(tmp_path, small_pool, s3_server, s3_bucket, capsys):
    raw = _raw(tmp_path, small_pool, workdir="s3://no-such-work-bucket/w", storage={"endpoint_url": s3_server},
               output={"url": "s3://no-such-out-bucket/o"})
    raw["input"]["shards"] = [f"s3://no-such-pool-bucket/p/{{00000..00001}}.tar"]
    assert main(["run", _write(tmp_path, raw)]) == EXIT_CONFIG
    line = _last_error_line(capsys)
    for field, bucket in (("workdir", "no-such-work-bucket"), ("output.url", "no-such-out-bucket"),
                          ("input.shards", "no-such-pool-bucket")):
        assert f"{field} s3://{bucket}" in line and f"bucket '{bucket}' does not exist" in line
    assert Store(config_from_dict(raw).storage).location_problem(f"{s3_bucket}/w", writable=True) is None


def test_local_workdir_under_a_file_refused(tmp_path, small_pool, capsys):
    (tmp_path / "afile").write_text("x")
    config = _write(tmp_path, _raw(tmp_path, small_pool, workdir=str(tmp_path / "afile" / "work")))
    assert main(["run", config]) == EXIT_CONFIG
    line = _last_error_line(capsys)
    assert f"workdir {tmp_path / 'afile' / 'work'}: {tmp_path / 'afile'} is a file" in line


def test_missing_shard_refused_before_any_write(tmp_path, small_pool, capsys):
    raw = _raw(tmp_path, small_pool)
    raw["input"]["shards"] = small_pool.shards + [str(tmp_path / "gone.tar")]
    assert main(["run", _write(tmp_path, raw)]) == EXIT_CONFIG
    line = _last_error_line(capsys)
    assert f"{tmp_path / 'gone.tar'}: not found" in line and "input.allow_missing_shards" in line
    _nothing_written(tmp_path)


def test_rules_that_need_the_pool_size_fail_before_the_stage_writes(tmp_path, small_pool, capsys):
    """k >= N, a budget of 0, nlist > N: checked as soon as the embed stage has committed N, before
    the graph (or select) stage writes anything."""
    raw = _raw(tmp_path, small_pool, graph={"k": 5})
    config = _write(tmp_path, raw)
    cfg = config_from_dict(raw)
    commit_stage(Store(), cfg, "embed", {"samples": 5, "skipped": {"missing_image": 3}})
    assert main(["graph", config]) == EXIT_CONFIG
    assert "graph.k=5 needs more than k samples; the pool has N=5" in _last_error_line(capsys)
    assert main(["run", config, "--set", "graph.k=2", "--set", "select.prune_rate=0.95"]) == EXIT_CONFIG
    assert "select.prune_rate=0.95 keeps round((1-p)*N) = 0 of the N=5 samples" in _last_error_line(capsys)
    assert main(["run", config, "--set", "graph.k=2", "--set", "graph.index=ivfflat", "--set", "graph.nlist=8",
                 "--set", "graph.nprobe=8"]) == EXIT_CONFIG
    assert "graph.nlist=8 exceeds the 5 vectors to index" in _last_error_line(capsys)
    assert sorted(os.listdir(tmp_path / "work")) == ["_LEASE.lock", "embeddings"]  # no graph, no selection


def test_a_pool_with_no_usable_sample_says_so(tmp_path, small_pool, capsys):
    raw = _raw(tmp_path, small_pool)
    cfg = config_from_dict(raw)
    commit_stage(Store(), cfg, "embed", {"samples": 0, "skipped": {"missing_caption": 7}})
    assert main(["run", _write(tmp_path, raw)]) == EXIT_CONFIG
    assert "kept no samples" in (line := _last_error_line(capsys)) and "missing_caption=7" in line


@pytest.mark.parametrize("raw_extra,needle", [
    ({"select": {"prune_rate": 1.0}}, "select.prune_rate=1.0 drops every sample"),
    ({"graph": {"index": "ivfflat", "nlist": 4, "nprobe": 16}}, "graph.nprobe=16 exceeds graph.nlist=4"),
    ({"graph": {"index": "ivfflat", "nlist": 4000, "train_size": 1000}},
     "graph.train_size=1000 cannot place graph.nlist=4000 centroids"),
    ({"graph": {"index": "ivfpq"}}, "graph.index 'ivfpq' was removed"),
])
def test_configs_that_run_to_no_purpose_fail_at_load(tmp_path, small_pool, capsys, raw_extra, needle):
    assert main(["run", _write(tmp_path, _raw(tmp_path, small_pool, **raw_extra))]) == EXIT_CONFIG
    assert needle in _last_error_line(capsys)
    _nothing_written(tmp_path)


def test_set_typos_are_reported_as_set_not_as_the_yaml(tmp_path, small_pool, capsys):
    config = _write(tmp_path, _raw(tmp_path, small_pool))
    assert main(["run", config, "--set", "select.prune_rat=0.5", "--set", "graph.k=0"]) == EXIT_CONFIG
    line = _last_error_line(capsys)
    assert f"invalid config {config}: " in line and ":;" not in line
    assert "unknown key 'select.prune_rat' (from --set select.prune_rat=0.5)" in line
    assert "graph.k: Input should be greater than 0 (from --set graph.k=0)" in line


def _torch_checkpoint(path):
    import torch

    torch.save({"w": torch.zeros(64)}, path)
    return path.read_bytes()


@pytest.mark.parametrize("damage,needle", [
    ("truncated", "truncated or corrupt"),
    ("html", "neither a torch zip"),
    ("safetensors", "truncated"),
])
def test_unreadable_checkpoint_named_before_any_work(tmp_path, small_pool, tiny_model_config, capsys, damage, needle):
    whole = _torch_checkpoint(tmp_path / "ok.pt")
    if damage == "truncated":
        path, data = tmp_path / "model.pt", whole[: len(whole) // 2]
    elif damage == "html":
        path, data = tmp_path / "model.pt", b"<html><body>403 Forbidden</body></html>"
    else:
        import json
        import struct

        header = json.dumps({"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}).encode()
        path, data = tmp_path / "model.safetensors", struct.pack("<Q", len(header)) + header + b"\0" * 100
    path.write_bytes(data)
    raw = _raw(tmp_path, small_pool, embed={"model": "d2prune-tiny", "model_config_path": tiny_model_config,
                                           "pretrained": str(path), "torch_threads": 1})
    assert main(["embed", _write(tmp_path, raw)]) == EXIT_CONFIG
    line = _last_error_line(capsys)
    assert f"embed.pretrained {path}: not a readable checkpoint" in line and needle in line
    _nothing_written(tmp_path)
    with zipfile.ZipFile(io.BytesIO(whole)):  # the whole file is a zip checkpoint: accepted
        from pipeline.embed.model import checkpoint_problem

        assert checkpoint_problem(Store(), str(tmp_path / "ok.pt")) is None


def test_stale_stage_message_names_a_command_that_accepts_the_flag(tmp_path, small_pool, capsys):
    raw = _raw(tmp_path, small_pool)
    commit_stage(Store(), config_from_dict(raw), "embed", {"samples": 100})
    assert main(["select", _write(tmp_path, raw), "--set", "input.caption_ext=caption"]) == 3
    assert "rerun `d2prune run` with --force-from embed" in _last_error_line(capsys)


def test_one_line_keeps_the_listing_of_shards():
    err = ShardReadError("2 input shard(s) could not be read:\n  s3://b/p/00001.tar: not found\n"
                         "  s3://b/p/00007.tar: read failed at byte 0")
    assert one_line(err) == ("ShardReadError: 2 input shard(s) could not be read: s3://b/p/00001.tar: not found; "
                             "s3://b/p/00007.tar: read failed at byte 0")
    assert one_line(ConfigError("invalid config x.yaml:\n  graph.k: bad\n  unknown key 'y'")) == \
        "invalid config x.yaml: graph.k: bad; unknown key 'y'"


@pytest.mark.slow
def test_checkpoint_of_another_architecture_is_a_config_error(tmp_path, small_pool, tiny_model_config, ray_local,
                                                              capsys):
    import copy

    from pipeline.testing import TINY_MODEL_CONFIG, save_random_checkpoint

    other = copy.deepcopy(TINY_MODEL_CONFIG)
    other["embed_dim"] = 16
    checkpoint = save_random_checkpoint(str(tmp_path / "other.pt"), model_name="d2prune-other", config=other)
    raw = _raw(tmp_path, small_pool, embed={"model": "d2prune-tiny", "model_config_path": tiny_model_config,
                                           "pretrained": checkpoint, "torch_threads": 1, "batch_size": 8},
               ray={"num_cpus": 2, "object_store_memory": 200_000_000})
    raw["input"]["shards"] = small_pool.shards[:1]
    assert main(["embed", _write(tmp_path, raw)]) == EXIT_CONFIG  # not exit 1: no rerun can fix it
    line = _last_error_line(capsys)
    assert f"embed.pretrained {checkpoint} does not fit embed.model d2prune-tiny: size mismatch for" in line
    assert not list((tmp_path / "work" / "embeddings").glob("part-*"))


def test_allow_missing_shards_is_refused_with_the_precomputed_encoder():
    raw = {"workdir": "/tmp/w", "input": {"shards": "/tmp/p/{00000..00001}.tar", "allow_missing_shards": True},
           "output": {"url": "/tmp/o"}, "embed": {"encoder": "precomputed", "precomputed": {"metadata": "/tmp/m/x.parquet"}}}
    with pytest.raises(ConfigError, match="input.allow_missing_shards is supported with embed.encoder 'open_clip' only"):
        config_from_dict(raw)
