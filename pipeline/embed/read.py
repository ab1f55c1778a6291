"""Read + decode, the CPU half of the embed stage (a Ray Data map task, one shard per call).

tar → samples (:func:`~pipeline.formats.webdataset.iter_shard_samples`) → PIL decode → the model's
own resize/crop → uint8 HxWx3, tokenised caption. Yields fixed chunks of ``embed.batch_size``
samples (one chunk = one model forward, so batch composition is a function of the shard alone:
determinism), then one end-of-shard marker row carrying the shard's sample count and its skip records ((position,
key, uid, reason) per skipped sample, :func:`~pipeline.formats.webdataset.skip_record`: one shard's
worth at most, so a marker stays small, and the records travel with the rows exactly as the counts
did).

A shard that cannot be read as a whole (missing, not a tar, still failing after the storage
retries: :data:`~pipeline.formats.webdataset.SHARD_FAILURES`) does not fail the task: its marker
carries the reason (``marker_error``) and the driver drops whatever rows of it were sent, then
fails the stage naming the shard or, with ``input.allow_missing_shards``, records it as missing.
Other shards keep flowing. Bad samples are recorded per reason, never raised.
"""

from __future__ import annotations

import json
import logging
from typing import Iterator

import numpy as np

from ..config import InputConfig
from ..formats.datacomp import json_original_size
from ..formats.webdataset import (
    SHARD_FAILURES,
    TOO_LARGE,
    UNDECODABLE_IMAGE,
    ImageDecodeError,
    ImageTooLargeError,
    decode_image,
    iter_shard_samples,
    shard_failure,
    skip_record,
)
from ..storage import Store
from .model import ImagePipeline, ModelSpec, tokenize, worker_preprocessors

log = logging.getLogger(__name__)


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
        "caption": np.array([r[4] for r in rows], dtype=object),
        "original_width": np.array([r[5] for r in rows], dtype=np.int32),
        "original_height": np.array([r[6] for r in rows], dtype=np.int32),
        "is_marker": np.zeros(n, dtype=bool),
        "marker_samples": np.zeros(n, dtype=np.int64),
        "marker_skipped": np.array([""] * n, dtype=object),
        "marker_error": np.array([""] * n, dtype=object),
    }


def _marker(shard_index: int, n_good: int, skips: list[tuple[int, str, str, str]], images: ImagePipeline, context: int, error: str = ""):
    return {
        "shard_index": np.array([shard_index], dtype=np.int64),
        "chunk": np.array([-1], dtype=np.int64),
        "sample_index": np.array([-1], dtype=np.int64),
        "uid": np.array([""], dtype=object),
        "key": np.array([""], dtype=object),
        "image": images.empty(1),
        "tokens": np.zeros((1, context), dtype=np.int32),
        "caption": np.array([""], dtype=object),
        "original_width": np.zeros(1, dtype=np.int32),
        "original_height": np.zeros(1, dtype=np.int32),
        "is_marker": np.array([True]),
        "marker_samples": np.array([n_good], dtype=np.int64),
        "marker_skipped": np.array([json.dumps(skips)], dtype=object),
        "marker_error": np.array([error], dtype=object),
    }


def read_and_preprocess(batch: dict[str, np.ndarray], store: Store, input_cfg: InputConfig, spec: ModelSpec,
                        pp_json: str, chunk_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data generator UDF: stream each shard of `batch`, decode and preprocess its usable
    samples, yield chunks of `chunk_size` rows (numbered per shard: one chunk = one model
    forward), then the shard's end-of-shard marker."""
    images, tokenizer, context = worker_preprocessors(spec, pp_json)
    for shard_index, url in zip(batch["shard_index"].tolist(), batch["shard"].tolist()):
        skips: list[tuple[int, str, str, str]] = []  # (position, key, uid, reason) in shard order
        rows: list[tuple] = []
        n_good = 0
        try:
            for sample in iter_shard_samples(store, url, input_cfg, dedupe=True):
                if sample.problem is not None:
                    skips.append((sample.index, *skip_record(sample, input_cfg)))
                    continue
                try:
                    image = decode_image(sample.image_bytes, input_cfg.max_image_pixels)
                    pixels = images(image)
                except ImageTooLargeError:
                    skips.append((sample.index, *skip_record(sample, input_cfg, TOO_LARGE)))
                    continue
                except (ImageDecodeError, ValueError, OSError):
                    skips.append((sample.index, *skip_record(sample, input_cfg, UNDECODABLE_IMAGE)))
                    continue
                # the size before img2dataset's resize when the json says it, else the image's own
                width, height = json_original_size(sample.meta) or image.size
                rows.append((sample.index, sample.uid, sample.key, pixels, sample.caption, width, height))
                if len(rows) == chunk_size:
                    yield _chunk(shard_index, n_good // chunk_size, rows, tokenizer)
                    n_good += len(rows)
                    rows = []
        except SHARD_FAILURES as err:
            log.error("input shard %s could not be read: %s", url, shard_failure(err, url))
            yield _marker(shard_index, n_good, skips, images, context, error=shard_failure(err, url))
            continue
        if rows:
            yield _chunk(shard_index, n_good // chunk_size, rows, tokenizer)
            n_good += len(rows)
        yield _marker(shard_index, n_good, skips, images, context)
