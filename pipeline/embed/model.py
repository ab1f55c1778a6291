"""The embedding model: which open_clip model, its weights, its preprocessing, and one encoder.

Plain torch + open_clip, no Ray: the read tasks use :func:`image_pipeline` and :func:`tokenize`,
the actors (:mod:`.dataset`) and the benchmark's bare loop use :class:`ClipEncoder`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from ..config import JobConfig
from ..errors import ConfigError
from ..storage import Store, is_local

log = logging.getLogger(__name__)


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
    cache_namespace: str = "checkpoints"  # node-local cache of remote/shipped checkpoints (removed at commit)

    @property
    def config(self) -> dict[str, Any] | None:
        return json.loads(self.config_json) if self.config_json else None

    def ensure_registered(self) -> None:
        if self.config_json:
            register_model_config(self.name, self.config)


def checkpoint_namespace(cfg: JobConfig) -> str:
    """The node-local cache of this job's checkpoint copies: one per workdir, so removing it when
    the embed stage commits never touches another job's copy in progress on the same node."""
    return "checkpoints-" + hashlib.sha256(cfg.workdir.encode()).hexdigest()[:12]


def model_spec(cfg: JobConfig, store: Store) -> ModelSpec:
    config_json = None
    if cfg.embed.model_config_path:
        try:
            config = store.read_json(cfg.embed.model_config_path)
        except FileNotFoundError:
            raise ConfigError(f"embed.model_config_path {cfg.embed.model_config_path} does not exist") from None
        except ValueError as err:
            raise ConfigError(f"embed.model_config_path {cfg.embed.model_config_path} is not JSON ({err})") from None
        config_json = json.dumps(config, sort_keys=True)
    spec = ModelSpec(cfg.embed.model, cfg.embed.pretrained, config_json, cfg.seed, checkpoint_namespace(cfg))
    _check_model_exists(spec)
    return spec


def _check_model_exists(spec: ModelSpec) -> None:
    import open_clip

    try:
        spec.ensure_registered()
    except ValueError as err:
        raise ConfigError(f"embed.model_config_path: {err}") from None
    if ":" not in spec.name and spec.name not in open_clip.list_models():
        raise ConfigError(
            f"embed.model {spec.name!r} is not an open_clip architecture; give embed.model_config_path "
            "for a custom one (open_clip.list_models() lists the built-in names)"
        )


def _is_tag(spec: ModelSpec) -> bool:
    import open_clip

    return bool(spec.pretrained) and spec.pretrained in open_clip.list_pretrained_tags_by_model(spec.name)


def check_pretrained(spec: ModelSpec, store: Store) -> None:
    """Fail fast in the driver (ConfigError, exit 2) when `pretrained` is neither a known tag nor a
    readable checkpoint file: missing, or not a checkpoint at all (a truncated download, an HTML
    error page). Only the file's structure is read (its zip directory or safetensors header, a few
    KB), not its weights; a checkpoint of another architecture is found when the actors load it."""
    if not spec.pretrained or _is_tag(spec):
        return
    if not store.exists(spec.pretrained):
        raise ConfigError(
            f"embed.pretrained {spec.pretrained!r} is neither an open_clip pretrained tag of {spec.name!r} "
            "nor an existing checkpoint file"
        )
    problem = checkpoint_problem(store, spec.pretrained)
    if problem:
        raise ConfigError(f"embed.pretrained {spec.pretrained}: not a readable checkpoint ({problem})")


