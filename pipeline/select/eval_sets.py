"""``select.prefilter.decontaminate``: pool samples that are copies of evaluation images leave the
pool (reason ``eval_duplicate``), as Ray tasks before the select stage's shuffle.

An evaluation set is either precomputed image vectors (``vectors``: .npy, 2-D, ids = row numbers;
.npz, arrays ``vectors`` and optional ``ids``; .parquet, columns ``id`` and ``vector``) or
WebDataset shards (``shards``) that :func:`embed_eval_shard` embeds with the job's own model (one
task per shard, resumable) into ``selection/eval/NAME/part-IIIII.parquet`` (id = the sample's key,
shard, vector): committed with the stage, so the report can show the evaluation picture.

:func:`search_part`, one task per embedding part, loads every set once (10^4-10^6 vectors: small
next to the pool), finds each row's most similar evaluation image exactly
(:func:`pipeline.core.decontaminate.nearest_evaluation`) and writes ``eval-IIIII.col`` in the work
directory: ``set`` (int16 index into the configured sets, -1 none), ``item`` (int64 row of the
set) and ``similarity`` (float64 cosine, NaN none), for the rows at or above the threshold.
Which of them leave the pool is decided with the other pre-filters (:mod:`.prefilter`).

:func:`check_eval_sets` runs before any work (exit 2): every set readable, of the pool's width,
shards only with a model to embed them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ..config import JobConfig
from ..errors import ConfigError
from ..formats.columns import fixed_list_to_numpy, fixed_size_list
from ..formats.shuffle import ColumnFile, write_columns
from ..storage import Store, expand_urls, join
from ..workdir import SELECT, stage_dir
from .shuffle import ShuffleJob

EVAL_DIR = "eval"


@dataclass(frozen=True)
class EvalSource:
    """One configured evaluation set, as the tasks read it (picklable)."""

    name: str
    vectors: str | None  # the precomputed file
    parts: tuple[str, ...]  # the embedded parts of a shards set, one per shard


def sources(cfg: JobConfig, out_dir: str | None = None) -> tuple[EvalSource, ...]:
    """The configured sets; a shards set's embedded parts go under ``out_dir`` (the selection's
    folder: the stage's own, by default)."""
    out_dir = out_dir or stage_dir(cfg.workdir, SELECT)
    sets = cfg.select.prefilter.decontaminate.sets
    out = []
    for s in sets:
        if s.vectors is not None:
            out.append(EvalSource(s.name, s.vectors, ()))
        else:
            n = len(expand_urls(s.shards))
            out.append(EvalSource(s.name, None, tuple(eval_part_url(out_dir, s.name, i) for i in range(n))))
    return tuple(out)


def eval_part_url(out_dir: str, name: str, index: int) -> str:
    return join(out_dir, EVAL_DIR, name, f"part-{index:05d}.parquet")


# --------------------------------------------------------------------------------------------
# Reading a set
# --------------------------------------------------------------------------------------------


def _npy_shape(fh) -> tuple:
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, _ = read(fh)
    return tuple(shape)


def vectors_shape(store: Store, url: str) -> tuple[int, int]:
    """(rows, width) of a precomputed file from its header (the driver's check: it never loads
    the vectors); ValueError when it cannot be read as one."""
    import zipfile

    import pyarrow.parquet as pq

    try:
        with store.open(url, "rb") as fh:
            if url.endswith(".parquet"):
                pf = pq.ParquetFile(fh)
                names = pf.schema_arrow.names
                if "id" not in names or "vector" not in names:
                    raise ValueError(f"needs columns 'id' and 'vector', has {names}")
                rows = pf.metadata.num_rows
                first = pf.read_row_group(0, columns=["vector"]).column("vector")[0] if rows else None
                return rows, (len(first.as_py()) if first is not None and first.is_valid else 0)
            if url.endswith(".npz"):
                with zipfile.ZipFile(fh) as archive:
                    names = [n[:-len(".npy")] for n in archive.namelist()]
                    if "vectors" not in names:
                        raise ValueError(f"needs an array 'vectors' (and optionally 'ids'), has {names}")
                    with archive.open("vectors.npy") as member:
                        shape = _npy_shape(member)
            else:
                shape = _npy_shape(fh)
    except FileNotFoundError:
        raise ValueError("does not exist") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise ValueError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    if len(shape) != 2:
        raise ValueError(f"vectors must be 2-D, got shape {shape}")
    return shape


