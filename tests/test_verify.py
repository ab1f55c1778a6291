"""A damaged committed file: every stage's commit records a manifest of the files it committed
(sizes, and the store's checksums where its listing has them); a later stage, or a rerun that skips
the stage, checks it and refuses a missing or resized file with exit 3 and one line naming the file
and the ``--force-from`` stage; ``d2prune verify CONFIG`` lists exactly the damaged files without
changing anything. Real files, a real job (the tiny model, a 3-shard pool), no mocks."""

from __future__ import annotations

import os
import shutil

import pytest

from pipeline.cli import main
from pipeline.errors import EXIT_OK, EXIT_STALE
from pipeline.formats import manifest
from pipeline.storage import Store, join
from pipeline.testing import write_pool

from tiny_job import write_config  # tests/tiny_job.py (tests/ is on sys.path)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def committed(tmp_path_factory, tiny_model_config, ray_local):
    """One whole job, committed, and a pristine copy of its workdir and output."""
    base = tmp_path_factory.mktemp("verify")
    pool = write_pool(str(base / "pool"), n_shards=3, per_shard=20, seed=3, broken=False)
    root = base / "job"
    config = write_config(root, pool.shards, tiny_model_config, graph={"k": 4, "index": "flat", "recall_sample": 0},
                          embed={"num_actors": 1})
    assert main(["run", config]) == 0
    for name in ("work", "out"):
        shutil.copytree(root / name, base / "pristine" / name)
    return {"root": root, "config": config, "pristine": base / "pristine"}


@pytest.fixture
def job(committed):
    """The committed job as it was, restored in place (the output names its workdir's path)."""
    root = committed["root"]
    for name in ("work", "out"):
        shutil.rmtree(root / name)
        shutil.copytree(committed["pristine"] / name, root / name)
    return committed


def _truncate(path, keep: int = 100) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(keep)


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("d2prune: error:")]


def _verify(config, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["verify", config])
    out = capsys.readouterr().out
    return code, [line for line in out.splitlines() if line.startswith("DAMAGED ")]


def test_every_commit_records_a_manifest_of_its_files(committed):
    store, work = Store(), str(committed["root"] / "work")
    for folder in ("embeddings", "graph", "selection", "write"):
        recorded = manifest.read(store, join(work, folder))
        assert recorded is not None, folder
        on_disk = {os.path.relpath(os.path.join(d, f), os.path.join(work, folder))
                   for d, _, files in os.walk(os.path.join(work, folder)) for f in files}
        inside = {p for p in recorded["paths"] if not p.startswith(manifest.OUTPUT)}
        assert inside == on_disk - {"_SUCCESS.json", "_MANIFEST.json"}, folder
        for path, size in zip(recorded["paths"], recorded["sizes"]):
            url = manifest.url_of(join(work, folder), str(committed["root"] / "out"), path)
            assert os.path.getsize(url) == size, path
    write = manifest.read(store, join(work, "write"))
    outside = [p for p in write["paths"] if p.startswith(manifest.OUTPUT)]
    assert {"@output/_PLAN.json", "@output/_stats.json", "@output/shards/00000.tar",
            "@output/shards/00000.parquet", "@output/shards/sizes.json"} <= set(outside)


def test_verify_an_intact_workdir_exits_0_and_writes_nothing(job, capsys):
    root = job["root"]
    before = {p: os.path.getmtime(p) for p in map(str, root.rglob("*"))}
    code, damaged = _verify(job["config"], capsys)
    assert (code, damaged) == (EXIT_OK, [])
    assert {p: os.path.getmtime(p) for p in map(str, root.rglob("*"))} == before


def test_truncated_embedding_part_is_named_with_force_from_embed(job, capsys):
    part = job["root"] / "work" / "embeddings" / "part-00001.parquet"
    _truncate(part)
    code, damaged = _verify(job["config"], capsys)
    assert code == EXIT_STALE
    assert len(damaged) == 1 and str(part) in damaged[0] and "--force-from embed" in damaged[0], damaged

    capsys.readouterr()
    assert main(["run", job["config"], "--force-from", "graph"]) == EXIT_STALE
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1, errors
    assert str(part) in errors[0] and "truncated: 100 bytes" in errors[0] and "--force-from embed" in errors[0]
    # refused before --force-from removed anything: the later stages are still committed
    assert (job["root"] / "work" / "graph" / "_SUCCESS.json").exists()

    assert main(["run", job["config"], "--force-from", "embed"]) == EXIT_OK  # the fix works
    assert _verify(job["config"], capsys) == (EXIT_OK, [])


