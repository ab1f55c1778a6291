"""Typed job configuration, loaded from YAML.

One YAML file describes one job. Every field has a default and a description; unknown keys are
errors that name the key (pydantic ``extra="forbid"``), so a typo never silently falls back to a
default. ``--set section.key=value`` overrides are applied before validation.

Every rule that involves several fields is a validator here, so a config that cannot work fails
when it is loaded, before any work (exit 2).

Relative local paths (workdir, input shards, checkpoint, ...: :data:`PATH_FIELDS`) are resolved
when the config is loaded, before anything is submitted: a config file's own values against the
directory of the file itself (symlinks followed, so ``configs/demo.yaml`` -> ``pipeline/demo/``),
``--set`` values and configs built from a dict against the current directory. A config read from
a URL has no directory a path could be relative to on every machine: a relative local path in it
is refused (exit 2). On a cluster, a Ray worker's current directory is a per-node copy of the
job's working dir, so an unresolved relative path would point at a different place on every node.

Which settings a stage's output depends on (its fingerprint, :mod:`pipeline.stage`) is declared
here: a field that does not change what its stage writes carries a mark (:data:`NOT_OUTPUT` and
the others below), and a stage's settings are its sections less the marked fields
(:func:`output_settings`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

__all__ = ["ConfigError", "JobConfig", "config_from_dict", "load_config"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Marks (a Field's json_schema_extra) on the fields that do not enter their stage's fingerprint as
# configured. A committed stage is reused while its fingerprint is unchanged, so a field that changes
# what a stage writes must stay unmarked, and a field that does not must be marked (or changing it
# would recompute a committed stage for nothing).
AFFECTS_OUTPUT = "affects_output"
# changes how the work runs (tasks, actors, memory, how a result is checked), never what is written
NOT_OUTPUT = {AFFECTS_OUTPUT: False}
# changes what is written through a value the stage resolves from it (and fingerprints under its own key)
VIA_RESOLVED = {AFFECTS_OUTPUT: "resolved"}


def used_by(stage: str) -> dict[str, Any]:
    """Mark of a field that changes what a later `stage` writes (which fingerprints it), not its own stage."""
    return {AFFECTS_OUTPUT: f"{stage} stage"}


def output_settings(section: BaseModel) -> dict[str, Any]:
    """`section` as configured (``model_dump``), less its marked fields, nested sections included:
    the part of a stage's fingerprint its config section makes."""
    return section.model_dump(exclude=_marked_fields(section))


def _marked_fields(section: BaseModel) -> dict[str, Any]:
    exclude: dict[str, Any] = {}
    for name, field in type(section).model_fields.items():
        mark = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        value = getattr(section, name)
        if AFFECTS_OUTPUT in mark:
            exclude[name] = True
        elif isinstance(value, BaseModel):
            inner = _marked_fields(value)
            if inner:
                exclude[name] = inner
    return exclude


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
    read_attempts: int = Field(
        6, ge=1, description="Attempts per read (a connection reset, throttling, a short or empty read) before the "
        "object is reported unreadable; botocore's own retries come on top."
    )
    retry_base_seconds: float = Field(
        0.5, ge=0, description="First back-off delay between read attempts; doubles per attempt (with jitter)."
    )
    retry_max_seconds: float = Field(20.0, ge=0, description="Longest back-off delay between read attempts.")


class InputConfig(_Section):
    shards: str | list[str] | None = Field(
        None,
        description="WebDataset shards: one URL, a brace pattern ('s3://b/pool/{00000..00099}.tar') "
        "or a list of either. Any fsspec URL or local path. Optional with embed.encoder 'precomputed': "
        "without shards the pool is the metadata's rows and the job writes OUTPUT/metadata/ (filter "
        "before you download).",
    )
    image_exts: list[str] = Field(
        ["jpg", "jpeg", "png", "webp"], description="Sample member extensions holding the image, in order of preference."
    )
    caption_ext: str = Field("txt", description="Sample member extension holding the caption.")
    meta_ext: str = Field("json", description="Sample member extension holding metadata (with 'uid' when present).")
    max_image_pixels: int = Field(
        50_000_000, gt=0,
        description="Images with more pixels (width x height, read from the header before decoding) are skipped as "
        "too_large: decoding costs ~3-6 bytes per pixel (a 13000x13000 PNG: ~0.8 GB).",
    )
    max_member_bytes: int = Field(
        64 * 2**20, gt=0, description="Tar members larger than this are not read (their sample is skipped as too_large)."
    )
    allow_missing_shards: bool = Field(
        False,
        description="A shard that is missing, not a tar, or still unreadable after storage.read_attempts is skipped "
        "(named in the embed stats and the summary) instead of failing the job. Part of the embed fingerprint.",
    )