def _read_vectors_file(store: Store, url: str):
    """(ids (list of str), vectors [m, d] float32) of a precomputed file; ValueError naming what is
    wrong when it cannot be read."""
    import pyarrow.parquet as pq

    try:
        if url.endswith(".parquet"):
            with store.open(url, "rb") as fh:
                pf = pq.ParquetFile(fh)
                names = pf.schema_arrow.names
                if "id" not in names or "vector" not in names:
                    raise ValueError(f"needs columns 'id' and 'vector', has {names}")
                table = pf.read(columns=["id", "vector"])
            column = table.column("vector").combine_chunks()
            if column.null_count:
                raise ValueError(f"{column.null_count} rows have a null vector")
            lengths = column.value_lengths().to_numpy(zero_copy_only=False) if len(column) else np.zeros(0, int)
            if len(set(lengths.tolist())) > 1:
                raise ValueError(f"vectors of different widths {sorted(set(lengths.tolist()))[:5]}")
            width = int(lengths[0]) if len(lengths) else 0
            vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), width)
            ids = [str(i) for i in table.column("id").to_pylist()]
        else:
            with store.open(url, "rb") as fh:
                data = np.load(fh, allow_pickle=False)
                if url.endswith(".npz"):
                    if "vectors" not in data.files:
                        raise ValueError(f"needs an array 'vectors' (and optionally 'ids'), has {data.files}")
                    vectors = np.asarray(data["vectors"])
                    ids = [str(i) for i in data["ids"].tolist()] if "ids" in data.files else None
                else:
                    vectors, ids = np.asarray(data), None
            if vectors.ndim != 2:
                raise ValueError(f"vectors must be 2-D, got shape {vectors.shape}")
            vectors = vectors.astype(np.float32)
            ids = ids if ids is not None else [str(i) for i in range(len(vectors))]
    except FileNotFoundError:
        raise ValueError("does not exist") from None
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    if not np.all(np.isfinite(vectors)):
        raise ValueError(f"{int((~np.isfinite(vectors).all(axis=1)).sum())} vectors are not finite")
    return ids, vectors


def load_set(store: Store, source: EvalSource):
    """(ids (list of str), vectors [m, d] float32, shards (list of str, or None for vectors sets))."""
    if source.vectors is not None:
        ids, vectors = _read_vectors_file(store, source.vectors)
        return ids, vectors, None
    ids, shards, vectors = [], [], []
    for url in source.parts:
        table = store.read_parquet(url)
        ids += table.column("id").to_pylist()
        shards += table.column("shard").to_pylist()
        vectors.append(fixed_list_to_numpy(table.column("vector"), "vector", url).astype(np.float32))
    return ids, np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32), shards


# --------------------------------------------------------------------------------------------
# Checks before any work
# --------------------------------------------------------------------------------------------


def check_eval_sets(cfg: JobConfig, store: Store, parts=None) -> None:
    """Every evaluation set readable and of the pool's image-vector width (the committed parts'
    when ``parts`` is given, else the model's when the config says it), a shards set only with a
    model to embed it: ConfigError (exit 2) naming the set, before any work."""
    from ..formats.embeddings import vector_widths

    decon = cfg.select.prefilter.decontaminate
    if decon is None:
        return
    width, where = None, ""
    if parts:
        width, where = vector_widths(store, parts[0], "image")[0], f"the pool's image vectors ({parts[0].url})"
    elif cfg.embed.encoder != "precomputed":
        from ..embed.model import model_embed_dim, model_spec

        width, where = model_embed_dim(model_spec(cfg, store)), f"embed.model {cfg.embed.model}'s embedding"
    problems = []
    for s in decon.sets:
        label = f"select.prefilter.decontaminate set {s.name!r}"
        if s.vectors is not None:
            try:
                shape = vectors_shape(store, s.vectors)
            except ValueError as err:
                problems.append(f"{label}: vectors {s.vectors} cannot be read: {err}")
                continue
            if shape[0] == 0:
                problems.append(f"{label}: vectors {s.vectors} holds no vectors")
            elif width is not None and shape[1] != width:
                problems.append(f"{label}: vectors {s.vectors} are {shape[1]} wide, {where} {width}")
            continue
        if cfg.embed.encoder == "precomputed":
            problems.append(f"{label}: shards need a model to embed them, and embed.encoder is precomputed "
                            "(give the set's vectors instead)")
            continue
        try:
            urls = expand_urls(s.shards)
        except ValueError as err:
            problems.append(f"{label}: shards {s.shards}: {err}")
            continue
        missing = [u for u in urls if not store.exists(u)]
        if not urls or missing:
            problems.append(f"{label}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[:3]}")
    if problems:
        raise ConfigError("evaluation sets that cannot be used:\n" + "\n".join(f"  {p}" for p in problems))


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


