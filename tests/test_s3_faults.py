"""Flaky object storage, through a fault-injecting proxy in front of the moto S3 server
(tests/fault_proxy.py): 503 SlowDown, connection resets, short and empty reads are retried and the
job finishes byte-identical to a run without faults; a shard that stays unreadable is named, exit 1,
and nothing after it is committed (a rerun resumes byte-identical), unless input.allow_missing_shards
skips it; a read that comes back empty is never taken for damaged data."""

from __future__ import annotations

import pytest
import yaml

from fault_proxy import FaultProxy
from pipeline.cli import main
from pipeline.core.d2 import budget_for
from pipeline.errors import EXIT_CONFIG, EXIT_FAILED
from pipeline.storage import join
from pipeline.testing import write_pool

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proxy(s3_server):
    proxy = FaultProxy(s3_server).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def pool(s3_bucket, s3_store):
    return write_pool(f"{s3_bucket}/faults/pool", store=s3_store, n_shards=3, per_shard=20, seed=11, broken=True)


def _config(tmp_path, endpoint: str, name: str, pool, bucket: str, tiny_model_config: str, **input_extra) -> str:
    raw = {
        "workdir": f"{bucket}/faults/{name}/work",
        "storage": {"endpoint_url": endpoint, "read_attempts": 4, "retry_base_seconds": 0.05, "retry_max_seconds": 0.2},
        "input": {"shards": pool.shards, **input_extra},
        "embed": {"model": "d2prune-tiny", "model_config_path": tiny_model_config, "pretrained": None,
                  "batch_size": 16, "cpus_per_actor": 1, "torch_threads": 1},
        "graph": {"k": 4, "index": "flat", "recall_sample": 0},
        "select": {"prune_rate": 0.5},
        "output": {"url": f"{bucket}/faults/{name}/out", "samples_per_shard": 10},
        "ray": {"num_cpus": 2, "object_store_memory": 300_000_000},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _artefacts(store, raw_work: str, raw_out: str) -> dict[str, bytes]:
    """Every file the job commits that must not depend on how the reads went (stats hold timings)."""
    out = {}
    for base, pattern in ((raw_work, "embeddings/part-*.parquet"), (raw_work, "graph/part-*.parquet"),
                          (raw_work, "selection/*.parquet"), (raw_work, "selection/*.npy"),
                          (raw_out, "shards/*")):
        for url in store.glob(join(base, pattern)):
            out[url[len(base):]] = store.read_bytes(url)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, s3_server, s3_bucket, s3_store, pool, tiny_model_config, ray_local):
    """The job without any fault (straight to moto)."""
    tmp = tmp_path_factory.mktemp("faults")
    assert main(["run", _config(tmp, s3_server, "reference", pool, s3_bucket, tiny_model_config)]) == 0
    base = f"{s3_bucket}/faults/reference"
    return _artefacts(s3_store, f"{base}/work", f"{base}/out")


def test_transient_faults_are_retried_and_the_output_is_byte_identical(tmp_path, proxy, pool, reference, s3_bucket,
                                                                        s3_store, tiny_model_config, ray_local):
    """Over 60 s: a whole job through the faulting proxy, whose retries back off as S3 clients do
    (each injected slowdown and reset costs a real wait)."""
    proxy.clear()
    for shard, fault in zip(("00000.tar", "00001.tar", "00002.tar"), ("slowdown", "reset", "short")):
        proxy.add(fault, f"faults/pool/{shard}", times=2)
    proxy.add("empty", "faults/pool/", times=3)
    proxy.add("slowdown", "faults/flaky/work/embeddings/part-00001", method="PUT", times=1)
    assert main(["run", _config(tmp_path, proxy.url, "flaky", pool, s3_bucket, tiny_model_config)]) == 0
    for fault, times in (("slowdown", 3), ("reset", 2), ("short", 2), ("empty", 3)):
        assert proxy.fired(fault) == times, fault  # every fault really happened
    assert _artefacts(s3_store, f"{s3_bucket}/faults/flaky/work", f"{s3_bucket}/faults/flaky/out") == reference


