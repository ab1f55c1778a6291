"""Typed job configuration, loaded from YAML.

One YAML file describes one job. Every field has a default and a description; unknown keys are
errors that name the key (pydantic ``extra="forbid"``), so a typo never silently falls back to a
default. ``--set section.key=value`` overrides are applied before validation.

Every rule that involves several fields is a validator here, so a config that cannot work fails
when it is loaded, before any work (exit 2). Which settings each stage's output depends on is
declared by the stage itself (:mod:`pipeline.stage`), not here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

__all__ = ["ConfigError", "JobConfig", "config_from_dict", "load_config"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Section):
    """Object-store options, passed to s3fs (and through it to pyarrow).

    Credentials are never put here: they come from the usual AWS environment variables, shared
    credentials file or instance profile, exactly as boto does it.
    """

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint override (MinIO, Ceph, R2, a local moto server)."
    )
    anon: bool = Field(False, description="Anonymous access (public buckets).")
    region: str | None = Field(None, description="S3 region; default from the AWS environment.")
    profile: str | None = Field(None, description="AWS profile name from the shared credentials file.")


class InputConfig(_Section):
    shards: str | list[str] = Field(
        ...,
        description="WebDataset shards: one URL, a brace pattern ('s3://b/pool/{00000..00099}.tar') "
        "or a list of either. Any fsspec URL or local path.",
    )
    image_exts: list[str] = Field(
        ["jpg", "jpeg", "png", "webp"], description="Sample member extensions holding the image, in order of preference."
    )
    caption_ext: str = Field("txt", description="Sample member extension holding the caption.")
    meta_ext: str = Field("json", description="Sample member extension holding metadata (with 'uid' when present).")


class PrecomputedConfig(_Section):
    """DataComp-style precomputed embeddings: one metadata parquet + one .npz per shard."""

    metadata: str | list[str] = Field(
        ..., description="Parquet files (URL/brace pattern/list) with uid, key and the similarity column."
    )
    embeddings: str | list[str] | None = Field(
        None,
        description="Matching .npz files; default: the metadata paths with '.parquet' replaced by '.npz'.",
    )
    image_key: str = Field("l14_img", description="Array name of image embeddings in the .npz.")
    text_key: str = Field("l14_txt", description="Array name of text embeddings in the .npz.")
    score_column: str = Field("clip_l14_similarity_score", description="Metadata column used as clip_score.")


class EmbedConfig(_Section):
    encoder: Literal["open_clip", "precomputed"] = Field(
        "open_clip", description="Compute embeddings with open_clip, or read DataComp precomputed ones."
    )
    model: str = Field("ViT-B-32", description="open_clip architecture name.")
    pretrained: str | None = Field(
        None,
        description="open_clip pretrained tag (e.g. 'laion2b_s34b_b79k'), or a local/fsspec checkpoint path; "
        "null = random weights (tests only).",
    )
    model_config_path: str | None = Field(
        None,
        description="Optional open_clip model config JSON (like open_clip's model_configs/*.json) registered "
        "under `model` before loading: how small custom architectures are used.",
    )
    batch_size: int = Field(256, gt=0, description="Images per model forward.")
    num_actors: int = Field(1, gt=0, description="Embedding actors (model replicas) in the actor pool.")
    num_gpus_per_actor: float = Field(
        -1, description="GPUs per actor; -1 = 1 when the cluster has GPUs, else 0 (CPU fallback)."
    )
    cpus_per_actor: float = Field(1, gt=0, description="CPUs reserved per actor.")
    torch_threads: int | None = Field(
        None, description="torch intra-op threads inside a CPU actor; null = the actor's CPU count. Part of the embed "
        "stage's fingerprint: on some CPUs the last bit of float32 results depends on it."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on GPU (fp16 where bf16 is unsupported), fp32 on CPU."
    )
    precomputed: PrecomputedConfig | None = Field(None, description="Required when encoder = precomputed.")

    @model_validator(mode="after")
    def _precomputed_needs_paths(self) -> "EmbedConfig":
        if self.encoder == "precomputed" and self.precomputed is None:
            raise ValueError("embed.precomputed is required when embed.encoder is 'precomputed'")
        return self


class GraphConfig(_Section):
    vector: Literal["image", "text", "image+text"] = Field(
        "image", description="Embedding the graph is built on (L2-normalised; image+text is concatenated)."
    )
    k: int = Field(10, gt=0, description="Neighbours per node.")
    index: Literal["flat", "ivfflat", "ivfpq"] = Field(
        "ivfflat", description="FAISS index: exact flat, IVF-Flat, or IVF-PQ for pools too big for flat vectors."
    )
    nlist: int | None = Field(None, gt=0, description="IVF lists; null = about 4*sqrt(N), clamped to the training size.")
    nprobe: int = Field(16, gt=0, description="IVF lists searched per query.")
    pq_m: int = Field(32, gt=0, description="PQ sub-quantisers (ivfpq); must divide the vector dimension.")
    pq_bits: int = Field(8, gt=0, description="Bits per PQ code (ivfpq).")
    train_size: int = Field(200_000, gt=0, description="Vectors sampled (seeded) to train the quantiser.")
    distance: Literal["sqeuclidean", "euclidean"] = Field(
        "sqeuclidean", description="Edge distance: squared L2 (what FAISS returns) or plain L2."
    )
    parts_per_task: int = Field(8, gt=0, description="Embedding parts added/searched per Ray task.")
    recall_sample: int = Field(1000, ge=0, description="Nodes whose kNN recall is checked against exact search.")


class SelectConfig(_Section):
    method: Literal["d2", "random", "score_topk", "ccs", "moderate", "kcenter"] = Field(
        "d2", description="Selection method; the baselines use the same budget."
    )
    prune_rate: float = Field(0.7, ge=0.0, le=1.0, description="Fraction dropped; budget = round((1-p)*N).")
    score: str = Field("clip_score", description="Difficulty/importance column (higher = more worth keeping).")
    score_file: str | None = Field(
        None, description="Optional parquet (URL) with 'uid' and the `score` column, joined by uid."
    )
    score_offset: float | None = Field(
        None, description="Constant added to scores; null = shift by -min(score) so they are non-negative."
    )
    beta: float = Field(0.0, ge=0.0, lt=1.0, description="Pre-filter: drop this fraction of lowest scores first.")
    gamma_forward: float = Field(1.0, ge=0.0, description="Forward message-passing kernel width.")
    gamma_reverse: float = Field(1.0, ge=0.0, description="Reverse message-passing kernel width.")
    forward_rounds: int = Field(1, ge=1, description="Forward message-passing rounds.")
    partitions: int | Literal["auto", "cells"] = Field(
        "auto",
        description="How the pool is split for the distributed greedy; the result is the same for every choice "
        "(exact D2). 'auto' = max(ceil(N / partition_max_nodes), the cluster's CPUs when it has >= 4 and each "
        "partition keeps >= 250k nodes); 'cells' = one partition per IVF cell; an integer = that many balanced "
        "partitions built from whole cells.",
    )
    partition_max_nodes: int = Field(
        10_000_000,
        gt=0,
        description="'auto': most nodes one partition holds (a worker needs ~300 bytes per node of its partitions).",
    )
    approximate: bool = Field(
        False, description="The old approximation: each partition its own greedy on its internal edges with a share "
        "of the budget (`budget_mode`), merged by pick score; reports its overlap with the exact selection."
    )
    budget_mode: Literal["proportional", "uniform"] = Field(
        "proportional", description="approximate: how the budget is split over partitions (spec section 6)."
    )
    exact_check_max_n: int = Field(
        2_000_000, ge=0, description="approximate: up to this N the stage also runs the exact greedy and reports the overlap."
    )
    keep_rates: list[float] = Field(
        [], description="Extra keep fractions served by the same run (D2's order is a prefix order): the greedy runs "
        "to the largest budget, selected.parquet ranks every node up to it and subset_keep{rate}.npy is written per "
        "rate; the configured prune_rate's selection stays the one written (the `selected` column)."
    )
    workers: int | None = Field(
        None, gt=0, description="Partition workers (processes holding partitions across rounds); null = the cluster's "
        "CPUs, at most one per partition."
    )
    worker_memory_mb: int | None = Field(
        None, gt=0, description="Memory a worker may use for the partitions it keeps resident; the others are parked on "
        "node-local disk between uses (and 'auto' makes partitions no larger). null = on Ray, the worker's share of its "
        "node's memory; in one process, no limit."
    )
    ccs_strata: int = Field(50, gt=0, description="CCS: number of score strata.")

    @field_validator("partitions")
    @classmethod
    def _positive_partitions(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be 'auto', 'cells' or an integer >= 1")
        return value

    @field_validator("keep_rates")
    @classmethod
    def _keep_rates_are_fractions(cls, value: list[float]) -> list[float]:
        bad = [r for r in value if not 0.0 < r <= 1.0]
        if bad:
            raise ValueError(f"keep rates must lie in (0, 1], got {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"keep rates repeat: {value}")
        return value

    @model_validator(mode="after")
    def _keep_rates_within_beta(self) -> "SelectConfig":
        # the pre-filter leaves about (1 - beta) of the pool: no budget can be larger
        over = [r for r in self.keep_rates if r > 1.0 - self.beta + 1e-12]
        if over:
            raise ValueError(f"select.keep_rates {over} keep more than the {1.0 - self.beta:g} of the pool that "
                             f"select.beta={self.beta} leaves")
        if self.keep_rates and (self.method != "d2" or self.approximate):
            raise ValueError("select.keep_rates needs the exact D2 (select.method: d2, select.approximate: false): "
                             "only its selection for every budget is a prefix of one order")
        return self

    @model_validator(mode="after")
    def _beta_within_prune_rate(self) -> "SelectConfig":
        # the budget round((1-prune_rate)*N) is computed from the full pool, so the pre-filter
        # cannot drop more than prune_rate of it
        if self.beta > self.prune_rate + 1e-12:
            raise ValueError(
                f"select.beta={self.beta} drops more samples than select.prune_rate={self.prune_rate} allows: the "
                "budget round((1-prune_rate)*N) is computed from the full pool, so beta must be <= prune_rate"
            )
        return self


class OutputConfig(_Section):
    url: str = Field(..., description="Where the filtered pool's shards are written (local path or fsspec URL).")
    samples_per_shard: int = Field(10_000, gt=0, description="Target samples per output shard.")


class RayConfig(_Section):
    address: str | None = Field(
        None, description="Ray cluster address; null = RAY_ADDRESS if set, else an embedded local Ray."
    )
    num_cpus: int | None = Field(None, gt=0, description="CPUs for an embedded local Ray; null = all.")
    object_store_memory: int | None = Field(None, gt=0, description="Object store bytes for an embedded local Ray.")


class JobConfig(_Section):
    workdir: str = Field(..., description="Work directory (local path or fsspec URL) for intermediate stages.")
    seed: int = Field(0, description="Seed for every random choice (sampling, baselines, IVF training).")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    input: InputConfig
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    graph: GraphConfig = Field(default_factory=GraphConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    output: OutputConfig
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("workdir")
    @classmethod
    def _nonempty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.rstrip("/")


# -- loading ------------------------------------------------------------------------------------

def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars/lists: 'k=5', 'pretrained=null', 'shards=[a.tar, b.tar]'."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw (unvalidated) config dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value (e.g. select.prune_rate=0.5)")
        dotted, value = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = raw
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {key!r} is not a section")
            node = child
        node[keys[-1]] = _parse_value(value)
    return raw


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{loc}'")
        else:
            lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>", overrides: list[str] | None = None) -> JobConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: top level must be a mapping, got {type(raw).__name__}")
    raw = apply_overrides(json.loads(json.dumps(raw)), overrides)
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Load a YAML config from a local path or any fsspec URL, apply overrides, validate."""
    import fsspec

    path = str(path)
    try:
        with fsspec.open(path, "r") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from None
    return config_from_dict(raw if raw is not None else {}, source=path, overrides=overrides)