def checkpoint_problem(store: Store, url: str) -> str | None:
    """Why the file at `url` cannot be a checkpoint open_clip loads (torch zip or legacy pickle,
    or safetensors), from its structure alone; None when it looks whole."""
    import struct
    import zipfile

    size = store.size(url)
    with store.open(url, "rb") as fh:
        head = fh.read(8)
        if url.endswith(".safetensors"):
            if len(head) < 8:
                return f"{size} bytes, too short for a safetensors header"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, 100 * 2**20):
                return f"safetensors header of {header_len} bytes in a {size}-byte file (truncated?)"
            try:
                header = json.loads(fh.read(header_len))
            except ValueError as err:
                return f"safetensors header is not JSON ({err})"
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
            if 8 + header_len + max(ends, default=0) > size:
                return f"tensors end at byte {8 + header_len + max(ends)} of a {size}-byte file (truncated)"
            return None
        if head[:1] == b"\x80":  # torch's legacy (pre-1.6) format: a pickle stream
            return None
        if head[:4] != b"PK\x03\x04":
            return f"starts with {head[:8]!r}: neither a torch zip, a legacy torch pickle nor safetensors"
        fh.seek(0)
        try:
            with zipfile.ZipFile(fh) as archive:  # reads the central directory at the end only
                if not any(n.endswith("data.pkl") for n in archive.namelist()):
                    return "a zip file without data.pkl: not a torch.save checkpoint"
        except zipfile.BadZipFile as err:
            return f"{err} (truncated or corrupt)"
    return None


def is_local_checkpoint(spec: ModelSpec) -> bool:
    """`pretrained` names a checkpoint file on the local filesystem (not a tag, not a URL)."""
    return bool(spec.pretrained) and not _is_tag(spec) and is_local(spec.pretrained)


def resolve_checkpoint(spec: ModelSpec, store: Store) -> str | None:
    """What to pass to open_clip as `pretrained`: a tag as is, a local file as is, and a remote
    (fsspec) checkpoint copied once per node (open_clip only loads local files; the copy is keyed
    by the object's content identity, so a replaced checkpoint is never served stale)."""
    if not spec.pretrained or _is_tag(spec) or is_local(spec.pretrained):
        return spec.pretrained
    return store.node_local_copy([spec.pretrained], spec.cache_namespace)[0]


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


@contextmanager
def _without_log(prefix: str):
    """Drop root-logger records starting with `prefix` (open_clip logs through the root logger)."""
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(prefix)

    dropper = _Drop()
    root = logging.getLogger()
    root.addFilter(dropper)
    try:
        yield
    finally:
        root.removeFilter(dropper)


def preprocess_config(spec: ModelSpec) -> dict[str, Any]:
    """The model's own inference preprocessing (size, mean/std, interpolation, resize mode),
    obtained the way open_clip derives it, from a weightless (meta-device) build of the model plus
    the pretrained tag's settings: no weights are loaded or downloaded in the driver."""
    import open_clip
    import torch

    spec.ensure_registered()
    # open_clip logs "No pretrained weights loaded ... initialized randomly" for this weightless
    # build: true of it, but read as a warning about the job's model (whose checkpoint the actors load)
    with torch.device("meta"), _without_log("No pretrained weights loaded"):
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
def worker_preprocessors(spec: ModelSpec, pp_json: str):
    """Per-process cache of the image pipeline, tokenizer and its context length (built once per
    read worker)."""
    import open_clip

    spec.ensure_registered()
    tokenizer = open_clip.get_tokenizer(spec.name)
    return image_pipeline(json.loads(pp_json)), tokenizer, tokenize(tokenizer, ["x"]).shape[1]


