"""LAION / clip-retrieval embedding folders (img_emb/, text_emb/, metadata/, row-aligned) as a
metadata-only pool: the whole job with exact counts, and the broken layouts refused before any
work with one clear line naming the file (exit 2)."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet  # noqa: F401 - pa.parquet.write_table
import pytest

from pipeline.formats.datacomp import MetadataError
from pipeline.formats.selection import datacomp_subset
from pipeline.job import run_job
from pipeline.storage import Store, join

DIM = 12
ROWS = (25, 30)  # rows of metadata_0 and metadata_1


def write_laion_folder(root: str, seed: int = 0) -> dict:
    """`clip-retrieval inference`'s output layout with planted defects: a url repeated in the second
    file (the first row wins), a row with zero image vectors, a row without url; no score column
    (the score is the cosine of the vectors). Returns what a correct reader keeps."""
    rng = np.random.default_rng(seed)
    for sub in ("img_emb", "text_emb", "metadata"):
        os.makedirs(join(root, sub), exist_ok=True)
    rows = []
    for i, n in enumerate(ROWS):
        img = rng.normal(size=(n, DIM)).astype(np.float16)
        txt = (img.astype(np.float32) + rng.normal(scale=0.7, size=(n, DIM))).astype(np.float16)
        urls = [f"https://laion.example.org/{i}/{r}.jpg" for r in range(n)]
        if i == 1:
            urls[3] = rows[5]["url"]  # a repeated url
            urls[7] = None  # no id
            img[10] = 0  # unusable vectors
        np.save(join(root, "img_emb", f"img_emb_{i}.npy"), img)
        np.save(join(root, "text_emb", f"text_emb_{i}.npy"), txt)
        captions = [f"caption {i}-{r}" for r in range(n)]
        pa.parquet.write_table(pa.table({"url": urls, "caption": captions,
                                         "key": [f"{i:05d}{r:04d}" for r in range(n)]}),
                               join(root, "metadata", f"metadata_{i}.parquet"))
        for r in range(n):
            rows.append({"file": i, "row": r, "url": urls[r], "caption": captions[r], "img": img[r], "txt": txt[r]})
    return {"rows": rows, "kept": [r for r in rows if not (r["file"] == 1 and r["row"] in (3, 7, 10))]}


def _config(tmp_path, root, name="work"):
    import yaml

    raw = {
        "workdir": str(tmp_path / name),
        "embed": {"encoder": "precomputed", "precomputed": {"layout": "laion", "metadata": root, "part_rows": 20}},
        "graph": {"k": 3, "index": "flat", "recall_sample": 0},
        "select": {"method": "d2", "prune_rate": 0.6},
        "output": {"url": str(tmp_path / f"{name}_out")},
        "ray": {"num_cpus": 2, "object_store_memory": 300_000_000},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path), raw


def test_a_short_file_or_a_missing_text_file_fails_before_any_work(tmp_path):
    from pipeline.cli import main

    root = str(tmp_path / "laion")
    write_laion_folder(root)
    config, raw = _config(tmp_path, root)
    short = join(root, "img_emb", "img_emb_1.npy")
    np.save(short, np.load(short)[:-1])
    with pytest.raises(MetadataError, match=r"img_emb_1.npy has 29 rows, but .*metadata_1.parquet has 30"):
        run_job(config)
    assert main(["run", config]) == 2
    os.remove(join(root, "text_emb", "text_emb_1.npy"))
    with pytest.raises(MetadataError, match=r"text_emb/text_emb_1.npy \(for .*metadata_1.parquet\)"):
        run_job(config)
    assert not os.path.exists(raw["workdir"])  # refused before anything was written


@pytest.mark.slow
def test_laion_folder_through_the_whole_job(ray_local, tmp_path):
    store = Store()
    root = str(tmp_path / "laion")
    pool = write_laion_folder(root)
    config, raw = _config(tmp_path, root)
    run_job(config)
    work, out = raw["workdir"], raw["output"]["url"]
    embed = store.read_json(join(work, "embeddings", "_stats.json"))
    assert embed["metadata_rows"] == sum(ROWS)
    assert embed["skipped"] == {"bad_embedding": 1, "duplicate_uid": 1, "no_uid": 1}
    assert embed["samples"] == len(pool["kept"]) == sum(ROWS) - 3
    assert embed["score_column"] == "cosine of the image and text vectors" and embed["id_column"] == "url"

    # the uid is the md5 of the url (DataComp's own rule), the url comes back as `id`
    parts = sorted(n for n in store.ls(join(work, "embeddings")) if n.startswith("part-") and n.endswith(".parquet"))
    table = pa.concat_tables([store.read_parquet(join(work, "embeddings", n)) for n in parts])
    assert table.column("uid").to_pylist() == [hashlib.md5(r["url"].encode()).hexdigest() for r in pool["kept"]]
    assert table.column("key").to_pylist() == [str(r["row"]) for r in pool["kept"]]
    unit = lambda v: v.astype(np.float32) / np.linalg.norm(v.astype(np.float32))  # noqa: E731
    np.testing.assert_allclose(table.column("clip_score").to_numpy(),
                               [float(unit(r["img"]) @ unit(r["txt"])) for r in pool["kept"]], atol=2e-3)

    selected = store.read_parquet(join(work, "selection", "selected.parquet")).to_pydict()
    kept_uids = [u for u, s in zip(selected["uid"], selected["selected"]) if s]
    subset = np.load(io.BytesIO(store.read_bytes(join(work, "selection", "subset.npy"))))
    assert subset.tobytes() == datacomp_subset(kept_uids).tobytes()
    written = pa.concat_tables([store.read_parquet(join(out, "metadata", n))
                                for n in sorted(store.ls(join(out, "metadata")))])
    assert written.column_names[-1] == "id" and sorted(written.column("uid").to_pylist()) == sorted(kept_uids)
    for row in written.to_pylist():
        assert row["id"] == row["url"] and hashlib.md5(row["url"].encode()).hexdigest() == row["uid"]
    decisions = pa.concat_tables([store.read_parquet(join(work, "selection", "decisions.parquet", n))
                                  for n in sorted(store.ls(join(work, "selection", "decisions.parquet")))])
    assert decisions.num_rows == sum(ROWS)