def test_a_shard_that_stays_unreadable_is_named_and_nothing_past_it_commits(tmp_path, proxy, pool, reference,
                                                                           s3_bucket, s3_store, tiny_model_config,
                                                                           ray_local, capsys):
    """Every read of shard 1 after its up-front check comes back empty (200, no body): exit 1 naming
    it; shard 0 is committed, shard 1 is never committed as damaged data (a truncated_tar with 0
    samples), shard 2 waits; the rerun with a healthy store finishes byte-identical. Over 60 s:
    the failing run spends its retries with back-off before it names the shard, then a whole rerun."""
    proxy.clear()
    proxy.add("empty", "faults/pool/00001.tar", after=1, times=None)
    config = _config(tmp_path, proxy.url, "stuck", pool, s3_bucket, tiny_model_config)
    assert main(["run", config]) == EXIT_FAILED
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("d2prune: error: ShardReadError:") and f"{pool.shards[1]}: read failed" in line
    embeddings = f"{s3_bucket}/faults/stuck/work/embeddings"
    assert s3_store.ls(embeddings) == ["_FINGERPRINT.json", "_RESOLVED.json", "_skipped", "part-00000.parquet",
                                         "part-00000.stats.json"]
    assert s3_store.ls(f"{embeddings}/_skipped") == ["part-00000.parquet"]
    proxy.clear()
    assert main(["run", config]) == 0
    assert _artefacts(s3_store, f"{s3_bucket}/faults/stuck/work", f"{s3_bucket}/faults/stuck/out") == reference


def test_allow_missing_shards_skips_a_shard_that_stays_unreadable(tmp_path, proxy, pool, s3_bucket, s3_store,
                                                                  tiny_model_config, ray_local, capsys):
    """Over 60 s: a whole job whose third shard fails every read, each with its retries and back-off,
    before it is skipped."""
    proxy.clear()
    proxy.add("short", "faults/pool/00002.tar", after=1, times=None)
    config = _config(tmp_path, proxy.url, "skip", pool, s3_bucket, tiny_model_config, allow_missing_shards=True)
    assert main(["run", config]) == 0
    out = capsys.readouterr().out
    assert "missing    : 1 input shard(s) skipped" in out
    stats = s3_store.read_json(f"{s3_bucket}/faults/skip/work/embeddings/_stats.json")
    assert stats["shards_missing"] == 1 and stats["missing_shards"][0]["shard"] == pool.shards[2]
    assert stats["missing_shards"][0]["reason"].startswith("read failed")
    n = sum(len(k) for k in pool.kept[:2])
    assert stats["samples"] == n
    expected_skips = {}
    for counts in pool.skipped[:2]:
        for reason, count in counts.items():
            expected_skips[reason] = expected_skips.get(reason, 0) + count
    assert stats["skipped"] == dict(sorted(expected_skips.items()))
    written = s3_store.read_json(f"{s3_bucket}/faults/skip/out/_stats.json")
    assert written["samples_written"] == budget_for(n, 0.5) and written["integrity"].startswith("ok")


def test_an_empty_read_at_the_upfront_check_is_a_read_failure_not_a_bad_shard(tmp_path, proxy, pool, s3_bucket,
                                                                                 tiny_model_config, capsys):
    proxy.clear()
    proxy.add("empty", "faults/pool/00000.tar", times=None)
    config = _config(tmp_path, proxy.url, "precheck", pool, s3_bucket, tiny_model_config)
    code = main(["embed", config])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == EXIT_FAILED != EXIT_CONFIG  # a retry may help: not "not a tar archive" (exit 2)
    assert f"{pool.shards[0]}: unreadable: read failed at byte 0" in line
    proxy.clear()