# Fields that shape a metadata-only job's parts only: out of the embed fingerprint a job with shards
# gets (a workdir embedded before they existed is reused), in the metadata-only one
# (pipeline.embed.metadata_only.settings)
METADATA_ONLY = {AFFECTS_OUTPUT: False, "metadata_only": True}


class PrecomputedConfig(_Section):
    """DataComp's precomputed embeddings, joined by uid to the samples in the input shards.

    The metadata is DataComp's as downloaded (``metadata/<scale>/<md5>.parquet`` + ``<md5>.npz``,
    any number of files, each holding many shards' worth of rows in any order); a sample in the
    shards gets the embedding of the metadata row with its json ``uid``. Samples in the metadata
    but not in the shards (failed downloads) are counted as ``not_in_shards``, samples in the
    shards without a metadata row as ``no_embedding``; neither is selectable."""

    metadata: str | list[str] = Field(
        ..., description="Metadata parquet files: a directory (its *.parquet, else those of its direct "
        "subfolders), a glob, a brace pattern, a file, or a list of these; any fsspec URL.",
    )
    embeddings: str | list[str] | None = Field(
        None,
        description="Where the .npz files are (same forms as `metadata`), paired with the parquet files by "
        "name; default: beside each parquet file.",
    )
    image_key: str | list[str] = Field(
        "l14_img", description="npz array(s) of the image embedding: one name, or a list whose arrays are "
        "L2-normalised and concatenated (e.g. [l14_img, b32_img]).",
    )
    text_key: str | list[str] = Field(
        "l14_txt", description="npz array(s) of the text embedding (same forms as image_key; same total width).",
    )
    score_column: str = Field(
        "clip_l14_similarity_score",
        description="Metadata column used as clip_score (DataComp: clip_l14_similarity_score or "
        "clip_b32_similarity_score); rows where it is null get the cosine of their image and text vectors.",
    )
    bucket_rows: int = Field(
        100_000, gt=0, json_schema_extra=NOT_OUTPUT, description="Memory knob of the join: metadata rows per join "
        "bucket. A join task holds ~0.25 GB + ~15 KB per bucket row with l14 image+text vectors (0.4 GB at 10k, 0.8 "
        "GB at 40k: benchmarks/results/precomputed_join.md), ~1.7 GB at 100k. Fixed for a run when its join starts.",
    )
    shards_per_task: int = Field(
        16, gt=0, json_schema_extra=NOT_OUTPUT, description="Input shards read (json uids, captions, sizes) per Ray "
        "task of the join.",
    )
    layout: Literal["datacomp", "laion"] = Field(
        "datacomp", json_schema_extra=METADATA_ONLY, description="datacomp: `metadata` names parquet files with an .npz beside each (image_key, "
        "text_key arrays). laion: `metadata` is a folder holding img_emb/img_emb_{i}.npy, text_emb/text_emb_{i}.npy "
        "and metadata/metadata_{i}.parquet, row-aligned (clip-retrieval inference, LAION's released embeddings); "
        "metadata-only (no input.shards).",
    )
    id_column: str | None = Field(
        None, json_schema_extra=METADATA_ONLY, description="Metadata-only: the column identifying a sample (default: 'uid' for datacomp, 'url' for "
        "laion). A value of 32 hex digits is the sample's uid as it is (DataComp's); any other value becomes uid = "
        "md5 of its UTF-8 text (DataComp's own rule: its uid is the md5 of the url), and OUTPUT/metadata keeps the "
        "value itself as `id`.",
    )
    url_column: str = Field("url", json_schema_extra=METADATA_ONLY, description="Metadata-only: the column holding the image URL (OUTPUT/metadata `url`).")
    caption_column: str | None = Field(
        None, json_schema_extra=METADATA_ONLY, description="Metadata-only: the caption column (default: 'text' for datacomp, 'caption' for laion).")
    use_sidecar: bool = Field(
        True, json_schema_extra=NOT_OUTPUT, description="With input.shards: read each shard's img2dataset NNNNNNNN.parquet (status 'success' rows, "
        "checked against NNNNNNNN_stats.json 'successes') instead of the whole tar; a shard without them, or whose "
        "counts disagree, is read from its tar.",
    )
    part_rows: int = Field(
        100_000, gt=0, json_schema_extra=METADATA_ONLY, description="Metadata-only: metadata rows per embedding part (a part is a fixed row range of "
        "one metadata file, so node = part offset + row among the part's kept rows).",
    )

    @field_validator("image_key", "text_key")
    @classmethod
    def _keys_named(cls, value: str | list[str]) -> str | list[str]:
        keys = [value] if isinstance(value, str) else value
        if not keys or any(not k.strip() for k in keys):
            raise ValueError("must name at least one npz array")
        if len(set(keys)) != len(keys):
            raise ValueError(f"names an array twice: {keys}")
        return value


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
    batch_size: int | Literal["auto"] = Field(
        256, json_schema_extra=VIA_RESOLVED, description="Images per model forward; auto = on GPU actors, the "
        "largest power of two (32-1024) whose forward stays under 80% of the GPU memory left to one actor (a short "
        "warm-up on a GPU before the stage, recorded with the stage and reused on resume); on CPU actors 256. Part "
        "of the fingerprint: it changes bits."
    )
    num_actors: int = Field(
        1, gt=0, json_schema_extra=NOT_OUTPUT, description="Most embedding actors (model replicas) in the actor "
        "pool; fewer when the cluster has not the CPUs/GPUs for them and `reader_cpus` (the pool scales between "
        "min_actors and this)."
    )
    min_actors: int = Field(
        1, gt=0, json_schema_extra=NOT_OUTPUT, description="Fewest actors the pool scales down to. Idle actors "
        "above it are released, so after a node loss the pool can shrink and give its CPUs back to the readers."
    )
    reader_cpus: float = Field(
        1, gt=0, json_schema_extra=NOT_OUTPUT, description="CPUs the actor pool always leaves to the read/decode "
        "tasks (the pool is sized so they stay free); without them the stream starves while the actors wait for "
        "input."
    )
    num_gpus_per_actor: float = Field(
        -1, json_schema_extra=VIA_RESOLVED,  # whether device decode and an auto batch size apply
        description="GPUs per actor, fractions allowed (0.25 = four actors share a GPU); -1 = 1/actors_per_gpu "
        "when the cluster has GPUs, else 0 (CPU fallback)."
    )
    actors_per_gpu: int = Field(
        1, gt=0, json_schema_extra=NOT_OUTPUT, description="Model actors sharing one GPU (each asks Ray for "
        "1/actors_per_gpu GPU) when num_gpus_per_actor is -1: where one actor cannot keep a GPU busy (small models, "
        "host-side work between forwards). Throughput only."
    )
    device_decode: bool | Literal["auto"] = Field(
        "auto", json_schema_extra=VIA_RESOLVED, description="Decode JPEGs and apply the model's "
        "resize/crop/normalise on the actor's device (nvJPEG on a GPU) instead of in the read tasks; other formats "
        "and JPEGs the device cannot take go through the CPU path per sample. auto = on for GPU actors. Part of the "
        "fingerprint: resizing on the device changes bits."
    )
    cpus_per_actor: float = Field(1, gt=0, json_schema_extra=VIA_RESOLVED, description="CPUs reserved per actor.")
    torch_threads: int | None = Field(
        None, json_schema_extra=VIA_RESOLVED, description="torch intra-op threads inside a CPU actor; null = the "
        "actor's CPU count. Part of the embed stage's fingerprint: on some CPUs the last bit of float32 results "
        "depends on it."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on GPU (fp16 where bf16 is unsupported), fp32 on CPU."
    )
    uid_registry_actors: int | Literal["auto"] = Field(
        "auto", json_schema_extra=NOT_OUTPUT, description="Where the cross-shard duplicate-uid check keeps the uids "
        "seen (8 bytes each): in n Ray actors (0 CPUs each), split by uid hash when n > 1, so no process holds a "
        "large pool's uids (never the driver). auto = one actor per 50 million uids the pool is estimated to hold "
        "(the first committed shard's samples x the shard count), at least one. Changes where, never what.",
    )
    precomputed: PrecomputedConfig | None = Field(None, description="Required when encoder = precomputed.")

    @field_validator("uid_registry_actors")
    @classmethod
    def _registry_actors(cls, v):
        if v != "auto" and v < 1:
            raise ValueError(f"embed.uid_registry_actors must be 'auto' or >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _actor_bounds(self) -> "EmbedConfig":
        if self.min_actors > self.num_actors:
            raise ValueError(f"embed.min_actors ({self.min_actors}) is larger than embed.num_actors "
                             f"({self.num_actors}), the most actors the pool may have")
        return self

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, value: int | str) -> int | str:
        if value != "auto" and value <= 0:
            raise ValueError("embed.batch_size must be greater than 0 (or auto)")
        return value

    @model_validator(mode="after")
    def _gpus_per_actor(self) -> "EmbedConfig":
        if self.num_gpus_per_actor < 0 and self.num_gpus_per_actor != -1:
            raise ValueError(f"embed.num_gpus_per_actor is {self.num_gpus_per_actor:g}: give -1 (auto) or >= 0")
        if 0 < self.num_gpus_per_actor < 1 and abs(1 / self.num_gpus_per_actor - round(1 / self.num_gpus_per_actor)) > 1e-6:
            # Ray packs fractional GPUs per device: 0.4 would leave 0.2 of every GPU unused
            raise ValueError(f"embed.num_gpus_per_actor {self.num_gpus_per_actor:g}: a fraction of a GPU must be "
                             "1/n (0.5, 0.25, ...) so that n actors fill each GPU")
        if self.actors_per_gpu > 1 and self.num_gpus_per_actor != -1:
            raise ValueError("embed.actors_per_gpu applies when embed.num_gpus_per_actor is -1 (auto); with an "
                             "explicit num_gpus_per_actor give the fraction there (0.5 = two actors per GPU)")
        return self

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
    index: Literal["flat", "ivfflat"] = Field(
        "ivfflat", description="IVF-Flat sharded by groups of cells (no process holds the index), or 'flat': the "
        "exact search through the same code with one list (every node in cell 0; all N nodes in one search task)."
    )
    nlist: int | None = Field(
        None, gt=0, description="IVF lists (ivfflat); null = round(4*sqrt(N)), growing with the pool. More than N is an error."
    )
    nprobe: int = Field(16, gt=0, description="IVF lists searched per query (ivfflat); more than nlist is an error.")
    train_size: int | None = Field(
        None, gt=0, description="Vectors sampled (seeded) for the fine level of the two-level k-means; null = 64*nlist "
        "(64 per list). At least nlist."
    )
    max_task_rows: int = Field(
        2_000_000, gt=0,
        json_schema_extra=NOT_OUTPUT, description="Memory bound of one search task, in rows: the vectors of its "
        "group of IVF lists plus its (query, probed list) pairs; lists are grouped under it (a single larger list "
        "gets a task of its own). At 512-d float16 a task holds ~1 KiB per base row, ~3 KiB per distinct query "
        "(its row and a float32 copy) and 132 bytes per pair: ~3 GB for the 2*10^6 default at N = 1.28*10^7, "
        "where ~0.5-1*10^6 distinct queries share a group's ~1.9*10^6 pairs. Changes the tasks, not the graph.",
    )
    scratch_gb: float | None = Field(
        8.0, gt=0,
        json_schema_extra=NOT_OUTPUT, description="Disk bound of the graph search's scratch at once, in GiB: a "
        "raw copy of the vectors (2 bytes x d per row, kept only when it fits in half the bound; else every wave "
        "decodes the embedding parts again) plus one wave's shuffle files (about 1 KiB per (row, search group) at "
        "512-d): the search groups are shuffled and searched in waves, each wave's files removed once searched. "
        "The bound is the whole cluster's (the work directory's), and a wave runs only its own groups' search "
        "tasks: too small a bound leaves CPUs idle (warned). null = one wave, with the copy. Changes the tasks, "
        "not the graph; lower it and resume after a full disk.",
    )
    distance: Literal["sqeuclidean", "euclidean"] = Field(
        "sqeuclidean", json_schema_extra=used_by("select"),
        description="Edge distance: squared L2 (what FAISS returns) or plain L2."
    )
    recall_sample: int = Field(
        1000, ge=0, json_schema_extra=NOT_OUTPUT, description="Nodes whose kNN recall is checked against exact search.",
    )

    @model_validator(mode="before")
    @classmethod
    def _removed_settings(cls, data: Any) -> Any:
        # Say why, and what to use, instead of "unknown key": these were valid in earlier versions.
        if isinstance(data, dict):
            if data.get("index") == "ivfpq":
                raise ValueError(
                    "graph.index 'ivfpq' was removed: without re-ranking its recall@10 was 0.51 "
                    "(benchmarks/results/graph_speed.md), too low for a kNN graph; use 'ivfflat' (float16 vectors "
                    "sharded by groups of IVF cells, no process holds the index) or 'flat' (exact)"
                )
            for key in ("pq_m", "pq_bits"):
                if key in data:
                    raise ValueError(f"graph.{key} was removed with graph.index 'ivfpq'; delete it (use 'ivfflat')")
            if "parts_per_task" in data:
                raise ValueError(
                    "graph.parts_per_task was removed: the graph stage balances its tasks by rows; "
                    "graph.max_task_rows bounds one search task's memory"
                )
        return data

    @model_validator(mode="after")
    def _nprobe_within_nlist(self) -> "GraphConfig":
        # nlist null (about 4*sqrt(N)) is checked when the stage knows N, before any work
        if self.index == "ivfflat" and self.nlist is not None and self.nprobe > self.nlist:
            raise ValueError(
                f"graph.nprobe={self.nprobe} exceeds graph.nlist={self.nlist}: a query cannot probe more lists than "
                "there are (not clamped); lower nprobe or raise nlist"
            )
        if self.index == "ivfflat" and self.nlist is not None and self.train_size is not None \
                and self.train_size < self.nlist:
            raise ValueError(
                f"graph.train_size={self.train_size} cannot place graph.nlist={self.nlist} centroids; use at least "
                "nlist (better 64*nlist) or leave train_size null"
            )
        return self


