"""DataComp-style precomputed embeddings: metadata parquet + ``.npz`` instead of running a model."""

from __future__ import annotations

import io
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..config import ConfigError, JobConfig, PrecomputedConfig
from ..formats.webdataset import BAD_METADATA, ShardError, listing
from ..runtime import resources
from ..storage import Store, expand_urls
from .parts import PartCommitter, ShardResult

BAD_EMBEDDING = "bad_embedding"  # a non-finite or all-zero vector


def _load_precomputed(store: Store, meta_url: str, npz_url: str, pc: PrecomputedConfig) -> ShardResult:
    table = store.read_parquet(meta_url)
    if "uid" not in table.column_names:
        raise ValueError(f"precomputed metadata {meta_url} has no 'uid' column")
    with np.load(io.BytesIO(store.read_bytes(npz_url))) as npz:
        for name in (pc.image_key, pc.text_key):
            if name not in npz.files:
                raise ValueError(f"{npz_url} has no array {name!r} (it has {sorted(npz.files)})")
        image = npz[pc.image_key].astype(np.float32)
        text = npz[pc.text_key].astype(np.float32)
    n = table.num_rows
    if image.shape[0] != n or text.shape[0] != n:
        raise ValueError(f"{npz_url} has {image.shape[0]}/{text.shape[0]} rows but {meta_url} has {n}")
    uids = table.column("uid").to_pylist()
    keys = table.column("key").to_pylist() if "key" in table.column_names else [""] * n
    scores = (np.asarray(table.column(pc.score_column).to_numpy(zero_copy_only=False), dtype=np.float64)
              if pc.score_column in table.column_names else np.full(n, np.nan))
    skipped: Counter = Counter()
    image_norm = np.linalg.norm(image, axis=1)
    text_norm = np.linalg.norm(text, axis=1)
    ok_uid = np.array([u is not None and str(u) != "" for u in uids], dtype=bool)
    ok_vec = np.isfinite(image_norm) & np.isfinite(text_norm) & (image_norm > 0) & (text_norm > 0)
    skipped[BAD_METADATA] += int((~ok_uid).sum())
    skipped[BAD_EMBEDDING] += int((ok_uid & ~ok_vec).sum())
    keep = np.flatnonzero(ok_uid & ok_vec)
    image = image[keep] / image_norm[keep, None]
    text = text[keep] / text_norm[keep, None]
    scores = scores[keep]
    missing = ~np.isfinite(scores)
    scores[missing] = (image[missing] * text[missing]).sum(axis=1)  # the score is that cosine
    return ShardResult([str(uids[i]) for i in keep], [str(keys[i] or "") for i in keep],
                       scores.astype(np.float32), image.astype(np.float16), text.astype(np.float16),
                       Counter({k: v for k, v in skipped.items() if v}))


def precomputed_files(cfg: JobConfig, n_shards: int) -> tuple[list[str], list[str]]:
    pc = cfg.embed.precomputed
    metadata = expand_urls(pc.metadata)
    if pc.embeddings is not None:
        embeddings = expand_urls(pc.embeddings)
    else:
        embeddings = [m[: -len(".parquet")] + ".npz" if m.endswith(".parquet") else m + ".npz" for m in metadata]
    if len(metadata) != len(embeddings):
        raise ConfigError(f"embed.precomputed: {len(metadata)} metadata files but {len(embeddings)} embedding files")
    if len(metadata) != n_shards:
        raise ConfigError(
            f"embed.precomputed.metadata has {len(metadata)} files but input.shards has {n_shards}; "
            "file i must hold the embeddings of shard i"
        )
    return metadata, embeddings


def run_precomputed(cfg: JobConfig, store: Store, urls: list[str], pending: list[int],
                     committer: PartCommitter) -> dict[str, Any]:
    import ray

    pc = cfg.embed.precomputed
    metadata, embeddings = precomputed_files(cfg, len(urls))
    load = ray.remote(num_cpus=1)(_load_precomputed)
    window = max(2, int(resources().cpus))
    in_flight: list[tuple[int, Any]] = []
    todo = list(pending)
    while todo or in_flight:
        while todo and len(in_flight) < window:
            i = todo.pop(0)
            in_flight.append((i, load.remote(store, metadata[i], embeddings[i], pc)))
        i, ref = in_flight.pop(0)
        committer.add(i, ray.get(ref))
    return {"encoder": "precomputed", "model": f"precomputed:{pc.image_key}/{pc.text_key}", "pretrained": None,
            "device": "none", "precision": "as stored"}


def verify_precomputed_inputs(cfg: JobConfig, store: Store, n_shards: int) -> None:
    metadata, embeddings = precomputed_files(cfg, n_shards)
    files = metadata + embeddings
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        exists = list(pool.map(store.exists, files))
    missing = [f for f, ok in zip(files, exists) if not ok]
    if missing:
        raise ShardError(f"{len(missing)} precomputed embedding file(s) not found:\n{listing(missing)}")