def tokenize(tokenizer, captions: list[str]) -> np.ndarray:
    tokens = tokenizer(captions)
    return np.asarray(tokens.numpy() if hasattr(tokens, "numpy") else tokens, dtype=np.int32)


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

        self.context = context = tokenize(open_clip.get_tokenizer(spec.name), [""]).shape[1]
        self.dim = int(self.encode(self.images.empty(1), np.zeros((1, context), dtype=np.int32))[0].shape[1])

    def _autocast(self):
        import contextlib

        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type="cuda" if self.device.startswith("cuda") else "cpu", dtype=dtype)

    def to_device(self, array: np.ndarray):
        """A host array on the model's device. On CUDA through pinned (page-locked) memory with a
        non-blocking copy: the copy is queued behind the running forward instead of waiting for it
        (what lets :class:`.dataset.ClipEmbedder` prepare the next batch while this one runs)."""
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.startswith("cuda"):
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def normalise(self, images):
        """uint8 NCHW on the device -> the model's float input (ToTensor's /255, then Normalize)."""
        return (images.float().div_(255.0) - self._mean) / self._std

    def pixels_to_tensor(self, pixels: np.ndarray):
        x = self.to_device(pixels)
        if x.dtype.is_floating_point:  # unsplit pipeline: the read tasks did the whole transform
            return x
        return self.normalise(x.permute(0, 3, 1, 2))  # split pipeline: HWC -> CHW here

    def forward(self, images, tokens):
        """Queue one batch's forward (model input on the device, tokens as an array): the outputs
        stay on the device until :meth:`collect`, so on a GPU the host is free meanwhile."""
        import torch
        import torch.nn.functional as F

        text = self.to_device(np.asarray(tokens)).long()
        image_features = self._image_features(images)
        with torch.inference_mode(), self._autocast():
            text_features = self.model.encode_text(text)
        text_features = F.normalize(text_features.float(), dim=-1)
        scores = (image_features * text_features).sum(dim=-1)
        return image_features, text_features, scores

    @staticmethod
    def collect(outputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(t.cpu().numpy() for t in outputs)

    def encode(self, pixels: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.collect(self.forward(self.pixels_to_tensor(pixels), tokens))

    def _image_features(self, images):
        """L2-normalised image vectors of a model input on the device (left there)."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode(), self._autocast():
            features = self.model.encode_image(images)
        return F.normalize(features.float(), dim=-1)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """The image tower alone (no caption to score): the same image vectors :meth:`encode` gives."""
        return self._image_features(self.pixels_to_tensor(pixels)).cpu().numpy()


def probe_batch_size(try_batch: Callable[[int], int], capacity: int, start: int = 32, limit: int = 1024) -> int:
    """The largest power-of-two batch (`start`..`limit`) whose forward peaks under `capacity`
    bytes: doubling from `start` while ``try_batch(b)`` (the peak bytes of a forward of b samples)
    stays under it; a batch that raises out-of-memory counts as over. Halves below `start` when
    even that does not fit (1 at the least). Pure logic, so CPU tests check it with a fake
    ``try_batch``; :func:`gpu_batch_size` gives it the real one."""
    def fits(b: int) -> bool:
        try:
            return try_batch(b) <= capacity
        except MemoryError:
            return False

    batch = start
    if not fits(batch):
        while batch > 1 and not fits(batch):
            batch //= 2
        return batch
    while batch * 2 <= limit and fits(batch * 2):
        batch *= 2
    return batch


def gpu_batch_size(encoder: "ClipEncoder", context: int, share: float, fraction: float = 0.8) -> int:
    """`embed.batch_size: auto` on a GPU: :func:`probe_batch_size` against `fraction` of the
    device's memory times `share` (1/actors_per_gpu: the actors on one GPU split it), with the
    model's real forward on random inputs. The 20% left is for the decoded full-size JPEGs of
    device decode, the CUDA context and the allocator's fragmentation."""
    import torch

    device = torch.device(encoder.device)
    total = torch.cuda.get_device_properties(device).total_memory
    size = encoder.images.size

    def try_batch(b: int) -> int:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            images = encoder.normalise(torch.randint(0, 256, (b, 3, *size), dtype=torch.uint8, device=device))
            encoder.collect(encoder.forward(images, np.ones((b, context), dtype=np.int32)))
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError as err:
            raise MemoryError(str(err)) from None
        finally:
            torch.cuda.empty_cache()
        return int(torch.cuda.max_memory_allocated(device))

    return probe_batch_size(try_batch, int(total * fraction * share))


def model_embed_dim(spec: ModelSpec) -> int | None:
    """The architecture's embedding width (for the schema of parts whose shard has no usable
    sample); None for hub models, whose dimension is then taken from the first embedded rows."""
    from open_clip import get_model_config

    spec.ensure_registered()
    config = get_model_config(spec.name) if ":" not in spec.name else None
    return int(config["embed_dim"]) if config and "embed_dim" in config else None