def embed_eval_shard(cfg: JobConfig, store: Store, shard_url: str, out_url: str) -> int:
    """One shard of an evaluation set embedded with the job's model, on this task's CPU, in chunks
    of the configured batch size in shard order (so the vectors do not depend on the task's
    neighbours); unreadable images are left out (counted). Returns the images embedded."""
    import pyarrow as pa

    from ..embed.model import ClipEncoder, model_spec, preprocess_config
    from ..embed.stage import cpu_threads
    from ..formats.webdataset import BAD_KEY, TOO_LARGE, ImageDecodeError, ImageTooLargeError, decode_image, iter_shard_samples

    spec = model_spec(cfg, store)
    pp_json = json.dumps(preprocess_config(spec), sort_keys=True)
    encoder = ClipEncoder(spec, store, pp_json, torch_threads=cpu_threads(cfg))
    batch = cfg.embed.batch_size if isinstance(cfg.embed.batch_size, int) else 256
    keys, pixels, vectors = [], [], []

    def flush():
        if pixels:
            vectors.append(encoder.encode_images(np.stack(pixels)).astype(np.float32))
            pixels.clear()

    # the pool's input rules (image extensions, size limit) read the evaluation shards too; a sample
    # needs an image only (no caption, json or uid)
    for sample in iter_shard_samples(store, shard_url, cfg.input, dedupe=False):
        if sample.image_ext is None or sample.problem in (BAD_KEY, TOO_LARGE):
            continue
        try:
            pixels.append(encoder.images(decode_image(sample.image_bytes, cfg.input.max_image_pixels)))
        except (ImageDecodeError, ImageTooLargeError, ValueError, OSError):
            continue
        keys.append(sample.key)
        if len(pixels) == batch:
            flush()
    flush()
    dim = encoder.dim
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    store.write_parquet(out_url, pa.table({"id": pa.array(keys, pa.string()),
                                           "shard": pa.array([shard_url] * len(keys), pa.string()),
                                           "vector": fixed_size_list(matrix, np.float32)}))
    return len(keys)


def match_url(job: ShuffleJob, index: int) -> str:
    return job.path(f"eval-{index:05d}.col")


def search_part(job: ShuffleJob, index: int, sets: tuple[EvalSource, ...], threshold: float) -> int:
    """Plan part ``index``'s rows against every evaluation set: writes their best match at or above
    ``threshold`` (module docstring); returns how many rows have one."""
    from ..core.decontaminate import nearest_evaluation
    from ..formats.embeddings import read_raw_vectors

    part = job.plan.parts[index].embedding
    pool = read_raw_vectors(job.store, part, "image")
    best_set = np.full(part.rows, -1, np.int16)
    best_item = np.full(part.rows, -1, np.int64)
    best_sim = np.full(part.rows, np.nan)
    for k, source in enumerate(sets):
        _, vectors, _ = load_set(job.store, source)
        if vectors.shape[0] and vectors.shape[1] != pool.shape[1]:
            raise ConfigError(f"select.prefilter.decontaminate set {source.name!r}: vectors are {vectors.shape[1]} "
                              f"wide, the pool's image vectors ({part.url}) {pool.shape[1]}")
        item, sim = nearest_evaluation(pool, vectors, threshold)
        better = (item >= 0) & ~(sim <= best_sim)  # strictly higher, or the first set with one: ties to earlier sets
        best_set[better], best_item[better], best_sim[better] = k, item[better], sim[better]
    write_columns(job.store, match_url(job, index), {"set": best_set, "item": best_item, "similarity": best_sim})
    return int((best_set >= 0).sum())


def read_matches(job: ShuffleJob, index: int) -> dict:
    """Plan part ``index``'s matches (``set``, ``item``, ``similarity``), checked to cover its rows."""
    with ColumnFile(job.store, match_url(job, index)) as f:
        got = f.read_rows(0, f.rows, ["set", "item", "similarity"])
    if got["set"].size != job.plan.parts[index].embedding.rows:
        raise RuntimeError(f"{match_url(job, index)} has {got['set'].size} rows for the "
                           f"{job.plan.parts[index].embedding.rows} of its part")
    return got


__all__ = ["EVAL_DIR", "EvalSource", "check_eval_sets", "embed_eval_shard", "eval_part_url", "load_set",
           "read_matches", "search_part", "sources"]