class PrefilterConfig(_Section):
    basic: bool = Field(
        False, description="DataComp's basic filter before selection: English caption (fastText lid.176, "
        "offline), more than 2 words and 5 characters, smaller image side >= 200 px, aspect ratio <= 3. The samples "
        "that pass are the pool selected from: prune_rate, keep_rates and beta are fractions of them.",
    )
    exact_duplicates: bool = Field(
        False, description="Samples whose image bytes are identical (the embedding parts' sha256 column) keep one, "
        "the earliest by (shard, position) among those the basic filter keeps; the others leave the pool "
        "(reason exact_duplicate, blame_uid = the kept sample). Applied after the basic filter, before "
        "decontaminate and beta.",
    )
    decontaminate: DecontaminateConfig | None = Field(
        None, description="Evaluation sets whose near-copies leave the pool (reason eval_duplicate): every sample "
        "whose image vector has cosine >= threshold to an evaluation image. Applied after exact_duplicates, "
        "before beta. null = off.",
    )


class EvalSetConfig(_Section):
    """One evaluation set of ``select.prefilter.decontaminate``: WebDataset shards of images (embedded
    by the job with the pool's own model) or precomputed image vectors with an id per row."""

    name: str = Field(..., min_length=1, description="The set's name (decisions.parquet's eval_set).")
    shards: str | list[str] | None = Field(
        None, description="WebDataset shards of the evaluation images (brace pattern, glob or list of URLs), "
        "embedded with embed's model; item id = the sample's key.",
    )
    vectors: str | None = Field(
        None, description="Precomputed image vectors, the pool's width: .npy (2-D; ids are row numbers), .npz "
        "(arrays 'vectors' and optional 'ids') or .parquet (columns 'id' and 'vector').",
    )

    @model_validator(mode="after")
    def _one_source(self) -> "EvalSetConfig":
        if (self.shards is None) == (self.vectors is None):
            raise ValueError(f"evaluation set {self.name!r}: give exactly one of shards or vectors")
        if self.vectors is not None and not self.vectors.endswith((".npy", ".npz", ".parquet")):
            raise ValueError(f"evaluation set {self.name!r}: vectors must be a .npy, .npz or .parquet file, "
                             f"got {self.vectors}")
        return self


