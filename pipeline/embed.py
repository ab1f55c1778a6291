"""Embed stage: stream WebDataset shards through open_clip model replicas (Ray Data actor pool), or
read DataComp precomputed embeddings, and write one committed parquet part per input shard.

Data flow (open_clip encoder)::

    one row per pending shard ──► read+decode map task (CPU, parallel, one shard per task)
        tar → samples → PIL decode → the model's own resize/crop → uint8 HxWx3, tokenised caption;
        yields fixed chunks of `embed.batch_size` samples, then one end-of-shard marker row that
        carries the shard's sample count and skip counts
    ──► ClipEmbedder actors (map_batches, actor pool, one model per actor, GPU or CPU)
        uint8 → float, the transform's normalisation, encode image & text, L2-normalise, cosine
    ──► driver: collects rows per shard; a shard is complete when its marker has arrived and as
        many rows as the marker announces; complete shards are committed *in shard order*
        (stats json, then the part), skipping uids already seen in earlier shards.

Why these choices:
* Decoding in the read tasks, never in the model actor: the actor's CPU/GPU does nothing but
  forward passes, and decoding scales with read tasks. Only uint8 pixels travel (4x less than
  float32 tensors); the normalisation is done on the model's device.
* Each read chunk is exactly one model batch (``batch_size=None`` on the actor map): batch
  composition is then a function of the shard alone, not of task timing, so two runs give
  bit-identical embeddings (batched matmuls may round differently for different batch mates).
* Commits in shard order make cross-shard duplicate handling deterministic ("the occurrence in
  the earliest shard wins") and keep committed parts a prefix, which resume relies on. The
  driver holds only the rows of shards in flight (bounded by the number of read tasks).
* A part is written only when all its rows are in, after its stats json; a killed job leaves no
  partial part, and a rerun embeds exactly the shards without a part.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterator

import numpy as np

from .config import ConfigError, InputConfig, JobConfig, PrecomputedConfig
from .runtime import cluster_gpus, init_ray
from .shards import (
    BAD_METADATA,
    DUPLICATE_UID,
    READ_BLOCK_SIZE,
    UNDECODABLE_IMAGE,
    ImageDecodeError,
    ShardError,
    decode_image,
    iter_shard_samples,
    listing,
    shard_urls,
    shards_dataset,
    verify_shards,
)
from .storage import Store, expand_urls, is_local, join
from .workdir import claim_stage_dir, commit_stage, is_committed, part_name, stage_dir

log = logging.getLogger(__name__)

STAGE = "embed"
BAD_EMBEDDING = "bad_embedding"  # precomputed encoder: a non-finite or all-zero vector
READ_WORKER_BASE_MEMORY = 640 * 2**20


# -- model specification, shared by the driver, the read tasks and the actors ---------------------

def register_model_config(name: str, config: dict[str, Any]) -> None:
    """Make an open_clip architecture config (the dict form of open_clip's model_configs/*.json)
    available under `name` in this process, exactly like the built-in ones."""
    from open_clip import factory

    if not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"open_clip model config for {name!r} needs embed_dim, vision_cfg and text_cfg")
    factory._MODEL_CONFIGS[name] = deepcopy(config)


@dataclass(frozen=True)
class ModelSpec:
    """Everything a process needs to rebuild the same model: picklable, hashable (as JSON)."""

    name: str
    pretrained: str | None
    config_json: str | None = None  # registered under `name` first when set
    seed: int = 0

    @property
    def config(self) -> dict[str, Any] | None:
        return json.loads(self.config_json) if self.config_json else None

    def ensure_registered(self) -> None:
        if self.config_json:
            register_model_config(self.name, self.config)


def model_spec(cfg: JobConfig, store: Store) -> ModelSpec:
    config_json = None
    if cfg.embed.model_config_path:
        try:
            config = store.read_json(cfg.embed.model_config_path)
        except FileNotFoundError:
            raise FileNotFoundError(f"embed.model_config_path {cfg.embed.model_config_path} does not exist") from None
        config_json = json.dumps(config, sort_keys=True)
    spec = ModelSpec(cfg.embed.model, cfg.embed.pretrained, config_json, cfg.seed)
    _check_model_exists(spec)
    return spec


def _check_model_exists(spec: ModelSpec) -> None:
    import open_clip

    spec.ensure_registered()
    if ":" not in spec.name and spec.name not in open_clip.list_models():
        raise ValueError(
            f"embed.model {spec.name!r} is not an open_clip architecture; give embed.model_config_path "
            "for a custom one (open_clip.list_models() lists the built-in names)"
        )


def _is_tag(spec: ModelSpec) -> bool:
    import open_clip

    return bool(spec.pretrained) and spec.pretrained in open_clip.list_pretrained_tags_by_model(spec.name)


def check_pretrained(spec: ModelSpec, store: Store) -> None:
    """Fail fast in the driver when `pretrained` is neither a known tag nor an existing file."""
    if not spec.pretrained or _is_tag(spec):
        return
    if not store.exists(spec.pretrained):
        raise FileNotFoundError(
            f"embed.pretrained {spec.pretrained!r} is neither an open_clip pretrained tag of {spec.name!r} "
            "nor an existing checkpoint file"
        )


def resolve_checkpoint(spec: ModelSpec, store: Store) -> str | None:
    """What to pass to open_clip as `pretrained`: a tag as is, a local file as is, and a remote
    (fsspec) checkpoint copied once to local disk (open_clip only loads local files)."""
    if not spec.pretrained or _is_tag(spec) or is_local(spec.pretrained):
        return spec.pretrained
    digest = hashlib.sha1(spec.pretrained.encode()).hexdigest()[:16]
    local = os.path.join(tempfile.gettempdir(), "d2prune-checkpoints", digest, os.path.basename(spec.pretrained))
    if not os.path.exists(local):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = f"{local}.tmp-{os.getpid()}"
        store.fs(spec.pretrained).get_file(store.path(spec.pretrained), tmp)
        os.replace(tmp, local)  # atomic: concurrent actors on one node never read a partial file
    return local


def load_model(spec: ModelSpec, store: Store, device: str = "cpu"):
    """The open_clip model in eval mode on `device`, fp32 weights (half precision is autocast).
    With ``pretrained=None`` the random weights are seeded, so every actor builds the same model."""
    import open_clip
    import torch

    spec.ensure_registered()
    torch.manual_seed(spec.seed)
    model = open_clip.create_model(spec.name, pretrained=resolve_checkpoint(spec, store), device=device)
    model.eval()
    return model


def preprocess_config(spec: ModelSpec) -> dict[str, Any]:
    """The model's own inference preprocessing (size, mean/std, interpolation, resize mode),
    obtained the way open_clip derives it, from a weightless (meta-device) build of the model plus
    the pretrained tag's settings: no weights are loaded or downloaded in the driver."""
    import open_clip
    import torch

    spec.ensure_registered()
    with torch.device("meta"):
        model = open_clip.create_model(spec.name, pretrained=None, device="meta")
    pp = dict(model.visual.preprocess_cfg)
    if _is_tag(spec):
        from open_clip.transform import merge_preprocess_dict

        tag_cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained)
        pp = merge_preprocess_dict(pp, tag_cfg)
        pp["size"] = model.visual.preprocess_cfg["size"]
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()}


