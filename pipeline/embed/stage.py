"""The embed stage: stream WebDataset shards through open_clip model replicas (Ray Data actor pool),
or read DataComp precomputed embeddings, and commit one parquet part per input shard.

Data flow (open_clip encoder)::

    one row per pending shard ──► read+decode map task (:mod:`.read`, CPU, one shard per task)
    ──► ClipEmbedder actors (:mod:`.dataset`, one model per actor, GPU or CPU)
    ──► driver: collects rows per shard; a shard is complete when its marker has arrived and as
        many rows as the marker announces; complete shards are committed in shard order
        (:mod:`.parts`).

A part is written only when all its rows are in, after its stats json; a killed job leaves no
partial part, and a rerun embeds exactly the shards without a part.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..config import JobConfig
from ..formats.webdataset import shard_urls, verify_shards
from ..runtime import init_ray, resources
from ..stage import Stage, StageContext
from ..storage import Store, join
from ..workdir import part_name, stage_dir
from .dataset import build_embed_dataset, check_cpu_budget
from .model import check_pretrained, model_embed_dim, model_spec, preprocess_config
from .parts import PartCommitter, ShardAccumulator, committed_indices
from .precomputed import run_precomputed, verify_precomputed_inputs

log = logging.getLogger(__name__)

# throughput knobs: they change how fast, never what is embedded
THROUGHPUT_SETTINGS = {"batch_size", "num_actors", "num_gpus_per_actor", "cpus_per_actor", "torch_threads"}


def cpu_threads(cfg: JobConfig) -> int:
    """torch intra-op threads of a CPU actor."""
    return cfg.embed.torch_threads or max(1, int(round(cfg.embed.cpus_per_actor)))


def settings(cfg: JobConfig) -> dict[str, Any]:
    # The thread count is not a pure throughput knob: on some CPUs (AMD EPYC, measured) torch's CPU
    # kernels split reductions by thread, so the last bit of a float32 result depends on it. A
    # resume with another thread count must not mix parts, so it is part of the fingerprint.
    return {"input": cfg.input.model_dump(), "embed": cfg.embed.model_dump(exclude=THROUGHPUT_SETTINGS),
            "cpu_threads": cpu_threads(cfg)}


def check(cfg: JobConfig, store: Store) -> None:
    """Every input is checked before any work, so a typo fails in seconds, not hours in."""
    urls = shard_urls(cfg.input)
    if cfg.embed.encoder == "precomputed":
        verify_precomputed_inputs(cfg, store, len(urls))
    else:
        verify_shards(store, urls)


def steady_rate(forward_times: Counter) -> float | None:
    """Samples/s between the end of the first and of the last forward pass: the stage's rate once
    the model is loaded and data flows (start-up excluded; starved forwards show as gaps)."""
    if len(forward_times) < 2:
        return None
    times = sorted(forward_times)
    log.debug("forward passes ended at %s", [(round(t - times[0], 2), forward_times[t]) for t in times])
    span = times[-1] - times[0]
    rows = sum(forward_times.values()) - forward_times[times[0]]
    return round(rows / span, 3) if span > 0 else None


def _run_open_clip(cfg: JobConfig, store: Store, urls: list[str], pending: list[int],
                   committer: PartCommitter) -> dict[str, Any]:
    spec = model_spec(cfg, store)
    check_pretrained(spec, store)
    pp = preprocess_config(spec)
    pp_json = json.dumps(pp, sort_keys=True)
    cluster = resources()
    gpus = cfg.embed.num_gpus_per_actor
    if gpus < 0:
        gpus = 1.0 if cluster.gpus > 0 else 0.0
    use_gpu = gpus > 0
    check_cpu_budget(cfg.embed.num_actors, cfg.embed.cpus_per_actor, cluster.cpus)
    threads = cpu_threads(cfg)
    device = "cuda" if use_gpu else "cpu"
    precision = cfg.embed.precision if cfg.embed.precision != "auto" else ("bf16/fp16" if use_gpu else "fp32")
    log.info("embedding %d shard(s) with %s (pretrained=%s) on %d %s actor(s), batch %d, preprocessing %s",
             len(pending), spec.name, spec.pretrained, cfg.embed.num_actors, device, cfg.embed.batch_size, pp)

    committer.dim = model_embed_dim(spec)
    ds = build_embed_dataset(cfg, store, spec, pp_json, [(i, urls[i]) for i in pending], gpus, threads)
    partial: dict[int, ShardAccumulator] = {}
    forward_times: Counter = Counter()  # forward end time -> rows (for the steady-state rate)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        markers = np.asarray(batch["is_marker"], dtype=bool)
        shard_index = np.asarray(batch["shard_index"])
        forward_times.update(np.asarray(batch["embedded_at"])[~markers].tolist())
        for index in np.unique(shard_index).tolist():
            acc = partial.setdefault(index, ShardAccumulator())
            sel = shard_index == index
            rows = sel & ~markers
            if rows.any():
                acc.add({k: np.asarray(batch[k])[rows] for k in
                         ("sample_index", "uid", "key", "clip_score", "image_embedding", "text_embedding")})
            for m in np.flatnonzero(sel & markers):
                acc.expected = int(batch["marker_samples"][m])
                acc.skipped.update(json.loads(str(batch["marker_skipped"][m])))
            if acc.complete:
                committer.add(index, partial.pop(index).result())
    if partial or not committer.done:
        missing = sorted(set(pending) - set(committer.stats))
        raise RuntimeError(f"embed stage ended with incomplete shards: {[urls[i] for i in missing]}")
    return {"encoder": "open_clip", "model": spec.name, "pretrained": spec.pretrained, "device": device,
            "precision": precision, "actors": cfg.embed.num_actors, "torch_threads": threads,
            "batch_size": cfg.embed.batch_size, "preprocess": pp,
            "steady_samples_per_s": steady_rate(forward_times)}


def run(cfg: JobConfig, store: Store, ctx: StageContext) -> dict[str, Any]:
    """Embed every input shard not yet committed; return the stage's stats."""
    directory = stage_dir(cfg.workdir, "embed")
    urls = shard_urls(cfg.input)
    init_ray(cfg.ray)
    committed = committed_indices(store, directory, len(urls))
    done = set(committed)
    pending = [i for i in range(len(urls)) if i not in done]
    if committed:
        log.info("resuming embed stage: %d of %d shard(s) already committed", len(committed), len(urls))
    committer = PartCommitter(store, directory, urls, pending, committed, lambda i: ctx.part_committed("embed", i))
    started = time.perf_counter()
    if cfg.embed.encoder == "precomputed":
        info = run_precomputed(cfg, store, urls, pending, committer) if pending else {"encoder": "precomputed"}
    else:
        info = _run_open_clip(cfg, store, urls, pending, committer) if pending else {"encoder": "open_clip"}
    seconds = time.perf_counter() - started

    per_shard = dict(committer.stats)
    if committed:
        with ThreadPoolExecutor(max_workers=min(16, len(committed))) as pool:
            loaded = pool.map(lambda i: store.read_json(join(directory, part_name(i) + ".stats.json")), committed)
            per_shard.update(zip(committed, loaded))
    dim = committer.dim
    if dim is None:  # nothing embedded in this run: read it from a committed part
        first = next((i for i in sorted(per_shard) if per_shard[i]["samples"] > 0), None)
        if first is not None:
            part = store.read_parquet(join(directory, part_name(first) + ".parquet"), columns=["image_embedding"])
            dim = part.schema.field("image_embedding").type.list_size
    skipped: Counter = Counter()
    for s in per_shard.values():
        skipped.update(s["skipped"])
    new_samples = sum(s["samples"] for s in committer.stats.values())
    stats = {
        **info,
        "model": info.get("model", cfg.embed.model),
        "shards": len(urls),
        "shards_embedded": len(pending),
        "shards_resumed": len(committed),
        "samples": sum(s["samples"] for s in per_shard.values()),
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()),
        "samples_this_run": new_samples,
        "seconds": round(seconds, 3),
        "samples_per_s": round(new_samples / seconds, 3) if seconds > 0 and new_samples else 0.0,
        "embedding_dim": dim,
        "per_shard": [{"part": part_name(i), **per_shard[i]} for i in sorted(per_shard)],
    }
    log.info("embed: %d samples (%d this run) in %.1f s, %.1f samples/s; skipped: %s",
             stats["samples"], new_samples, seconds, stats["samples_per_s"],
             ", ".join(f"{k}={v}" for k, v in stats["skipped"].items()) or "none")
    return stats


STAGE = Stage(name="embed", upstream=None, settings=settings, check=check, run=run)