# cosine at or above which a pool image counts as a copy of an evaluation image: the highest F1 on
# the copies with at most a 10% crop in benchmarks/results/decontaminate.md, with the demo's tiny
# CLIP (which needs so high a value: it puts pictures of one shape and colour very close); a model
# that tells pictures apart better wants a lower one, measured the same way
DEFAULT_DECONTAMINATE_THRESHOLD = 0.9997


class DecontaminateConfig(_Section):
    threshold: float = Field(
        DEFAULT_DECONTAMINATE_THRESHOLD, gt=0.0, le=1.0,
        description="Cosine similarity (image vectors, L2-normalised) at or above which a pool sample is a copy "
        "of an evaluation image; in (0, 1].",
    )
    sets: list[EvalSetConfig] = Field(..., min_length=1, description="The evaluation sets.")

    @field_validator("sets")
    @classmethod
    def _unique_names(cls, value: list[EvalSetConfig]) -> list[EvalSetConfig]:
        names = [s.name for s in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"evaluation set names repeat: {repeated}")
        return value


PrefilterConfig.model_rebuild()  # its decontaminate field names the classes above it


# keys of the approximate partitioned mode, which left the select stage
REMOVED_SELECT_FIELDS = ("approximate", "budget_mode", "exact_check_max_n")