@dataclass
class ImagePipeline:
    """The model's eval transform split at ToTensor: `pil_head` (resize, crop) runs in the read
    tasks and yields uint8 HxWx3; the actor does ToTensor's /255 and Normalize on its device.
    When a transform cannot be split that way, `pil_head` is the whole transform (float CHW out)."""

    pil_head: Callable
    split: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, int]

    def __call__(self, image) -> np.ndarray:
        out = self.pil_head(image)
        if self.split:
            arr = np.asarray(out, dtype=np.uint8)
            if arr.shape != (self.size[0], self.size[1], 3):
                raise ValueError(f"transform produced shape {arr.shape}, expected {self.size + (3,)}")
            return arr
        return out.numpy().astype(np.float32, copy=False)

    def empty(self, n: int) -> np.ndarray:
        if self.split:
            return np.zeros((n, self.size[0], self.size[1], 3), dtype=np.uint8)
        return np.zeros((n, 3, self.size[0], self.size[1]), dtype=np.float32)


def image_pipeline(pp: dict[str, Any]) -> ImagePipeline:
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision.transforms import Compose, Normalize, ToTensor

    cfg = PreprocessCfg(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in pp.items()})
    full = image_transform_v2(cfg, is_train=False)
    size = tuple(cfg.size) if isinstance(cfg.size, (tuple, list)) else (cfg.size, cfg.size)
    steps = list(full.transforms) if isinstance(full, Compose) else [full]
    idx = next((i for i, t in enumerate(steps) if isinstance(t, ToTensor)), None)
    if idx is not None and len(steps) == idx + 2 and isinstance(steps[idx + 1], Normalize):
        norm = steps[idx + 1]
        return ImagePipeline(Compose(steps[:idx]), True, tuple(norm.mean), tuple(norm.std), size)
    return ImagePipeline(full, False, tuple(cfg.mean), tuple(cfg.std), size)


