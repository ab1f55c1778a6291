"""The embed stage on Ray Data: shards → read+decode tasks → model actor pool → rows with embeddings.

Why these choices:
* Decoding in the read tasks, never in the model actor: the actor's CPU/GPU does nothing but
  forward passes, and decoding scales with read tasks. Only uint8 pixels travel (4x less than
  float32 tensors); the normalisation is done on the model's device.
* Each read chunk is exactly one model batch (``batch_size=None`` on the actor map): batch
  composition is then a function of the shard alone, not of task timing, so two runs give
  bit-identical embeddings (batched matmuls may round differently for different batch mates).
"""

from __future__ import annotations

import json
import time

import numpy as np

from ..config import ConfigError, JobConfig
from ..formats.webdataset import READ_BLOCK_SIZE
from ..storage import Store
from .model import ClipEncoder, ModelSpec
from .read import read_and_preprocess

READ_WORKER_BASE_MEMORY = 640 * 2**20


class ClipEmbedder(ClipEncoder):
    """The Ray Data callable class (one instance per actor, model loaded once).

    A Ray Data block may hold several read chunks (Ray coalesces small outputs); each chunk gets
    its own forward pass, so a sample's batch mates are always its chunk (determinism) and the
    forward batch is `embed.batch_size` however blocks are shaped."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        is_marker = np.asarray(batch["is_marker"], dtype=bool)
        n = len(is_marker)
        image_emb = np.zeros((n, self.dim), dtype=np.float16)
        text_emb = np.zeros((n, self.dim), dtype=np.float16)
        scores = np.zeros(n, dtype=np.float32)
        embedded_at = np.zeros(n, dtype=np.float64)
        chunk_id = np.stack([np.asarray(batch["shard_index"]), np.asarray(batch["chunk"])], axis=1)
        real = np.flatnonzero(~is_marker)
        # runs of rows of one chunk (rows of a chunk are contiguous): cut where the chunk id changes
        cuts = np.flatnonzero((chunk_id[real[1:]] != chunk_id[real[:-1]]).any(axis=1)) + 1
        for rows in np.split(real, cuts) if len(real) else []:
            img, txt, score = self.encode(batch["image"][rows], batch["tokens"][rows])
            image_emb[rows] = img.astype(np.float16)
            text_emb[rows] = txt.astype(np.float16)
            scores[rows] = score.astype(np.float32)
            embedded_at[rows] = time.time()
        out = {k: batch[k] for k in ("shard_index", "sample_index", "uid", "key", "is_marker",
                                     "marker_samples", "marker_skipped")}
        out.update(image_embedding=image_emb, text_embedding=text_emb, clip_score=scores,
                   embedded_at=embedded_at)
        return out


def shards_dataset(shards: list[tuple[int, str]]):
    """A Ray Dataset with one row ``{"shard_index", "shard"}`` per shard and one block per row, so
    each downstream map task reads exactly one shard (the unit of parallelism and of commit)."""
    import ray.data

    items = [{"shard_index": int(i), "shard": url} for i, url in shards]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


def build_embed_dataset(cfg: JobConfig, store: Store, spec: ModelSpec, pp_json: str,
                        shards: list[tuple[int, str]], gpus: float, threads: int):
    """The streaming Ray Dataset: shards -> read+decode tasks -> model actor pool -> rows with
    embeddings (plus one marker row per shard)."""
    import ray.data

    use_gpu = gpus > 0
    pp = json.loads(pp_json)
    ds = shards_dataset(shards)
    # A read chunk is one model batch; make sure Ray Data does not split it (see module docstring).
    # Set on this dataset's own context (derived datasets inherit it; other stages are unaffected).
    context = ds.context
    size = pp["size"] if isinstance(pp["size"], list) else [pp["size"], pp["size"]]
    # float32 pixels (an upper bound: the split pipeline ships uint8) + tokens and strings
    chunk_bytes = cfg.embed.batch_size * (size[0] * size[1] * 3 * 4 + 4096)
    # Blocks are cut at whole chunks as long as a block never grows past 1.5x the target (Ray
    # then slices it): with a target of >= 4 chunks it stays <= 1.25x.
    context.target_max_block_size = max(context.target_max_block_size or 0, 4 * chunk_bytes)
    ds = ds.map_batches(
        read_and_preprocess,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"store": store, "input_cfg": cfg.input, "spec": spec, "pp_json": pp_json,
                   "chunk_size": cfg.embed.batch_size},
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
        batch_size=None,  # one read chunk = one model batch (determinism)
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.embed.num_actors),
        fn_constructor_kwargs={"spec": spec, "store": store, "pp_json": pp_json, "use_gpu": use_gpu,
                               "precision": cfg.embed.precision, "torch_threads": threads},
        num_gpus=gpus if use_gpu else None,
        num_cpus=cfg.embed.cpus_per_actor,
    )


def check_cpu_budget(num_actors: int, cpus_per_actor: float, total_cpus: float) -> None:
    """The model actors hold their CPUs for the whole stage; the read/decode tasks need at least
    one more, or the stream starves and the stage waits forever. Refuse that up front."""
    reserved = num_actors * cpus_per_actor
    if total_cpus and reserved > total_cpus - 1:
        raise ConfigError(
            f"embed.num_actors ({num_actors}) x embed.cpus_per_actor ({cpus_per_actor}) reserves "
            f"{reserved:g} of the cluster's {total_cpus:g} CPUs, leaving less than one for reading and "
            "decoding shards: lower num_actors or cpus_per_actor (torch_threads can stay higher)"
        )
