"""The embed stage on Ray Data: shards → read+decode tasks → model actor pool → rows with embeddings.

Why these choices:
* Decoding in the read tasks, never in the model actor: the actor's CPU/GPU does nothing but
  forward passes, and decoding scales with read tasks. Only uint8 pixels travel (4x less than
  float32 tensors); the normalisation is done on the model's device.
* Each read chunk is exactly one model batch: every read yield is a whole chunk's number of rows
  (the last partial chunk padded with the shard's marker and filler rows) and the actor map takes
  batches of exactly that many rows, so batch composition is a function of the shard alone, not of
  task timing or of which blocks Ray bundles together, and two runs give bit-identical embeddings
  (batched matmuls may round differently for different batch mates).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import numpy as np

from ..config import ConfigError, EmbedConfig, JobConfig
from ..formats.webdataset import (READ_BLOCK_SIZE, UNDECODABLE_IMAGE, ImageDecodeError, ImageTooLargeError,
                                  decode_image)
from ..storage import Store
from .device_preprocess import DevicePreprocessor, payload_pixels
from .model import ClipEncoder, ModelSpec
from .read import read_and_preprocess

READ_WORKER_BASE_MEMORY = 640 * 2**20
MODEL_INPUT_COLUMNS = ("image", "jpeg", "tokens", "chunk")  # a read chunk's columns the model consumes


class ClipEmbedder(ClipEncoder):
    """The Ray Data callable class (one instance per actor, model loaded once).

    A Ray Data block may hold several read chunks (Ray coalesces small outputs); each chunk gets
    its own forward pass, so a sample's batch mates are always its chunk (determinism) and the
    forward batch is `embed.batch_size` however blocks are shaped.

    With `device_decode` the chunk's JPEGs are decoded and resized on the actor's device
    (:mod:`.device_preprocess`); a JPEG the device rejects is decoded with PIL here, and one PIL
    rejects too is returned with ``skip_reason`` set (no embedding) for the driver to count.

    On a GPU the next chunk is prepared (host work, pinned copies, decode queued) while the
    previous chunk's forward runs: its results are collected only after the next one is queued.

    With `writers` (handles of :class:`.parts.ShardWriter` actors) the embedded rows go to the
    writer of their shard and the actor returns only small records (:func:`hand_off`), so no row
    travels to the driver; without, the rows themselves (what tests of the model call look at).

    `shipped` (a :class:`pipeline.runtime.ShippedFile`) is a driver-local checkpoint sent through
    the object store because this node may not see the driver's file: it is materialised in the
    node's checkpoint cache, keyed by its content, and loaded from there."""

    def __init__(self, spec: ModelSpec, store: Store, pp_json: str, use_gpu: bool = False,
                 precision: str = "auto", torch_threads: int | None = None, shipped=None,
                 device_decode: bool = False, writers: list | None = None):
        self.writers = writers
        if shipped is not None:
            spec = replace(spec, pretrained=shipped.local_path(spec.cache_namespace))
        super().__init__(spec, store, pp_json, use_gpu, precision, torch_threads)
        self.device_preprocess = DevicePreprocessor(json.loads(pp_json), self.device) if device_decode else None

    def _device_inputs(self, images: np.ndarray, jpeg: np.ndarray):
        """(uint8 NCHW on the device, positions kept, {position: skip reason})."""
        import torch

        size = self.images.size
        out = torch.empty((len(images), 3, *size), dtype=torch.uint8, device=self.device)
        on_device = np.flatnonzero(jpeg)
        decoded, failed = self.device_preprocess([images[i] for i in on_device])
        done = np.delete(on_device, failed)
        if len(done):
            out[torch.from_numpy(done).to(self.device)] = decoded
        host, dropped = {}, {}
        for i in np.flatnonzero(~jpeg):
            host[i] = payload_pixels(images[i], size)
        for i in on_device[failed]:  # the device decoder said no: PIL decides, as on the CPU path
            try:
                host[i] = self.images(decode_image(images[i]))
            except (ImageDecodeError, ImageTooLargeError, ValueError, OSError):
                dropped[int(i)] = UNDECODABLE_IMAGE
        if host:
            rows = np.array(sorted(host))
            pixels = self.to_device(np.stack([host[i] for i in rows])).permute(0, 3, 1, 2)
            out[torch.from_numpy(rows).to(self.device)] = pixels
        keep = np.array([i for i in range(len(images)) if i not in dropped], dtype=np.int64)
        return out[torch.from_numpy(keep).to(self.device)] if dropped else out, keep, dropped

    def _prepare(self, batch: dict[str, np.ndarray], rows: np.ndarray):
        if self.device_preprocess is None:
            return self.pixels_to_tensor(batch["image"][rows]), rows, {}
        images, keep, dropped = self._device_inputs(batch["image"][rows], np.asarray(batch["jpeg"])[rows])
        return self.normalise(images), rows[keep], {int(rows[i]): r for i, r in dropped.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.embed(batch)
        return out if self.writers is None else hand_off(out, self.writers)

    def embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch's rows with their embeddings (markers and filler rows passed through)."""
        is_marker = np.asarray(batch["is_marker"], dtype=bool)
        n = len(is_marker)
        image_emb = np.zeros((n, self.dim), dtype=np.float16)
        text_emb = np.zeros((n, self.dim), dtype=np.float16)
        scores = np.zeros(n, dtype=np.float32)
        embedded_at = np.zeros(n, dtype=np.float64)
        skip_reason = np.array([""] * n, dtype=object)
        chunk_id = np.stack([np.asarray(batch["shard_index"]), np.asarray(batch["chunk"])], axis=1)
        real = np.flatnonzero(~is_marker)
        # runs of rows of one chunk (rows of a chunk are contiguous): cut where the chunk id changes
        cuts = np.flatnonzero((chunk_id[real[1:]] != chunk_id[real[:-1]]).any(axis=1)) + 1

        def collect(rows, outputs):
            img, txt, score = self.collect(outputs)
            image_emb[rows] = img.astype(np.float16)
            text_emb[rows] = txt.astype(np.float16)
            scores[rows] = score.astype(np.float32)
            embedded_at[rows] = time.time()

        queued = None  # the forward in flight: collected once the next one is queued (prefetch)
        for rows in np.split(real, cuts) if len(real) else []:
            images, rows, dropped = self._prepare(batch, rows)
            for row, reason in dropped.items():
                skip_reason[row] = reason
            launched = (rows, self.forward(images, batch["tokens"][rows])) if len(rows) else None
            if queued is not None:
                collect(*queued)
            queued = launched
        if queued is not None:
            collect(*queued)
        # every column but the model's inputs goes on (what the reader adds reaches the part)
        out = {k: v for k, v in batch.items() if k not in MODEL_INPUT_COLUMNS}
        out.update(image_embedding=image_emb, text_embedding=text_emb, clip_score=scores,
                   embedded_at=embedded_at, skip_reason=skip_reason)
        return out


# what hand_off keeps for itself: the rest of a row (whatever columns the reader and the model
# give it, e.g. sha256) travels to the writer
CONTROL_COLUMNS = ("shard_index", "is_marker", "marker_samples", "marker_skipped", "marker_error",
                   "embedded_at", "skip_reason")
RECORD_COLUMNS = ("shard_index", "embedded_at", "rows", "event", "part_rows", "part_samples", "error")


def hand_off(out: dict[str, np.ndarray], writers: list) -> dict[str, np.ndarray]:
    """Send the embedded rows of `out` (one model batch) to their shards' writers and return what
    the driver gets instead: per shard, one record per forward pass (its end time and row count,
    for the steady rate) and one per writer event (a shard now complete, with its counts, or
    unreadable). Waits for the writers to take the rows (backpressure: a slow writer slows the
    actors, rows never pile up in a mailbox)."""
    import ray

    from .parts import writer_of

    shard_index = np.asarray(out["shard_index"])
    is_marker = np.asarray(out["is_marker"], dtype=bool)
    dropped = np.asarray(out["skip_reason"]) != ""  # rows the actor could not decode (device decode)
    real_marker = is_marker & (np.asarray(out["marker_samples"]) >= 0)  # not filler
    carried = [k for k in out if k not in CONTROL_COLUMNS]
    shards = np.unique(shard_index).tolist()
    sent = []
    for index in shards:
        sel = shard_index == index
        rows = sel & ~is_marker & ~dropped
        drops = [(int(out["sample_index"][r]), str(out["key"][r]), str(out["uid"][r]), str(out["skip_reason"][r]))
                 for r in np.flatnonzero(sel & dropped)]
        m = np.flatnonzero(sel & real_marker)
        marker = (int(out["marker_samples"][m[0]]), str(out["marker_skipped"][m[0]]),
                  str(out["marker_error"][m[0]])) if len(m) else None
        columns = {k: np.asarray(out[k])[rows] for k in carried} if rows.any() else None
        sent.append(writers[writer_of(index, len(writers))].add.remote(index, columns, drops, marker))
    events = ray.get(sent)
    records: dict[str, list] = {k: [] for k in RECORD_COLUMNS}

    def record(index, at=0.0, rows=0, event="", part_rows=0, part_samples=0, error=""):
        for k, v in zip(RECORD_COLUMNS, (index, at, rows, event, part_rows, part_samples, error)):
            records[k].append(v)

    embedded_at = np.asarray(out["embedded_at"])
    for index, event in zip(shards, events):
        rows = (shard_index == index) & ~is_marker & ~dropped
        times, counts = np.unique(embedded_at[rows], return_counts=True)
        for at, n in zip(times.tolist(), counts.tolist()):
            record(index, at, n)
        if event is not None:
            record(index, 0.0, 0, *event)
        elif not len(times):
            record(index)  # every shard of the batch answers (a batch of markers only too)
    return {"shard_index": np.array(records["shard_index"], dtype=np.int64),
            "embedded_at": np.array(records["embedded_at"], dtype=np.float64),
            "rows": np.array(records["rows"], dtype=np.int64),
            "event": np.array(records["event"], dtype=object),
            "part_rows": np.array(records["part_rows"], dtype=np.int64),
            "part_samples": np.array(records["part_samples"], dtype=np.int64),
            "error": np.array(records["error"], dtype=object)}


def shards_dataset(shards: list[tuple[int, str]]):
    """A Ray Dataset with one row ``{"shard_index", "shard"}`` per shard and one block per row, so
    each downstream map task reads exactly one shard (the unit of parallelism and of commit)."""
    import ray.data

    items = [{"shard_index": int(i), "shard": url} for i, url in shards]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


def build_embed_dataset(cfg: JobConfig, store: Store, spec: ModelSpec, pp_json: str,
                        shards: list[tuple[int, str]], gpus: float, threads: int,
                        pool: tuple[int, int] | None = None, shipped=None, batch_size: int | None = None,
                        device_decode: bool = False, writers: list | None = None):
    """The streaming Ray Dataset: shards -> read+decode tasks -> model actor pool (between
    ``pool`` = (min, max) actors, :func:`actor_pool_bounds`) -> rows with embeddings (plus one
    marker row per shard; with `writers`, the rows go to those :class:`.parts.ShardWriter` actors
    and the dataset yields only :func:`hand_off`'s records). `batch_size` and `device_decode` are the resolved settings
    (:func:`.stage.resolve_batch_size`, :func:`.stage.resolve_device_decode`)."""
    import ray.data

    use_gpu = gpus > 0
    batch_size = batch_size or cfg.embed.batch_size
    if not isinstance(batch_size, int):
        raise ValueError("build_embed_dataset needs the resolved batch size (embed.batch_size is auto)")
    pp = json.loads(pp_json)
    ds = shards_dataset(shards)
    # A read chunk is one model batch; make sure Ray Data does not split it (see module docstring).
    # Set on this dataset's own context (derived datasets inherit it; other stages are unaffected).
    context = ds.context
    size = pp["size"] if isinstance(pp["size"], list) else [pp["size"], pp["size"]]
    # float32 pixels (an upper bound: the split pipeline ships uint8) + tokens and strings
    chunk_bytes = batch_size * (size[0] * size[1] * 3 * 4 + 4096)
    # Blocks are cut at whole chunks as long as a block never grows past 1.5x the target (Ray
    # then slices it): with a target of >= 4 chunks it stays <= 1.25x.
    context.target_max_block_size = max(context.target_max_block_size or 0, 4 * chunk_bytes)
    ds = ds.map_batches(
        read_and_preprocess,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"store": store, "input_cfg": cfg.input, "spec": spec, "pp_json": pp_json,
                   "chunk_size": batch_size, "device_decode": device_decode},
        num_cpus=1,
        # What a read task holds: the worker itself (torch, torchvision and open_clip imported for
        # the model's transform and tokenizer: ~550 MiB RSS measured), a chunk being built and
        # the one being handed out, and s3fs's read-ahead. Stating it also keeps Ray Data from
        # fusing this task map into the actor map that follows (it fuses when the remote args are
        # identical, as they are for a 1-CPU actor), which would decode inside the model actor;
        # tests check the plan.
        memory=READ_WORKER_BASE_MEMORY + 2 * chunk_bytes + 2 * READ_BLOCK_SIZE,
    )
    return ds.map_batches(
        ClipEmbedder,
        # Batches of exactly one read chunk's size: every read yield is that many rows (read.py), so
        # batches fall on chunk boundaries (determinism). Ray requires a batch size for GPU actors.
        batch_size=batch_size,
        batch_format="numpy",
        # An autoscaling pool: idle actors above min_size are released, so when a lost node's actor
        # is restarted on a surviving node and the read tasks run short of CPUs, the pool shrinks
        # instead of waiting forever (and the stall detector ends what still cannot move).
        compute=ray.data.ActorPoolStrategy(min_size=min(pool), max_size=max(pool)) if pool
        else ray.data.ActorPoolStrategy(min_size=cfg.embed.min_actors, max_size=cfg.embed.num_actors),
        fn_constructor_kwargs={"spec": spec, "store": store, "pp_json": pp_json, "use_gpu": use_gpu,
                               "precision": cfg.embed.precision, "torch_threads": threads, "shipped": shipped,
                               "device_decode": device_decode, "writers": writers},
        num_gpus=gpus if use_gpu else None,
        num_cpus=cfg.embed.cpus_per_actor,
    )