@lru_cache(maxsize=4)
def _worker_preprocessors(spec: ModelSpec, pp_json: str):
    """Per-process cache of the image pipeline, tokenizer and its context length (built once per
    read worker)."""
    import open_clip

    spec.ensure_registered()
    tokenizer = open_clip.get_tokenizer(spec.name)
    return image_pipeline(json.loads(pp_json)), tokenizer, tokenize(tokenizer, ["x"]).shape[1]


def tokenize(tokenizer, captions: list[str]) -> np.ndarray:
    tokens = tokenizer(captions)
    return np.asarray(tokens.numpy() if hasattr(tokens, "numpy") else tokens, dtype=np.int32)


# -- read + decode (Ray Data map task, one shard per call) ---------------------------------------

def _chunk(shard_index: int, chunk: int, rows: list[tuple], tokenizer) -> dict[str, np.ndarray]:
    n = len(rows)
    return {
        "shard_index": np.full(n, shard_index, dtype=np.int64),
        "chunk": np.full(n, chunk, dtype=np.int64),
        "sample_index": np.array([r[0] for r in rows], dtype=np.int64),
        "uid": np.array([r[1] for r in rows], dtype=object),
        "key": np.array([r[2] for r in rows], dtype=object),
        "image": np.stack([r[3] for r in rows]),
        "tokens": tokenize(tokenizer, [r[4] for r in rows]),
        "is_marker": np.zeros(n, dtype=bool),
        "marker_samples": np.zeros(n, dtype=np.int64),
        "marker_skipped": np.array([""] * n, dtype=object),
    }


def _marker(shard_index: int, n_good: int, skipped: Counter, images: ImagePipeline, context: int):
    return {
        "shard_index": np.array([shard_index], dtype=np.int64),
        "chunk": np.array([-1], dtype=np.int64),
        "sample_index": np.array([-1], dtype=np.int64),
        "uid": np.array([""], dtype=object),
        "key": np.array([""], dtype=object),
        "image": images.empty(1),
        "tokens": np.zeros((1, context), dtype=np.int32),
        "is_marker": np.array([True]),
        "marker_samples": np.array([n_good], dtype=np.int64),
        "marker_skipped": np.array([json.dumps(dict(skipped), sort_keys=True)], dtype=object),
    }