class SelectConfig(_Section):
    method: str = Field(
        "d2", description="Selection method, one of pipeline/select/methods (d2, random, score_topk, ccs, moderate, "
        "kcenter); the baselines use the same budget."
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
        json_schema_extra=NOT_OUTPUT, description="How the pool is split for the distributed greedy; the result is "
        "the same for every choice (exact D2). 'auto' = max(ceil(N / partition_max_nodes), the cluster's CPUs when "
        "it has >= 4 and each partition keeps >= 250k nodes); 'cells' = one partition per IVF cell; an integer = "
        "that many balanced partitions built from whole cells.",
    )
    partition_max_nodes: int = Field(
        10_000_000,
        gt=0,
        json_schema_extra=NOT_OUTPUT, description="'auto': most nodes one partition holds (a worker needs ~300 "
        "bytes per node of its partitions).",
    )
    keep_rates: list[float] = Field(
        [], description="Extra keep fractions served by the same run (D2's order is a prefix order): the greedy runs "
        "to the largest budget, selected.parquet ranks every node up to it and subset_keep{rate}.npy is written per "
        "rate; the configured prune_rate's selection stays the one written (the `selected` column)."
    )
    workers: int | None = Field(
        None, gt=0, json_schema_extra=NOT_OUTPUT, description="Partition workers (processes holding partitions "
        "across rounds); null = the cluster's CPUs, at most one per partition."
    )
    worker_memory_mb: int | None = Field(
        None, gt=0, json_schema_extra=NOT_OUTPUT, description="Memory a worker may use for the partitions it keeps "
        "resident; the others are parked on node-local disk between uses (and 'auto' makes partitions no larger). "
        "null = on Ray, the worker's share of its node's memory; in one process, no limit."
    )
    ccs_strata: int = Field(50, gt=0, description="CCS: number of score strata.")
    prefilter: PrefilterConfig = Field(default_factory=PrefilterConfig)

    @model_validator(mode="before")
    @classmethod
    def _no_removed_fields(cls, data: Any) -> Any:
        # the approximate partitioned mode left the stage (D2 is exact for every partitioning); its
        # keys get an error that says so rather than "unknown key"
        removed = [k for k in REMOVED_SELECT_FIELDS if isinstance(data, dict) and k in data]
        if removed:
            raise ValueError(f"select.{removed[0]} was removed with the approximate partitioned mode: the select "
                             "stage's D2 is exact for any partitioning; delete the key")
        return data

    @field_validator("method")
    @classmethod
    def _registered_method(cls, value: str) -> str:
        from .select.methods import SELECTORS  # here: loading a config need not load the numeric cores

        if value not in SELECTORS:
            raise ValueError(f"unknown selection method {value!r}; one of {', '.join(SELECTORS)}")
        return value

    @field_validator("prune_rate")
    @classmethod
    def _keeps_something(cls, value: float) -> float:
        if value >= 1.0:
            raise ValueError(f"select.prune_rate={value} drops every sample (the budget round((1-p)*N) is 0): "
                             "nothing would be written")
        return value

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
        if self.keep_rates and self.method != "d2":
            raise ValueError("select.keep_rates needs select.method: d2: only its selection for every budget is a "
                             "prefix of one order")
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
    shard_name_width: int = Field(
        5, ge=1, le=12, description="Digits of output shard names (DataComp's resharder and img2dataset use 8: "
        "00000000.tar).",
    )