def test_truncated_graph_part_refused_on_rerun_and_listed(job, capsys):
    part = job["root"] / "work" / "graph" / "part-00002.parquet"
    _truncate(part, 10)
    code, damaged = _verify(job["config"], capsys)
    assert code == EXIT_STALE and len(damaged) == 1 and str(part) in damaged[0]
    assert "--force-from graph" in damaged[0]
    capsys.readouterr()
    assert main(["run", job["config"]]) == EXIT_STALE  # every stage committed: the graph's own check
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and str(part) in errors[0] and "--force-from graph" in errors[0], errors


def test_truncated_output_shard_refused_then_listed_with_a_deleted_part(job, capsys):
    shard = job["root"] / "out" / "shards" / "00000.tar"
    _truncate(shard, 512)
    capsys.readouterr()
    assert main(["run", job["config"]]) == EXIT_STALE
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and str(shard) in errors[0] and "--force-from write" in errors[0], errors

    skipped = job["root"] / "work" / "embeddings" / "_skipped" / "part-00000.parquet"
    skipped.unlink()
    code, damaged = _verify(job["config"], capsys)
    assert code == EXIT_STALE and len(damaged) == 2, damaged
    assert any(str(shard) in d and "truncated: 512 bytes" in d and "--force-from write" in d for d in damaged)
    assert any(str(skipped) in d and "missing" in d and "--force-from embed" in d for d in damaged)


def test_deleted_output_shards_are_written_again(job, capsys):
    """Output shards deleted outright are what a committed write stage rewrites (as before)."""
    for path in (job["root"] / "out" / "shards").glob("00001*"):
        path.unlink()
    assert main(["run", job["config"]]) == EXIT_OK
    assert _verify(job["config"], capsys) == (EXIT_OK, [])


def test_same_size_damage_is_found_by_its_format_and_named_when_read(job, capsys):
    """A part overwritten in place with its size kept passes the size check: verify finds it by its
    format, and the stage that reads it names it (exit 3), not a bare ArrowInvalid."""
    part = job["root"] / "work" / "embeddings" / "part-00000.parquet"
    size = part.stat().st_size
    with open(part, "r+b") as fh:
        fh.seek(size - 64)
        fh.write(b"\xff" * 64)  # the footer and its magic bytes
    code, damaged = _verify(job["config"], capsys)
    assert code == EXIT_STALE and len(damaged) == 1 and str(part) in damaged[0], damaged
    capsys.readouterr()
    assert main(["run", job["config"], "--force-from", "graph"]) == EXIT_STALE
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and str(part) in errors[0] and "--force-from embed" in errors[0], errors


def test_workdir_committed_without_manifests_still_runs(job, capsys, caplog):
    for path in (job["root"] / "work").glob("*/_MANIFEST.json"):
        path.unlink()
    capsys.readouterr()
    assert main(["run", job["config"]]) == EXIT_OK
    assert "before manifests were recorded" in caplog.text
    assert _verify(job["config"], capsys) == (EXIT_OK, [])
    assert main(["run", job["config"], "--force-from", "select"]) == EXIT_OK  # reads embed and graph, unchecked
    assert manifest.read(Store(), str(job["root"] / "work" / "selection")) is not None  # recorded again


def test_s3_manifest_records_etags_and_verify_compares_them(s3_bucket, s3_store):
    """On S3 the listing carries each object's ETag: recorded for free, and a same-size overwrite
    is told apart by it."""
    directory = f"{s3_bucket}/manifest-etag/embeddings"
    s3_store.write_bytes(join(directory, "part-00000.parquet"), b"a" * 100)
    s3_store.write_bytes(join(directory, "_skipped/part-00000.parquet"), b"b" * 10)
    recorded = manifest.record(s3_store, directory, "embed", "f")
    assert recorded["paths"] == ["_skipped/part-00000.parquet", "part-00000.parquet"]
    assert recorded["sizes"] == [10, 100] and all(len(e) == 32 for e in recorded["etags"])
    assert manifest.check(s3_store, directory, recorded, etags=True) == []
    s3_store.write_bytes(join(directory, "part-00000.parquet"), b"c" * 100)
    assert manifest.check(s3_store, directory, recorded) == []  # sizes only: the run-time check
    found = manifest.check(s3_store, directory, recorded, etags=True)
    assert [(d.url, d.stage) for d in found] == [(join(directory, "part-00000.parquet"), "embed")]
    assert "content changed" in found[0].problem