def read_and_preprocess(batch: dict[str, np.ndarray], store: Store, input_cfg: InputConfig, spec: ModelSpec,
                        pp_json: str, chunk_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data generator UDF: stream each shard of `batch`, decode and preprocess its usable
    samples, yield chunks of `chunk_size` rows (numbered per shard: one chunk = one model
    forward), then the shard's end-of-shard marker."""
    images, tokenizer, context = _worker_preprocessors(spec, pp_json)
    for shard_index, url in zip(batch["shard_index"].tolist(), batch["shard"].tolist()):
        skipped: Counter = Counter()
        rows: list[tuple] = []
        n_good = 0
        for sample in iter_shard_samples(store, url, input_cfg, dedupe=True):
            if sample.problem is not None:
                skipped[sample.problem] += 1
                continue
            try:
                pixels = images(decode_image(sample.image_bytes))
            except (ImageDecodeError, ValueError, OSError):
                skipped[UNDECODABLE_IMAGE] += 1
                continue
            rows.append((sample.index, sample.uid, sample.key, pixels, sample.caption))
            if len(rows) == chunk_size:
                yield _chunk(shard_index, n_good // chunk_size, rows, tokenizer)
                n_good += len(rows)
                rows = []
        if rows:
            yield _chunk(shard_index, n_good // chunk_size, rows, tokenizer)
            n_good += len(rows)
        yield _marker(shard_index, n_good, skipped, images, context)


# -- the model actor -------------------------------------------------------------------------------

def resolve_precision(precision: str, device: str) -> str:
    import torch

    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


class ClipEncoder:
    """One open_clip model on one device: uint8 pixels + tokens in, L2-normalised embeddings and
    cosine scores out. Used by the stage's actors and by the benchmark's bare loop alike."""

    def __init__(self, spec: ModelSpec, store: Store, pp_json: str, use_gpu: bool = False,
                 precision: str = "auto", torch_threads: int | None = None):
        import torch

        if torch_threads:
            # Ray sets OMP_NUM_THREADS=<the actor's CPUs> (often 1); torch's pool must be sized
            # explicitly or a CPU actor runs its matmuls on one core.
            torch.set_num_threads(int(torch_threads))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if use_gpu and self.device == "cpu":
            log.warning("a GPU was requested but torch sees none: embedding on CPU")
        self.precision = resolve_precision(precision, self.device)
        self.model = load_model(spec, store, self.device)
        self.images = image_pipeline(json.loads(pp_json))
        self._mean = torch.tensor(self.images.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.images.std, device=self.device).view(1, 3, 1, 1)
        import open_clip

        context = tokenize(open_clip.get_tokenizer(spec.name), [""]).shape[1]
        self.dim = int(self.encode(self.images.empty(1), np.zeros((1, context), dtype=np.int32))[0].shape[1])

    def _autocast(self):
        import contextlib

        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type="cuda" if self.device.startswith("cuda") else "cpu", dtype=dtype)

    def pixels_to_tensor(self, pixels: np.ndarray):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:  # split pipeline: ToTensor (HWC->CHW, /255) + Normalize, here
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            x = (x - self._mean) / self._std
        return x

    def encode(self, pixels: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch
        import torch.nn.functional as F

        images = self.pixels_to_tensor(pixels)
        text = torch.from_numpy(np.ascontiguousarray(tokens)).long().to(self.device, non_blocking=True)
        with torch.inference_mode(), self._autocast():
            image_features = self.model.encode_image(images)
            text_features = self.model.encode_text(text)
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(text_features.float(), dim=-1)
        scores = (image_features * text_features).sum(dim=-1)
        return image_features.cpu().numpy(), text_features.cpu().numpy(), scores.cpu().numpy()


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


# -- cross-shard duplicate detection ---------------------------------------------------------------

def uid_hashes(uids) -> np.ndarray:
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little") for u in uids),
        dtype=np.uint64, count=len(uids),
    )


class UidRegistry:
    """Set of uids seen so far, as 64-bit hashes in a few sorted arrays (8 bytes per uid; a
    log-structured merge keeps inserts amortised O(log N) per uid). A 64-bit collision would
    show up as one extra counted `duplicate_uid`, never as a silent loss."""

    def __init__(self) -> None:
        self._levels: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(level) for level in self._levels)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        found = np.zeros(len(hashes), dtype=bool)
        for level in self._levels:  # never empty (add skips empty input)
            pos = np.searchsorted(level, hashes)
            pos[pos == len(level)] = 0
            found |= level[pos] == hashes
        return found

    def add(self, hashes: np.ndarray) -> None:
        if len(hashes) == 0:
            return
        self._levels.append(np.unique(hashes))
        while len(self._levels) > 1 and len(self._levels[-2]) <= 2 * len(self._levels[-1]):
            top = self._levels.pop()
            self._levels[-1] = np.union1d(self._levels[-1], top)


# -- parts -----------------------------------------------------------------------------------------

def fixed_size_list(values: np.ndarray):
    import pyarrow as pa

    values = np.ascontiguousarray(values, dtype=np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def part_table(shard: str, uids, keys, scores, image_emb: np.ndarray, text_emb: np.ndarray):
    """A part in the on-disk contract (column order and types are part of it)."""
    import pyarrow as pa

    n = len(uids)
    return pa.table({
        "uid": pa.array(list(uids), type=pa.string()),
        "shard": pa.array([shard] * n, type=pa.string()),
        "key": pa.array(list(keys), type=pa.string()),
        "clip_score": pa.array(np.asarray(scores, dtype=np.float32), type=pa.float32()),
        "image_embedding": fixed_size_list(image_emb),
        "text_embedding": fixed_size_list(text_emb),
    })


@dataclass
class ShardResult:
    """A complete shard's usable rows (in shard order) and its skip counts."""

    uids: list[str]
    keys: list[str]
    scores: np.ndarray
    image: np.ndarray
    text: np.ndarray
    skipped: Counter = field(default_factory=Counter)


class _ShardAccumulator:
    """Rows of one shard arriving out of order from the actors, until its marker says it is whole."""

    def __init__(self) -> None:
        self.chunks: list[dict[str, np.ndarray]] = []
        self.rows = 0
        self.expected: int | None = None
        self.skipped: Counter = Counter()

    def add(self, rows: dict[str, np.ndarray]) -> None:
        self.chunks.append(rows)
        self.rows += len(rows["uid"])

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.rows == self.expected

    def result(self) -> ShardResult:
        if not self.chunks:
            return ShardResult([], [], np.zeros(0, np.float32), np.zeros((0, 0), np.float16),
                               np.zeros((0, 0), np.float16), self.skipped)
        cat = {k: np.concatenate([c[k] for c in self.chunks]) for k in self.chunks[0]}
        order = np.argsort(cat["sample_index"], kind="stable")
        return ShardResult([str(u) for u in cat["uid"][order]], [str(k) for k in cat["key"][order]],
                           cat["clip_score"][order], cat["image_embedding"][order],
                           cat["text_embedding"][order], self.skipped)


class PartCommitter:
    """Commits complete shards in shard order: drops uids seen in earlier shards (counted as
    `duplicate_uid`), writes ``part-NNNNN.stats.json`` then ``part-NNNNN.parquet``."""

    def __init__(self, store: Store, cfg: JobConfig, urls: list[str], pending: list[int], committed: list[int],
                 on_part_committed: Callable[[int], None] | None = None):
        self.store, self.cfg, self.urls = store, cfg, urls
        self.directory = stage_dir(cfg, STAGE)
        self.queue = sorted(pending)
        self.position = 0
        self.ready: dict[int, ShardResult] = {}
        self.registry = UidRegistry()
        self.on_disk = sorted(committed)  # parts committed by earlier runs, loaded as they come due
        self._disk_position = 0
        self.on_part_committed = on_part_committed
        self.stats: dict[int, dict[str, Any]] = {}
        self.dim: int | None = None

    def add(self, index: int, result: ShardResult) -> None:
        self.ready[index] = result
        while self.position < len(self.queue) and self.queue[self.position] in self.ready:
            index = self.queue[self.position]
            self._register_committed_below(index)
            self._commit(index, self.ready.pop(index))
            self.position += 1

    @property
    def done(self) -> bool:
        return self.position == len(self.queue)

    def _register_committed_below(self, index: int) -> None:
        # Only parts *before* this shard decide whether its uids are duplicates, as in a fresh run.
        while self._disk_position < len(self.on_disk) and self.on_disk[self._disk_position] < index:
            done = self.on_disk[self._disk_position]
            uids = self.store.read_parquet(join(self.directory, part_name(done) + ".parquet"), columns=["uid"])
            self.registry.add(uid_hashes(uids.column("uid").to_pylist()))
            self._disk_position += 1

    def _commit(self, index: int, result: ShardResult) -> None:
        url = self.urls[index]
        skipped = Counter(result.skipped)
        hashes = uid_hashes(result.uids)
        keep = ~self.registry.contains(hashes)
        # also within the shard (the reader dedupes already; precomputed files may not be)
        _, first = np.unique(hashes, return_index=True)
        unique = np.zeros(len(hashes), dtype=bool)
        unique[first] = True
        keep &= unique
        if (~keep).any():
            skipped[DUPLICATE_UID] += int((~keep).sum())
        idx = np.flatnonzero(keep)
        if result.image.ndim == 2 and result.image.shape[1] > 0:
            self.dim = result.image.shape[1]
        if self.dim is None:
            raise RuntimeError(f"embedding dimension unknown for the empty shard {url}")
        # an empty part still has the D-sized list type, so every part has one schema
        image = result.image[idx] if len(idx) else np.zeros((0, self.dim), np.float16)
        text = result.text[idx] if len(idx) else np.zeros((0, self.dim), np.float16)
        table = part_table(url, [result.uids[i] for i in idx], [result.keys[i] for i in idx],
                           result.scores[idx], image, text)
        stats = {"shard": url, "samples": len(idx), "skipped": dict(sorted(skipped.items()))}
        name = part_name(index)
        self.store.write_json(join(self.directory, name + ".stats.json"), stats)
        self.store.write_parquet(join(self.directory, name + ".parquet"), table)
        self.registry.add(hashes[idx])
        self.stats[index] = stats
        if skipped:
            log.warning("shard %s: %d samples embedded, skipped %s", url, len(idx),
                        ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
        else:
            log.info("shard %s: %d samples embedded", url, len(idx))
        if self.on_part_committed is not None:
            self.on_part_committed(index)


# -- the stage --------------------------------------------------------------------------------------

def committed_parts(store: Store, cfg: JobConfig, n_shards: int) -> list[int]:
    names = set(store.ls(stage_dir(cfg, STAGE)))
    return [i for i in range(n_shards) if part_name(i) + ".parquet" in names]


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


def model_embed_dim(spec: ModelSpec) -> int | None:
    """The architecture's embedding width (for the schema of parts whose shard has no usable
    sample); None for hub models, whose dimension is then taken from the first embedded rows."""
    from open_clip import get_model_config

    spec.ensure_registered()
    config = get_model_config(spec.name) if ":" not in spec.name else None
    return int(config["embed_dim"]) if config and "embed_dim" in config else None


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


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


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


def _run_open_clip(cfg: JobConfig, store: Store, urls: list[str], pending: list[int],
                   committer: PartCommitter) -> dict[str, Any]:
    spec = model_spec(cfg, store)
    check_pretrained(spec, store)
    pp = preprocess_config(spec)
    pp_json = json.dumps(pp, sort_keys=True)
    gpus = cfg.embed.num_gpus_per_actor
    if gpus < 0:
        gpus = 1.0 if cluster_gpus() > 0 else 0.0
    use_gpu = gpus > 0
    check_cpu_budget(cfg.embed.num_actors, cfg.embed.cpus_per_actor, cluster_cpus())
    threads = cfg.embed.torch_threads or max(1, int(round(cfg.embed.cpus_per_actor)))
    device = "cuda" if use_gpu else "cpu"
    precision = cfg.embed.precision if cfg.embed.precision != "auto" else ("bf16/fp16" if use_gpu else "fp32")
    log.info("embedding %d shard(s) with %s (pretrained=%s) on %d %s actor(s), batch %d, preprocessing %s",
             len(pending), spec.name, spec.pretrained, cfg.embed.num_actors, device, cfg.embed.batch_size, pp)

    committer.dim = model_embed_dim(spec)
    ds = build_embed_dataset(cfg, store, spec, pp_json, [(i, urls[i]) for i in pending], gpus, threads)
    partial: dict[int, _ShardAccumulator] = {}
    forward_times: Counter = Counter()  # forward end time -> rows (for the steady-state rate)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        markers = np.asarray(batch["is_marker"], dtype=bool)
        shard_index = np.asarray(batch["shard_index"])
        forward_times.update(np.asarray(batch["embedded_at"])[~markers].tolist())
        for index in np.unique(shard_index).tolist():
            acc = partial.setdefault(index, _ShardAccumulator())
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


# -- precomputed (DataComp metadata parquet + npz) --------------------------------------------------

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
        raise ValueError(f"embed.precomputed: {len(metadata)} metadata files but {len(embeddings)} embedding files")
    if len(metadata) != n_shards:
        raise ValueError(
            f"embed.precomputed.metadata has {len(metadata)} files but input.shards has {n_shards}; "
            "file i must hold the embeddings of shard i"
        )
    return metadata, embeddings


def _run_precomputed(cfg: JobConfig, store: Store, urls: list[str], pending: list[int],
                     committer: PartCommitter) -> dict[str, Any]:
    import ray

    pc = cfg.embed.precomputed
    metadata, embeddings = precomputed_files(cfg, len(urls))
    load = ray.remote(num_cpus=1)(_load_precomputed)
    window = max(2, int(cluster_cpus()))
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


def _verify_precomputed_inputs(cfg: JobConfig, store: Store, n_shards: int) -> None:
    metadata, embeddings = precomputed_files(cfg, n_shards)
    files = metadata + embeddings
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        exists = list(pool.map(store.exists, files))
    missing = [f for f, ok in zip(files, exists) if not ok]
    if missing:
        raise ShardError(f"{len(missing)} precomputed embedding file(s) not found:\n{listing(missing)}")


def run_embed_stage(cfg: JobConfig, store: Store,
                    on_part_committed: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Embed every input shard not yet committed; return the stage's stats (also `_stats.json`).

    `on_part_committed(index)` is called after each part commit (progress hooks; tests use it to
    interrupt a run)."""
    directory = stage_dir(cfg, STAGE)
    if is_committed(store, cfg, STAGE):
        log.info("embed stage already committed in %s: skipping", directory)
        return store.read_json(join(directory, "_stats.json"))
    urls = shard_urls(cfg.input)
    # every input is checked before any work, so a typo fails in seconds, not hours in
    if cfg.embed.encoder == "precomputed":
        _verify_precomputed_inputs(cfg, store, len(urls))
    else:
        verify_shards(store, urls)
    init_ray(cfg.ray)
    claim_stage_dir(store, cfg, STAGE)
    committed = committed_parts(store, cfg, len(urls))
    done = set(committed)
    pending = [i for i in range(len(urls)) if i not in done]
    if committed:
        log.info("resuming embed stage: %d of %d shard(s) already committed", len(committed), len(urls))
    committer = PartCommitter(store, cfg, urls, pending, committed, on_part_committed)
    started = time.perf_counter()
    if cfg.embed.encoder == "precomputed":
        info = _run_precomputed(cfg, store, urls, pending, committer) if pending else {"encoder": "precomputed"}
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
    commit_stage(store, cfg, STAGE, stats)
    log.info("embed: %d samples (%d this run) in %.1f s, %.1f samples/s; skipped: %s",
             stats["samples"], new_samples, seconds, stats["samples_per_s"],
             ", ".join(f"{k}={v}" for k, v in stats["skipped"].items()) or "none")
    return stats