class RayConfig(_Section):
    address: str | None = Field(
        None, description="Ray cluster address, used when neither --address nor RAY_ADDRESS (set by `ray job "
        "submit` and KubeRay for the job's own cluster) is given; null = an embedded local Ray."
    )
    num_cpus: int | None = Field(
        None, gt=0, description="CPUs for an embedded local Ray; null = all. Ignored on a cluster (logged)."
    )
    object_store_memory: int | None = Field(
        None, gt=0, description="Object store bytes for an embedded local Ray. Ignored on a cluster (logged)."
    )


class JobSection(_Section):
    """How the job as a whole behaves (the ``job`` section)."""

    stall_timeout_s: float | None = Field(
        1800, gt=0, description="A stage that commits no part and makes no progress (no finished Ray task, no "
        "embedded batch) for this long fails with exit 1, naming what it waited for, so a scheduler retries "
        "(the retry resumes). Set it above the longest single step (the embed actors' start-up and model load, "
        "IVF training on one worker, one select partition); null = wait forever."
    )


class JobConfig(_Section):
    workdir: str = Field(..., description="Work directory (local path or fsspec URL) for intermediate stages.")
    seed: int = Field(0, description="Seed for every random choice (sampling, baselines, IVF training).")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    input: InputConfig = Field(default_factory=InputConfig)  # optional: a metadata-only job has no shards
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    graph: GraphConfig = Field(default_factory=GraphConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    output: OutputConfig
    ray: RayConfig = Field(default_factory=RayConfig)
    job: JobSection = Field(default_factory=JobSection)

    @field_validator("workdir")
    @classmethod
    def _nonempty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _shards_or_metadata_only(self) -> "JobConfig":
        # without shards there is nothing to embed: only the precomputed metadata can be the pool
        if self.input.shards is None and self.embed.encoder != "precomputed":
            raise ValueError("input.shards is required unless embed.encoder is 'precomputed' (metadata-only)")
        pc = self.embed.precomputed
        if pc is not None and pc.layout == "laion" and self.input.shards is not None:
            raise ValueError("embed.precomputed.layout 'laion' is metadata-only: leave input.shards unset")
        return self

    @model_validator(mode="after")
    def _missing_shards_need_the_model_encoder(self) -> "JobConfig":
        # the precomputed join reads every shard in its own tasks and has no "missing" part to commit
        if self.input.allow_missing_shards and self.embed.encoder == "precomputed":
            raise ValueError("input.allow_missing_shards is supported with embed.encoder 'open_clip' only (the "
                             "precomputed join needs every shard)")
        return self

    @model_validator(mode="after")
    def _locations_do_not_overlap(self) -> "JobConfig":
        # The write stage owns output.url (it refuses foreign files there and --force-from write
        # empties it), the stages own the workdir's folders (--force-from removes them), and nothing
        # may write among the inputs: an output inside the workdir overwrote a stage's _stats.json,
        # an output at the input's folder wrote among the input tars. So output.url and workdir
        # must not nest either way, and neither may equal or contain an input folder (both may lie
        # inside one: the input tars are named files there, never written).
        owned = [("workdir", self.workdir), ("output.url", self.output.url)]
        inputs = [("input.shards", folder) for folder in input_folders(self.input.shards)]
        problems = []
        for (name_a, url_a), (name_b, url_b) in [tuple(owned)] + [(o, i) for o in owned for i in inputs]:
            a, b = _location(url_a), _location(url_b)
            if a == b:
                problems.append(f"{name_a} ({url_a}) is the same location as {name_b} ({url_b})")
            elif _inside(b, a):
                problems.append(f"{name_a} ({url_a}) contains {name_b} ({url_b})")
            elif _inside(a, b) and name_b != "input.shards":
                problems.append(f"{name_a} ({url_a}) is inside {name_b} ({url_b})")
        if problems:
            raise ValueError("; ".join(problems) + ": the workdir and output.url must not overlap each other, nor "
                             "hold the input shards")
        return self


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")


def input_folders(shards: str | list[str] | None) -> list[str]:
    """The folders the input shard patterns point into (the text before the first brace or glob
    character, up to its last '/'), without expanding them (none without shards: metadata-only)."""
    out: dict[str, None] = {}
    for pattern in [shards] if isinstance(shards, str) else shards or []:
        literal = re.split(r"[{*?\[]", pattern, maxsplit=1)[0]
        folder = literal.rsplit("/", 1)[0] if "/" in literal else ""
        out.setdefault(folder or ".", None)
    return list(out)


def _location(url: str) -> tuple[str, str]:
    """(scheme, normalised path) for comparing locations: local paths absolute, s3a = s3."""
    match = _URL.match(url)
    scheme, path = (match.group(1).lower(), match.group(2)) if match else ("file", url)
    if scheme in ("file", "local"):
        return "file", os.path.normpath(os.path.abspath(path or "."))
    return ("s3" if scheme == "s3a" else scheme), "/".join(p for p in path.split("/") if p)


def _inside(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether location `a` lies strictly inside location `b`."""
    return a[0] == b[0] and a[1] != b[1] and (b[1] in ("", "/") or a[1].startswith(b[1].rstrip("/") + "/"))


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


def _override_for(loc: str, overrides: list[str]) -> str | None:
    """The last ``--set`` override that set `loc` (or a key inside it, or the section holding it)."""
    for item in reversed(overrides):
        key = item.split("=", 1)[0].strip()
        if loc == key or loc.startswith(key + ".") or key.startswith(loc + "."):
            return item
    return None


def _format_error(err: ValidationError, source: str, overrides: list[str] | None = None) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        item = _override_for(loc, overrides or []) if e["loc"] else None
        origin = f" (from --set {item})" if item else ""
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{loc}'{origin}")
        else:
            lines.append(f"  {loc}: {e['msg']}{origin}" if e["loc"] else f"  {e['msg']}")
    return "\n".join(lines)


# Fields that hold local paths or URLs (dotted; a value is a string or a list of strings).
PATH_FIELDS = ("workdir", "input.shards", "embed.pretrained", "embed.model_config_path",
               "embed.precomputed.metadata", "embed.precomputed.embeddings", "select.score_file", "output.url")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _is_relative_local(field: str, value: str) -> bool:
    if "://" in value or os.path.isabs(os.path.expanduser(value)):
        return False
    if field == "embed.pretrained":
        # an open_clip tag ('laion2b_s34b_b79k', 'openai') is a name, not a path
        return "/" in value or value.endswith(_CHECKPOINT_SUFFIXES)
    return True


def resolve_paths(raw: dict[str, Any], base_dir: str | None, source: str,
                  fields: tuple[str, ...] = PATH_FIELDS) -> dict[str, Any]:
    """Make the relative local paths of a raw config absolute against `base_dir` (in place); with
    no `base_dir` (a config read from a URL) a relative local path is a ConfigError naming it."""
    # the evaluation sets of select.prefilter.decontaminate: a list of sections with paths of their own
    decon = ((raw.get("select") or {}).get("prefilter") or {}).get("decontaminate") if fields is PATH_FIELDS else None
    for entry in (decon.get("sets") or []) if isinstance(decon, dict) and isinstance(decon.get("sets"), list) else []:
        if isinstance(entry, dict):
            resolve_paths(entry, base_dir, source, ("shards", "vectors"))
    for field in fields:
        *sections, key = field.split(".")
        node: Any = raw
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get(key), (str, list)):
            continue
        values = node[key] if isinstance(node[key], list) else [node[key]]
        resolved = []
        for value in values:
            if isinstance(value, str) and value.strip() and _is_relative_local(field, value):
                if base_dir is None:
                    raise ConfigError(
                        f"invalid config {source}: {field}={value!r} is a relative path, but the config was read "
                        "from a URL, so there is no directory it could be relative to on every machine: give an "
                        "absolute path on a filesystem every node shares, or a URL (s3://...)"
                    )
                value = os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))
            elif isinstance(value, str) and value.startswith("~"):
                value = os.path.expanduser(value)
            resolved.append(value)
        node[key] = resolved if isinstance(node[key], list) else resolved[0]
    return raw


def config_from_dict(raw: dict[str, Any], source: str = "<dict>", overrides: list[str] | None = None,
                     base_dir: str | None = None) -> JobConfig:
    """Validate a raw config. Its relative local paths are resolved against `base_dir` (default:
    the current directory), those of `overrides` against the current directory."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: top level must be a mapping, got {type(raw).__name__}")
    raw = resolve_paths(json.loads(json.dumps(raw)), base_dir or os.getcwd(), source)
    raw = resolve_paths(apply_overrides(raw, overrides), os.getcwd(), source)
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source, overrides)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Load a YAML config from a local path or any fsspec URL, resolve its relative paths (module
    docstring), apply overrides, validate."""
    import fsspec
    from fsspec.core import split_protocol

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
    raw = raw if raw is not None else {}
    protocol, local = split_protocol(path)
    base_dir = None
    if protocol in (None, "file", "local"):
        base_dir = os.path.dirname(os.path.realpath(local))  # the file itself, symlinks followed
    elif isinstance(raw, dict):
        resolve_paths(raw, None, path)  # a relative local path in a config from a URL: refused
    return config_from_dict(raw, source=path, overrides=overrides, base_dir=base_dir)
