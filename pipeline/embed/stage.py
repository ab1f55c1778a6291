"""The embed stage: stream WebDataset shards through open_clip model replicas (Ray Data actor pool),
or read DataComp precomputed embeddings, and commit one parquet part per input shard.

Data flow (open_clip encoder)::

    one row per pending shard ──► read+decode map task (:mod:`.read`, CPU, one shard per task)
    ──► ClipEmbedder actors (:mod:`.dataset`, one model per actor, GPU or CPU)
    ──► ShardWriter actors (:mod:`.parts`): gather each shard's rows; a shard is complete when its
        marker has arrived and as many rows as the marker announces
    ··► driver: small records only (forward times and counts, "shard complete"); it decides the
        complete shards in shard order (duplicate uids, through the registry actors) and the
        writers commit the parts, sending back their stats.

No embedding row passes through the driver (the stage's stats count what does:
``driver_received``), so the stage's rate is not one process's. A part is written only when all
its rows are in, after its skip records and stats json; a killed job leaves no partial part, and a
rerun embeds exactly the shards without a part.

The precomputed encoder joins DataComp's metadata to the shards by uid through bucketed files
and Ray tasks that write the parts themselves (:mod:`.precomputed`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..config import JobConfig, output_settings
from ..errors import ConfigError, StaleStageError, innermost
from ..formats.datacomp import subset_file_warning
from ..formats.webdataset import ShardReadError, listing, shard_urls, verify_shards
from ..runtime import init_ray, resources, ship_file, unseen_paths
from ..stage import Stage, StageContext
from ..storage import Store, join
from ..workdir import EMBED, part_name, stage_dir
from .dataset import actor_gpus, actor_pool_bounds, build_embed_dataset
from .device_preprocess import unsupported_reason
from .model import (ClipEncoder, ModelSpec, check_pretrained, checkpoint_namespace, gpu_batch_size, image_pipeline,
                    is_local_checkpoint, model_embed_dim, model_spec, preprocess_config)
from .parts import PartCommitter, committed_indices
from .precomputed import run_precomputed, verify_precomputed_inputs

log = logging.getLogger(__name__)

CPU_BATCH_SIZE = 256  # embed.batch_size auto on CPU actors (the default before auto existed)
RESOLVED = "_RESOLVED.json"  # settings resolved at run time, recorded before the first part
MISSING_LISTED = 1000  # missing shards named in the stats (all are counted)


def cpu_threads(cfg: JobConfig) -> int:
    """torch intra-op threads of a CPU actor."""
    return cfg.embed.torch_threads or max(1, int(round(cfg.embed.cpus_per_actor)))


def settings(cfg: JobConfig) -> dict[str, Any]:
    # The thread count is not a pure throughput knob: on some CPUs (AMD EPYC, measured) torch's CPU
    # kernels split reductions by thread, so the last bit of a float32 result depends on it. A
    # resume with another thread count must not mix parts, so it is part of the fingerprint.
    # Nor is batch_size: a chunk is one forward, and the rows of a 1-3 row chunk (a shard's last)
    # go through other kernels than those of a full one (measured on AMD EPYC, tiny and ViT-B-32:
    # most clip_scores of batches of 1-3 differ in the last bits from batch 32; batches of 5 and 7
    # differ too with 2 threads), so it stays in the fingerprint with the model settings.
    # device_decode and batch_size enter resolved as far as the config alone decides them (auto
    # with num_gpus_per_actor -1 depends on the cluster: RESOLVED, checked on resume, covers that);
    # the config marks them, torch_threads and cpus_per_actor (cpu_threads) as entering resolved.
    out = {"input": output_settings(cfg.input), "embed": output_settings(cfg.embed), "cpu_threads": cpu_threads(cfg),
           "device_decode": static_device_decode(cfg), "batch_size": static_batch_size(cfg)}
    files = model_file_identities(cfg)
    if files:  # only when the config names files: fingerprints of tag-only configs are unchanged
        out["model_files"] = files
    return out


def model_file_identities(cfg: JobConfig) -> dict[str, str]:
    """The content identity (size and ETag or modification time, no read) of the checkpoint and
    model config files `embed.pretrained` and `embed.model_config_path` name. A checkpoint
    replaced in place under the same name is another model: its embeddings must be recomputed,
    never served from the earlier parts (nor mixed with them on resume). An open_clip tag names
    no file and adds nothing; a missing file neither (the stage's check names it before any
    work)."""
    if cfg.embed.encoder != "open_clip":
        return {}
    store = Store(cfg.storage)
    out = {}
    for field in ("pretrained", "model_config_path"):
        url = getattr(cfg.embed, field)
        if url:
            try:
                out[field] = store.identity(url)  # one stat / HEAD
            except FileNotFoundError:
                pass
    return out


def static_device_decode(cfg: JobConfig) -> bool | str:
    """embed.device_decode as far as the config decides it: "auto" only when whether the actors
    get a GPU is up to the cluster (num_gpus_per_actor -1)."""
    if cfg.embed.device_decode != "auto":
        return cfg.embed.device_decode
    return "auto" if cfg.embed.num_gpus_per_actor < 0 else cfg.embed.num_gpus_per_actor > 0


def static_batch_size(cfg: JobConfig) -> int | str:
    if cfg.embed.batch_size != "auto":
        return cfg.embed.batch_size
    return CPU_BATCH_SIZE if cfg.embed.num_gpus_per_actor == 0 else "auto"


def resolve_device_decode(setting: bool | str, use_gpu: bool, pp: dict[str, Any]) -> bool:
    """Whether the actors decode JPEGs on their device: auto = on GPU actors, when the model's
    preprocessing is one the device path reproduces (else the CPU path, said in the log)."""
    if setting is False:
        return False
    reason = unsupported_reason(pp)
    if reason is None and not image_pipeline(pp).split:
        reason = "a transform that cannot be split at ToTensor"
    if setting is True and reason:
        raise ConfigError(f"embed.device_decode: the model's preprocessing has {reason}, which only the CPU "
                          "path reproduces; set embed.device_decode to auto or false")
    if reason and use_gpu:
        log.info("device decode off: the model's preprocessing has %s", reason)
    return (use_gpu and reason is None) if setting == "auto" else True


def resolve_run_settings(cfg: JobConfig, store: Store, directory: str, spec: ModelSpec, pp_json: str,
                         gpus: float, resuming: bool = True) -> dict[str, Any]:
    """device, device_decode and batch_size of this run. They are recorded (RESOLVED) before the
    first part; a resume (`resuming`: parts are committed) reuses the recorded batch size when it is
    auto (no new warm-up: a batch size changes bits) and refuses another device or device decode
    (which auto settings could give on another cluster) rather than mix parts."""
    use_gpu = gpus > 0
    resolved = {"device": "cuda" if use_gpu else "cpu",
                "device_decode": resolve_device_decode(cfg.embed.device_decode, use_gpu, json.loads(pp_json))}
    url = join(directory, RESOLVED)
    # a record without any committed part binds nothing (a run that died before its first part)
    recorded = store.read_json(url) if resuming and store.exists(url) else None
    if recorded is not None:
        changed = {k: (recorded.get(k), v) for k, v in resolved.items() if recorded.get(k) != v}
        if changed:
            raise StaleStageError(
                f"{directory} holds parts embedded with other run-time settings ("
                + ", ".join(f"{k}: {a} then, {b} now" for k, (a, b) in changed.items())
                + "); rerun `d2prune run` with --force-from embed, or set them explicitly to the recorded values")
    if cfg.embed.batch_size != "auto":
        resolved["batch_size"] = cfg.embed.batch_size
    elif recorded is not None:
        resolved["batch_size"] = int(recorded["batch_size"])
    elif use_gpu:
        resolved["batch_size"] = probe_gpu_batch_size(spec, store, pp_json, cfg.embed.precision, gpus)
    else:
        resolved["batch_size"] = CPU_BATCH_SIZE
    if recorded is None:
        store.write_json(url, resolved)
    return resolved


def probe_gpu_batch_size(spec: ModelSpec, store: Store, pp_json: str, precision: str, gpus: float) -> int:
    """embed.batch_size auto: a short warm-up in a Ray task holding what an actor holds (its share
    of a GPU), before the read tasks start (they cut chunks of the batch size)."""
    import ray

    @ray.remote(num_gpus=gpus, num_cpus=1)
    def probe() -> int:
        encoder = ClipEncoder(spec, store, pp_json, use_gpu=True, precision=precision)
        return gpu_batch_size(encoder, encoder.context, share=min(1.0, gpus))

    batch = int(ray.get(probe.remote()))
    log.info("embed.batch_size auto: %d (the largest power of two whose forward fits 80%% of the memory of %g GPU)",
             batch, min(1.0, gpus))
    return batch


def check(cfg: JobConfig, store: Store) -> None:
    """Every input is checked before any work, so a typo fails in seconds, not hours in."""
    urls = shard_urls(cfg.input)
    verify_shards(store, urls, allow_missing=cfg.input.allow_missing_shards)
    if cfg.embed.encoder == "precomputed":
        verify_precomputed_inputs(cfg, store)
    else:
        spec = model_spec(cfg, store)
        check_pretrained(spec, store)  # the model config and checkpoint, a few KB read
        if cfg.embed.device_decode is True:  # forced on: the model's preprocessing must allow it
            resolve_device_decode(True, False, preprocess_config(spec))


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


def _batches_or_config_error(ds, spec):
    """The embedded batches; a checkpoint that does not fit the architecture (found when the actors
    load it: torch's "Error(s) in loading state_dict") is a config error (exit 2), not a failure a
    rerun could fix."""
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)
    except Exception as err:  # noqa: BLE001 - re-raised unchanged unless it is that error
        text = str(innermost(err))
        if "Error(s) in loading state_dict" not in text:
            raise
        detail = [line.strip() for line in text.splitlines() if line.strip().startswith(
            ("size mismatch", "Missing key", "Unexpected key"))][:2]
        raise ConfigError(f"embed.pretrained {spec.pretrained} does not fit embed.model {spec.name}: "
                          + "; ".join(detail or ["its weights do not load into the architecture"])) from err


def _run_open_clip(cfg: JobConfig, store: Store, urls: list[str], pending: list[int],
                   committer: PartCommitter, progress) -> dict[str, Any]:
    spec = model_spec(cfg, store)
    pp = preprocess_config(spec)
    pp_json = json.dumps(pp, sort_keys=True)
    cluster = resources()
    gpus = actor_gpus(cfg.embed.num_gpus_per_actor, cluster.gpus, cluster.possible_gpus, cfg.embed.actors_per_gpu)
    use_gpu = gpus > 0
    if use_gpu and cluster.gpus == 0:
        log.info("no GPU is up yet: the %g-GPU actors wait for the cluster's autoscaler to add GPU nodes "
                 "(up to %g GPUs); job.stall_timeout_s ends the wait if none comes", gpus, cluster.possible_gpus)
    min_actors, max_actors, why = actor_pool_bounds(cfg.embed, cluster.possible_cpus, gpus,
                                                    cluster.possible_gpus)
    threads = cpu_threads(cfg)
    device = "cuda" if use_gpu else "cpu"
    precision = cfg.embed.precision if cfg.embed.precision != "auto" else ("bf16/fp16" if use_gpu else "fp32")
    run = resolve_run_settings(cfg, store, committer.directory, spec, pp_json, gpus,
                               resuming=len(pending) < len(urls))
    log.info("embedding %d shard(s) with %s (pretrained=%s) on %d-%d %s actor(s) of %g GPU (%s), batch %d, "
             "decode on the %s, preprocessing %s", len(pending), spec.name, spec.pretrained, min_actors, max_actors,
             device, gpus, why, run["batch_size"], device if run["device_decode"] else "read tasks' CPUs", pp)
    shipped = None
    if is_local_checkpoint(spec) and unseen_paths({spec.pretrained: os.path.getsize(spec.pretrained)}):
        # the actors may start on nodes that do not see the driver's file: send it with the job
        shipped = ship_file(spec.pretrained)
        log.info("embed.pretrained %s is not on every node: shipped through the object store (%.1f MiB, sha256 %s)",
                 spec.pretrained, os.path.getsize(spec.pretrained) / 2**20, shipped.sha256[:12])

    # the writers gather and commit the parts; the driver sees records and commit records only
    committer.start_writers(max(1, min(max_actors, len(pending))), model_embed_dim(spec))
    ds = build_embed_dataset(cfg, store, spec, pp_json, [(i, urls[i]) for i in pending], gpus, threads,
                             pool=(min_actors, max_actors), shipped=shipped, batch_size=run["batch_size"],
                             device_decode=run["device_decode"], writers=committer.writers)
    failed: dict[int, str] = {}  # shards that could not be read
    forward_times: Counter = Counter()  # forward end time -> rows (for the steady-state rate)
    received = Counter()  # what the stream brought the driver: records and their bytes
    waiting = f"embedded batches from the actor pool ({len(pending)} shard(s) pending)"
    progress(waiting)
    for batch in _batches_or_config_error(ds, spec):
        progress(waiting)
        received.update(records=len(batch["shard_index"]), bytes=batch_bytes(batch))
        at = np.asarray(batch["embedded_at"])
        for t, n in zip(at[at > 0].tolist(), np.asarray(batch["rows"])[at > 0].tolist()):
            forward_times[t] += n
        for r in np.flatnonzero(np.asarray(batch["event"]) != "").tolist():
            index, event = int(batch["shard_index"][r]), str(batch["event"][r])
            if event == "failed":
                failed[index] = str(batch["error"][r])
                if cfg.input.allow_missing_shards:
                    committer.add(index, 0, 0, missing=failed[index])
            else:
                committer.add(index, int(batch["part_rows"][r]), int(batch["part_samples"][r]))
        committer.poll()
        if failed and not cfg.input.allow_missing_shards and committer.next_index in failed:
            break  # nothing after the failed shard can be decided (shard order): stop the stream
    committer.poll(timeout=None)  # the commits under way finish (or fail) before the stage ends
    if failed and not cfg.input.allow_missing_shards:
        lines = [f"{urls[i]}: {reason}" for i, reason in sorted(failed.items())]
        raise ShardReadError(
            f"{len(failed)} input shard(s) could not be read; the {len(committer.stats)} shard(s) before them are "
            f"committed and a rerun resumes there (input.allow_missing_shards: true skips them):\n{listing(lines)}")
    if not committer.done or len(committer.stats) < len(pending):
        missing = sorted(set(pending) - set(committer.stats))
        raise RuntimeError(f"embed stage ended with incomplete shards: {[urls[i] for i in missing]}")
    driver = {"records": received["records"], "bytes": received["bytes"], "commit_records": len(committer.stats),
              "commit_record_bytes": committer.received_bytes}
    return {"encoder": "open_clip", "model": spec.name, "pretrained": spec.pretrained, "device": device,
            "precision": precision, "actors": [min_actors, max_actors], "torch_threads": threads,
            "batch_size": run["batch_size"], "device_decode": run["device_decode"],
            "gpus_per_actor": gpus, "preprocess": pp,
            "steady_samples_per_s": steady_rate(forward_times), "driver_received": driver,
            "part_writers": {"actors": len(committer.writers), "pids": sorted(committer.writer_pids)}}


def batch_bytes(batch: dict[str, np.ndarray]) -> int:
    """Bytes of a batch the driver received (strings by their length): what passes through it."""
    total = 0
    for values in batch.values():
        values = np.asarray(values)
        total += sum(len(str(v)) for v in values) if values.dtype == object else values.nbytes
    return total


def run(cfg: JobConfig, store: Store, ctx: StageContext) -> dict[str, Any]:
    """Embed every input shard not yet committed; return the stage's stats."""
    directory = stage_dir(cfg.workdir, EMBED)
    urls = shard_urls(cfg.input)
    init_ray(cfg.ray)
    committed = committed_indices(store, directory, len(urls))
    done = set(committed)
    pending = [i for i in range(len(urls)) if i not in done]
    if committed:
        log.info("resuming embed stage: %d of %d shard(s) already committed", len(committed), len(urls))
    on_part_committed = lambda i: ctx.part_committed(EMBED, i)  # noqa: E731
    started = time.perf_counter()
    dim = None
    if cfg.embed.encoder == "precomputed":
        # its own part writer: the join decides duplicates across shards exactly (.precomputed)
        info, new_stats, dim = run_precomputed(cfg, store, directory, urls, pending, on_part_committed)
    else:
        committer = PartCommitter(store, directory, urls, pending, committed, on_part_committed,
                                  registry_setting=cfg.embed.uid_registry_actors)
        try:
            info = _run_open_clip(cfg, store, urls, pending, committer, ctx.progress) if pending else {"encoder": "open_clip"}
        finally:
            committer.close()
        info["uid_registry_actors"] = committer.registry_actors
        new_stats, dim = committer.stats, committer.dim
    seconds = time.perf_counter() - started

    per_shard = dict(new_stats)
    if committed:
        with ThreadPoolExecutor(max_workers=min(16, len(committed))) as pool:
            loaded = pool.map(lambda i: store.read_json(join(directory, part_name(i) + ".stats.json")), committed)
            per_shard.update(zip(committed, loaded))
    if dim is None:  # nothing embedded in this run: read it from a committed part
        first = next((i for i in sorted(per_shard) if per_shard[i]["samples"] > 0), None)
        if first is not None:
            part = store.read_parquet(join(directory, part_name(first) + ".parquet"), columns=["image_embedding"])
            dim = part.schema.field("image_embedding").type.list_size
    skipped: Counter = Counter()
    notes: Counter = Counter()
    for s in per_shard.values():
        skipped.update(s["skipped"])
        notes.update(s.get("uid_notes", {}))
    new_samples = sum(s["samples"] for s in new_stats.values())
    stats = {
        **info,
        "model": info.get("model", cfg.embed.model),
        "shards": len(urls),
        "shards_embedded": len(pending),
        "shards_resumed": len(committed),
        "samples": sum(s["samples"] for s in per_shard.values()),
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()),
        "shards_missing": sum(1 for s in per_shard.values() if "missing" in s),
        "missing_shards": [{"shard": s["shard"], "reason": s["missing"]} for _, s in sorted(per_shard.items())
                           if "missing" in s][:MISSING_LISTED],
        "shards_empty": sum(1 for s in per_shard.values()
                            if s["samples"] == 0 and not s["skipped"] and "missing" not in s),
        "samples_this_run": new_samples,
        "seconds": round(seconds, 3),
        "samples_per_s": round(new_samples / seconds, 3) if seconds > 0 and new_samples else 0.0,
        "embedding_dim": dim,
        "per_shard": [{"part": part_name(i), **per_shard[i]} for i in sorted(per_shard)],
    }
    warning = subset_file_warning(notes)
    if warning:
        stats["uid_notes"] = dict(sorted(notes.items()))
        stats["subset_file_warning"] = warning
        log.warning("embed: subset.npy and DataComp's resharder: %s", warning)
    log.info("embed: %d samples (%d this run) in %.1f s, %.1f samples/s; skipped: %s",
             stats["samples"], new_samples, seconds, stats["samples_per_s"],
             ", ".join(f"{k}={v}" for k, v in stats["skipped"].items()) or "none")
    return stats


STAGE = Stage(name=EMBED, reads=(), settings=settings, check=check, run=run,
              node_caches=lambda cfg: [checkpoint_namespace(cfg)])