def actor_gpus(requested: float, gpus_now: float, gpus_possible: float, actors_per_gpu: int = 1) -> float:
    """GPUs per actor: `requested` when >= 0; auto (-1): 1/actors_per_gpu when the cluster has a
    GPU now *or* its autoscaler can add one (a GPU worker group at minReplicas 0: the actors' GPU
    request is what makes the autoscaler start it), else 0 (CPU). A fraction makes Ray pack that
    many actors on each GPU: where one actor leaves the GPU idle between its forwards."""
    if requested >= 0:
        return requested
    return 1.0 / actors_per_gpu if max(gpus_now, gpus_possible) > 0 else 0.0


def actor_pool_bounds(embed: EmbedConfig, cpus: float, gpus_per_actor: float = 0.0,
                      gpus: float = 0.0) -> tuple[int, int, str]:
    """(min, max) actors of the pool on a cluster with `cpus` CPUs (and `gpus` GPUs), and why the
    max is what it is. The actors hold their CPUs for the whole stage; the read/decode tasks need
    ``embed.reader_cpus`` more, or the stream starves and the stage waits forever: the pool is
    capped to leave them, and a pool whose *minimum* cannot leave them is refused (exit 2)."""
    fit = math.floor((cpus - embed.reader_cpus) / embed.cpus_per_actor + 1e-9) if cpus else embed.num_actors
    why = f"the cluster's {cpus:g} CPUs less embed.reader_cpus={embed.reader_cpus:g} for the readers"
    if gpus_per_actor > 0 and gpus > 0 and math.floor(gpus / gpus_per_actor + 1e-9) < fit:
        fit, why = math.floor(gpus / gpus_per_actor + 1e-9), f"the cluster's {gpus:g} GPUs"
    if embed.min_actors > fit:
        raise ConfigError(
            f"embed.min_actors ({embed.min_actors}) x embed.cpus_per_actor ({embed.cpus_per_actor:g}) does not fit "
            f"{why} (room for {max(fit, 0)} actor(s)): lower min_actors or cpus_per_actor, or add nodes "
            "(torch_threads can stay higher than cpus_per_actor)"
        )
    if fit < embed.num_actors:
        return embed.min_actors, fit, f"embed.num_actors={embed.num_actors} capped to {fit} by {why}"
    return embed.min_actors, embed.num_actors, f"up to embed.num_actors={embed.num_actors}"
