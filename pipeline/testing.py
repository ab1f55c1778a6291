"""Small, real test and demo data: WebDataset pools with deliberately broken samples, a tiny
open_clip architecture, random-weight checkpoints, DataComp-style precomputed embeddings, configs.

Everything here is deterministic for a seed. The generators *know* what they broke, so each
returns a manifest of what a correct reader must keep and skip; tests compare the pipeline's
output with that manifest (computed from the construction, never from running the pipeline).

Importable by every test module and by the benchmarks; no pytest dependency. Tar files are
written with the pipeline's own deterministic writer (:class:`pipeline.formats.tar.TarWriter`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import JobConfig, config_from_dict
from .formats.tar import BLOCK, TarWriter
from .formats.webdataset import (
    BAD_METADATA,
    DUPLICATE_UID,
    MISSING_CAPTION,
    MISSING_IMAGE,
    TRUNCATED_TAR,
    UNDECODABLE_IMAGE,
    fallback_uid,
)
from .storage import Store, join

# -- a tiny open_clip architecture ----------------------------------------------------------------

TINY_MODEL_NAME = "d2prune-tiny"
# Same schema as open_clip's model_configs/*.json; vocab_size must stay 49408 (the default
# SimpleTokenizer). ~0.4M parameters: a forward costs microseconds, so tests measure the pipeline.
TINY_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_model_config(path: str, config: dict[str, Any] | None = None, store: Store | None = None) -> str:
    """Write an open_clip model config JSON (for ``embed.model_config_path``); returns the path."""
    (store or Store()).write_json(path, config or TINY_MODEL_CONFIG)
    return path


def tiny_model_config_path() -> str:
    """A local file holding TINY_MODEL_CONFIG (content-addressed, so concurrent writers agree)."""
    blob = json.dumps(TINY_MODEL_CONFIG, sort_keys=True).encode()
    path = os.path.join(tempfile.gettempdir(), f"d2prune-tiny-{hashlib.sha1(blob).hexdigest()[:10]}.json")
    if not os.path.exists(path):
        write_model_config(path)
    return path


def save_random_checkpoint(path: str, model_name: str = TINY_MODEL_NAME,
                           config: dict[str, Any] | None = TINY_MODEL_CONFIG, seed: int = 1234) -> str:
    """Build `model_name` with seeded random weights and save its state dict (a user-style
    checkpoint file, loaded by the pipeline through open_clip's ``pretrained=<path>``)."""
    import open_clip
    import torch

    from .embed.model import register_model_config

    if config is not None:
        register_model_config(model_name, config)
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


# -- WebDataset pools -----------------------------------------------------------------------------

def render_image(rng: np.random.Generator, size: int) -> tuple[Any, str]:
    """A procedural picture and the caption that describes it: the demo's scene generator
    (:mod:`pipeline.demo.scenes`, one picture generator for the demo and the tests) at `size` pixels."""
    from .demo import scenes

    scene = scenes.sample_scene(rng)
    return scenes.render(scene, size), scenes.caption(scene)


def encode_image(image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        image.save(buf, format="JPEG", quality=90)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class PoolManifest:
    """What a correct reader of a generated pool keeps and skips, shard by shard."""

    shards: list[str]
    kept: list[list[dict[str, str]]]  # per shard, in tar order: {"uid", "key", "caption"}
    skipped: list[dict[str, int]]  # per shard: reason -> count
    truncated_shards: list[int] = field(default_factory=list)

    @property
    def kept_uids(self) -> list[str]:
        return [s["uid"] for shard in self.kept for s in shard]

    @property
    def n_kept(self) -> int:
        return sum(len(k) for k in self.kept)

    @property
    def skipped_total(self) -> dict[str, int]:
        total: Counter = Counter()
        for counts in self.skipped:
            total.update(counts)
        return dict(total)

    def to_json(self) -> dict[str, Any]:
        return {"shards": self.shards, "kept": self.kept, "skipped": self.skipped,
                "truncated_shards": self.truncated_shards}


def _sample_uid(seed: int, shard: int, pos: int) -> str:
    return hashlib.md5(f"d2prune-pool/{seed}/{shard}/{pos}".encode()).hexdigest()


def _breakage(shard: int, pos: int) -> str | None:
    """Which deliberate defect sample `pos` of `shard` gets in a broken pool (None = healthy).
    ``cross_dup`` reuses the uid of sample 5 of the previous shard; ``dup`` reuses sample 0's uid;
    ``no_json`` has no json member (its uid is the md5 fallback) and is healthy."""
    if pos == 1:
        return UNDECODABLE_IMAGE
    if pos == 2:
        return MISSING_CAPTION
    if pos == 3:
        return "dup"
    if pos == 4 and shard > 0:
        return "cross_dup"
    if pos == 6:
        return "no_json"
    if pos == 7 and shard % 2 == 0:
        return BAD_METADATA
    if pos == 8 and shard % 2 == 1:
        return MISSING_IMAGE
    if pos == 9 and shard == 0:
        return "empty_caption"
    return None


def write_pool(dest_dir: str, store: Store | None = None, n_shards: int = 4, per_shard: int = 40,
               seed: int = 0, broken: bool = True, image_size: int = 48, truncate_last: bool | None = None,
               formats: tuple[str, ...] = ("jpg", "png")) -> PoolManifest:
    """Write `n_shards` WebDataset tars ``{dest_dir}/{00000..}.tar`` of `per_shard` samples each
    (``jpg``/``png`` + ``txt`` + ``json`` with ``uid``, img2dataset layout) and return the manifest.

    With ``broken`` every shard carries deliberate defects (see :func:`_breakage`): an
    undecodable image, a missing and an empty caption, a bad json, a sample without image, a
    within-shard and a cross-shard duplicate uid, a sample without json; and (``truncate_last``,
    default = ``broken``) the last shard is cut in the middle of an image three samples from its
    end.
    """
    store = store or Store()
    if truncate_last is None:
        truncate_last = broken
    if broken and per_shard < 12:
        raise ValueError("a broken pool needs per_shard >= 12 (defects sit at fixed positions)")
    rng = np.random.default_rng(seed)
    store.makedirs(dest_dir)
    urls, kept, skipped, truncated = [], [], [], []
    seen: set[str] = set()
    for shard in range(n_shards):
        url = join(dest_dir, f"{shard:05d}.tar")
        buf = io.BytesIO()
        cut_pos = per_shard - 3 if (truncate_last and shard == n_shards - 1) else None
        cut_offset = None
        shard_kept: list[dict[str, str]] = []
        shard_skipped: Counter = Counter()
        with TarWriter(buf) as tf:
            for pos in range(per_shard):
                key = f"{shard:05d}{pos:04d}"
                image, caption = render_image(rng, image_size)
                fmt = formats[pos % len(formats)]
                defect = _breakage(shard, pos) if broken else None
                uid = _sample_uid(seed, shard, pos)
                if defect == "dup":
                    uid = _sample_uid(seed, shard, 0)
                elif defect == "cross_dup":
                    uid = _sample_uid(seed, shard - 1, 5)
                image_bytes = encode_image(image, fmt)
                if defect == UNDECODABLE_IMAGE:
                    fmt = "jpg"
                    image_bytes = b"\xff\xd8\xff\xe0 this is not a jpeg " + rng.bytes(64)
                members: list[tuple[str, bytes]] = []
                if defect != MISSING_IMAGE:
                    members.append((fmt, image_bytes))
                if defect == "empty_caption":
                    members.append(("txt", b"   \n"))
                elif defect != MISSING_CAPTION:
                    members.append(("txt", caption.encode()))
                if defect == BAD_METADATA:
                    members.append(("json", b'{"uid": "truncated json'))
                elif defect != "no_json":
                    members.append(("json", json.dumps({"uid": uid, "key": key, "caption": caption}).encode()))
                else:
                    uid = fallback_uid(url, key)
                for ext, data in members:
                    offset = tf.add(f"{key}.{ext}", data)
                    if pos == cut_pos and cut_offset is None:
                        # cut in the middle of this sample's first member's data
                        cut_offset = offset + BLOCK + len(data) // 2
                if cut_pos is not None and pos >= cut_pos:
                    continue  # lost to the truncation: not counted (unreadable), see shards.py
                reason = {UNDECODABLE_IMAGE: UNDECODABLE_IMAGE, MISSING_CAPTION: MISSING_CAPTION,
                          "empty_caption": MISSING_CAPTION, BAD_METADATA: BAD_METADATA,
                          MISSING_IMAGE: MISSING_IMAGE}.get(defect or "")
                if reason is None and uid in seen:
                    reason = DUPLICATE_UID
                if reason is None:
                    seen.add(uid)
                    shard_kept.append({"uid": uid, "key": key, "caption": caption})
                else:
                    shard_skipped[reason] += 1
        data = buf.getvalue()
        if cut_offset is not None:
            data = data[:cut_offset]
            shard_skipped[TRUNCATED_TAR] += 1
            truncated.append(shard)
        store.write_bytes(url, data)
        urls.append(url)
        kept.append(shard_kept)
        skipped.append(dict(shard_skipped))
    return PoolManifest(shards=urls, kept=kept, skipped=skipped, truncated_shards=truncated)


# -- DataComp-style precomputed embeddings ---------------------------------------------------------

@dataclass
class PrecomputedManifest:
    metadata: list[str]
    embeddings: list[str]
    kept_uids: list[list[str]]
    skipped: list[dict[str, int]]
    image: list[np.ndarray]  # per file, the raw (unnormalised) arrays as written
    text: list[np.ndarray]
    scores: list[np.ndarray]


def write_precomputed(dest_dir: str, store: Store | None = None, n_files: int = 3, per_file: int = 20,
                      dim: int = 16, seed: int = 0, duplicate: bool = True) -> PrecomputedManifest:
    """DataComp layout: ``{i:08d}.parquet`` (uid, key, clip_l14_similarity_score, text) next to
    ``{i:08d}.npz`` (``l14_img``, ``l14_txt`` float16, rows aligned with the parquet). With
    ``duplicate`` the second file's row 2 repeats a uid of the first file."""
    import pyarrow as pa

    store = store or Store()
    rng = np.random.default_rng(seed)
    metas, npzs, kept, skipped, imgs, txts, scores = [], [], [], [], [], [], []
    seen: set[str] = set()
    for i in range(n_files):
        uids = [_sample_uid(seed + 1000, i, j) for j in range(per_file)]
        if duplicate and i == 1:
            uids[2] = _sample_uid(seed + 1000, 0, 4)
        img = rng.normal(size=(per_file, dim)).astype(np.float16)
        txt = rng.normal(size=(per_file, dim)).astype(np.float16)
        a = img.astype(np.float32) / np.linalg.norm(img.astype(np.float32), axis=1, keepdims=True)
        b = txt.astype(np.float32) / np.linalg.norm(txt.astype(np.float32), axis=1, keepdims=True)
        score = (a * b).sum(axis=1).astype(np.float64)
        table = pa.table({
            "uid": uids,
            "key": [f"{i:05d}{j:04d}" for j in range(per_file)],
            "text": [f"caption {j}" for j in range(per_file)],
            "clip_l14_similarity_score": score,
        })
        meta_url = join(dest_dir, f"{i:08d}.parquet")
        npz_url = join(dest_dir, f"{i:08d}.npz")
        store.write_parquet(meta_url, table)
        buf = io.BytesIO()
        np.savez(buf, l14_img=img, l14_txt=txt)
        store.write_bytes(npz_url, buf.getvalue())
        file_kept, counts = [], Counter()
        for uid in uids:
            if uid in seen:
                counts[DUPLICATE_UID] += 1
            else:
                seen.add(uid)
                file_kept.append(uid)
        metas.append(meta_url)
        npzs.append(npz_url)
        kept.append(file_kept)
        skipped.append(dict(counts))
        imgs.append(img)
        txts.append(txt)
        scores.append(score)
    return PrecomputedManifest(metas, npzs, kept, skipped, imgs, txts, scores)


# -- configs and object storage ------------------------------------------------------------------

def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def make_config(workdir: str, shards: str | list[str], output: str | None = None,
                overrides: list[str] | None = None, **sections: Any) -> JobConfig:
    """A valid JobConfig for a test pool: the tiny open_clip model with random weights, small
    batches, one CPU actor with one torch thread, a Ray sized for CI. `sections` are nested dicts
    merged over those defaults (``embed={"batch_size": 8}``, ``storage={"endpoint_url": ...}``);
    `overrides` are ``section.key=value`` strings as on the command line."""
    raw: dict[str, Any] = {
        "workdir": workdir,
        "input": {"shards": shards},
        "output": {"url": output or workdir.rstrip("/") + "_out"},
        "embed": {
            "model": TINY_MODEL_NAME,
            "model_config_path": tiny_model_config_path(),
            "pretrained": None,
            "batch_size": 16,
            "num_actors": 1,
            "cpus_per_actor": 1,
            "torch_threads": 1,
        },
        "graph": {"k": 5, "index": "flat", "recall_sample": 0},
        "ray": {"num_cpus": 2, "object_store_memory": 300_000_000},
    }
    _deep_merge(raw, sections)
    return config_from_dict(raw, source="make_config", overrides=overrides)


def create_bucket(endpoint_url: str, bucket: str, region: str = "us-east-1") -> None:
    """Create an S3 bucket through the S3 API (s3fs's mkdir fails on moto with a
    location-constraint error). Idempotent."""
    import botocore.session

    client = botocore.session.get_session().create_client("s3", endpoint_url=endpoint_url, region_name=region)
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


def commit_stage(store: Store, cfg: JobConfig, stage: str, stats: dict[str, Any]) -> None:
    """Mark `stage` committed with `cfg`'s fingerprint, as the stage itself would (tests that write
    a stage's files by hand use it to stand in for the stage)."""
    from .job import stage_fingerprints
    from .workdir import commit, stage_dir

    commit(store, stage_dir(cfg.workdir, stage), stage_fingerprints(cfg)[stage], stage, stats)


def is_committed(store: Store, cfg: JobConfig, stage: str) -> bool:
    """Whether `stage` is committed with `cfg`'s settings (StaleStageError when with others)."""
    from . import workdir
    from .job import stage_fingerprints

    return workdir.is_committed(store, workdir.stage_dir(cfg.workdir, stage), stage_fingerprints(cfg)[stage], stage)


class FailAtShard:
    """A write-stage hook (``Hooks(shard_written=FailAtShard(i))``) that fails output shard `i`
    after its tar is committed and before its metadata (= its commit), as a job killed in the
    middle of the write stage leaves it. Defined here so Ray workers can import it."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, index: int) -> None:
        if index == self.index:
            raise RuntimeError(f"injected failure in output shard {index:05d}")


# -- committed embed + graph stages for a given graph (select-stage tests, benchmarks) -------------

def write_graph_stages(store: Store, cfg: JobConfig, neighbors: np.ndarray, sq_distances: np.ndarray,
                       cells: np.ndarray, scores: np.ndarray, uids: list[str] | None = None, n_parts: int = 3,
                       vectors: np.ndarray | None = None, score_column: str = "score",
                       return_uids: bool = True) -> list[str] | None:
    """Commit the embed and graph stages of ``cfg`` holding exactly this kNN graph, in the stages'
    own formats: ``n_parts`` embedding parts (uids, float32 ``clip_score`` = the scores, the
    float64 scores also as ``score_column``, ``vectors`` or 2-d zeros as both embeddings),
    ``nodes.parquet`` and one graph part per embedding part. ``uids`` default to each node id
    as 32 hex digits (built part by part). Returns the uids."""
    import pyarrow as pa

    from .formats.embeddings import part_table
    from .formats.graph import graph_part_table
    from .workdir import part_name, stage_dir

    n = len(scores)
    given = uids is not None
    vectors = np.zeros((n, 2), np.float32) if vectors is None else np.asarray(vectors, np.float32)
    bounds = np.linspace(0, n, n_parts + 1).astype(np.int64)
    emb_dir, graph_dir = stage_dir(cfg.workdir, "embed"), stage_dir(cfg.workdir, "graph")
    node_tables = []
    for p in range(n_parts):
        lo, hi = int(bounds[p]), int(bounds[p + 1])
        part_uids = list(uids[lo:hi]) if given else [f"{i:032x}" for i in range(lo, hi)]  # node id as hex
        table = part_table(f"pool/{p:05d}.tar", part_uids, [f"{i:09d}" for i in range(lo, hi)],
                           np.asarray(scores[lo:hi], np.float32), vectors[lo:hi], vectors[lo:hi])
        table = table.append_column(score_column, pa.array(np.asarray(scores[lo:hi], np.float64)))
        store.write_parquet(join(emb_dir, f"{part_name(p)}.parquet"), table)
        store.write_parquet(join(graph_dir, f"{part_name(p)}.parquet"),
                            graph_part_table(np.arange(lo, hi), neighbors[lo:hi], sq_distances[lo:hi], cells[lo:hi]))
        node_tables.append(pa.table({"node": pa.array(np.arange(lo, hi, dtype=np.int64)),
                                     "uid": pa.array(part_uids, pa.string()),
                                     "part": pa.array([part_name(p)] * (hi - lo), pa.string())}))
    _write_row_groups(store, join(graph_dir, "nodes.parquet"), node_tables)
    commit_stage(store, cfg, "embed", {"samples": n, "skipped": {}})
    commit_stage(store, cfg, "graph", {"n_nodes": n})
    if not return_uids:
        return None
    return list(uids) if given else [f"{i:032x}" for i in range(n)]


def _write_row_groups(store: Store, url: str, tables: list) -> None:
    """One parquet file with one row group per table (as the graph stage writes nodes.parquet)."""
    import pyarrow.parquet as pq

    def fill(path: str) -> None:
        with pq.ParquetWriter(path, tables[0].schema, compression="zstd") as writer:
            for table in tables:
                writer.write_table(table)

    store.write_file(url, fill)
