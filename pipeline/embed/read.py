"""Read + decode, the CPU half of the embed stage (a Ray Data map task, one shard per call).

tar → samples (:func:`~pipeline.formats.webdataset.iter_shard_samples`) → PIL decode → the model's
own resize/crop → uint8 HxWx3, tokenised caption. With device decode (``embed.device_decode``,
:mod:`.device_preprocess`) a JPEG the device takes is sent as its bytes, undecoded, and every
other image as its CPU-preprocessed pixels (both as bytes: one column type), flagged by the
``jpeg`` column. Yields fixed chunks of ``embed.batch_size``
samples (one chunk = one model forward, so batch composition is a function of the shard alone:
determinism), then one end-of-shard marker row carrying the shard's sample count and its skip records ((position,
key, uid, reason) per skipped sample, :func:`~pipeline.formats.webdataset.skip_record`: one shard's
worth at most, so a marker stays small, and the records travel with the rows exactly as the counts
did).

Every yield is exactly ``batch_size`` rows: the shard's last, partial chunk goes out together with
its marker row and filler rows (markers with ``marker_samples`` -1, no image). The actor map asks
Ray Data for batches of exactly that many rows (Ray requires a batch size for GPU actors, and cuts
a bundle of blocks into batches of it), so batches always fall on chunk boundaries, whatever
blocks arrive together: a chunk is never split over two forwards.

A shard that cannot be read as a whole (missing, not a tar, still failing after the storage
retries: :data:`~pipeline.formats.webdataset.SHARD_FAILURES`) does not fail the task: its marker
carries the reason (``marker_error``) and the driver drops whatever rows of it were sent, then
fails the stage naming the shard or, with ``input.allow_missing_shards``, records it as missing.
Other shards keep flowing. Bad samples are recorded per reason, never raised.
"""

from __future__ import annotations

import hashlib
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
from .device_preprocess import device_jpeg_size, pixels_payload
from .model import ImagePipeline, ModelSpec, tokenize, worker_preprocessors

log = logging.getLogger(__name__)


def _chunk(shard_index: int, chunk: int, rows: list[tuple], tokenizer, device_decode: bool) -> dict[str, np.ndarray]:
    n = len(rows)
    if device_decode:
        images = np.empty(n, dtype=object)
        images[:] = [r[3] if r[7] else pixels_payload(r[3]) for r in rows]
    else:
        images = np.stack([r[3] for r in rows])
    return {
        "shard_index": np.full(n, shard_index, dtype=np.int64),
        "chunk": np.full(n, chunk, dtype=np.int64),
        "sample_index": np.array([r[0] for r in rows], dtype=np.int64),
        "uid": np.array([r[1] for r in rows], dtype=object),
        "key": np.array([r[2] for r in rows], dtype=object),
        "image": images,
        "jpeg": np.array([r[7] for r in rows], dtype=bool),
        "tokens": tokenize(tokenizer, [r[4] for r in rows]),
        "caption": np.array([r[4] for r in rows], dtype=object),
        "original_width": np.array([r[5] for r in rows], dtype=np.int32),
        "original_height": np.array([r[6] for r in rows], dtype=np.int32),
        "sha256": np.array([r[8] for r in rows], dtype=object),
        "is_marker": np.zeros(n, dtype=bool),
        "marker_samples": np.zeros(n, dtype=np.int64),
        "marker_skipped": np.array([""] * n, dtype=object),
        "marker_error": np.array([""] * n, dtype=object),
    }


def _marker(shard_index: int, n_good: int, skips: list[tuple[int, str, str, str]], images: ImagePipeline, context: int,
            device_decode: bool, n: int, error: str = "", before: dict[str, np.ndarray] | None = None):
    """The end-of-shard marker row then n-1 filler rows, after the rows of `before` (the shard's
    last chunk) when given: one block of a whole number of chunks (see the module docstring)."""
    empty = np.array([b""] * n, dtype=object) if device_decode else images.empty(n)
    marker = {
        "shard_index": np.full(n, shard_index, dtype=np.int64),
        "chunk": np.full(n, -1, dtype=np.int64),
        "sample_index": np.full(n, -1, dtype=np.int64),
        "uid": np.array([""] * n, dtype=object),
        "key": np.array([""] * n, dtype=object),
        "image": empty,
        "jpeg": np.zeros(n, dtype=bool),
        "tokens": np.zeros((n, context), dtype=np.int32),
        "caption": np.array([""] * n, dtype=object),
        "original_width": np.zeros(n, dtype=np.int32),
        "original_height": np.zeros(n, dtype=np.int32),
        "sha256": np.array([""] * n, dtype=object),
        "is_marker": np.ones(n, dtype=bool),
        "marker_samples": np.array([n_good] + [-1] * (n - 1), dtype=np.int64),  # -1: filler
        "marker_skipped": np.array([json.dumps(skips)] + [""] * (n - 1), dtype=object),
        "marker_error": np.array([error] * n, dtype=object),
    }
    if before is None:
        return marker
    return {k: np.concatenate([before[k], marker[k]]) for k in marker}


def read_and_preprocess(batch: dict[str, np.ndarray], store: Store, input_cfg: InputConfig, spec: ModelSpec,
                        pp_json: str, chunk_size: int, device_decode: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data generator UDF: stream each shard of `batch`, decode and preprocess its usable
    samples (or, with `device_decode`, pass device-decodable JPEGs through undecoded), yield chunks
    of `chunk_size` rows (numbered per shard: one chunk = one model forward), then the shard's
    end-of-shard marker, each yield `chunk_size` rows."""
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
                jpeg_size = device_jpeg_size(sample.image_bytes) if device_decode else None
                too_large = jpeg_size is not None and input_cfg.max_image_pixels is not None and \
                    jpeg_size[0] * jpeg_size[1] > input_cfg.max_image_pixels
                try:
                    if jpeg_size is not None and not too_large:
                        pixels, size = sample.image_bytes, jpeg_size  # decoded on the actor's device
                    else:  # the CPU path, which also counts a too-large JPEG like without device decode
                        image = decode_image(sample.image_bytes, input_cfg.max_image_pixels)
                        pixels, size = images(image), image.size
                except ImageTooLargeError:
                    skips.append((sample.index, *skip_record(sample, input_cfg, TOO_LARGE)))
                    continue
                except (ImageDecodeError, ValueError, OSError):
                    skips.append((sample.index, *skip_record(sample, input_cfg, UNDECODABLE_IMAGE)))
                    continue
                # the size before img2dataset's resize when the json says it, else the image's own
                width, height = json_original_size(sample.meta) or size
                # the image member's bytes as stored, for select.prefilter.exact_duplicates
                digest = hashlib.sha256(sample.image_bytes).hexdigest()
                rows.append((sample.index, sample.uid, sample.key, pixels, sample.caption, width, height,
                             jpeg_size is not None and not too_large, digest))
                if len(rows) == chunk_size:
                    yield _chunk(shard_index, n_good // chunk_size, rows, tokenizer, device_decode)
                    n_good += len(rows)
                    rows = []
        except SHARD_FAILURES as err:
            log.error("input shard %s could not be read: %s", url, shard_failure(err, url))
            yield _marker(shard_index, n_good, skips, images, context, device_decode, chunk_size,
                          error=shard_failure(err, url))
            continue
        last = _chunk(shard_index, n_good // chunk_size, rows, tokenizer, device_decode) if rows else None
        n_good += len(rows)
        yield _marker(shard_index, n_good, skips, images, context, device_decode, chunk_size - len(rows), before=last)
