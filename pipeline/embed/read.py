"""Read + decode, the CPU half of the embed stage (a Ray Data map task, one shard per call).

tar → samples (:func:`~pipeline.formats.webdataset.iter_shard_samples`) → PIL decode → the model's
own resize/crop → uint8 HxWx3, tokenised caption. Yields fixed chunks of ``embed.batch_size``
samples (one chunk = one model forward, so batch composition is a function of the shard alone:
determinism), then one end-of-shard marker row carrying the shard's sample and skip counts.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Iterator

import numpy as np

from ..config import InputConfig
from ..formats.webdataset import UNDECODABLE_IMAGE, ImageDecodeError, decode_image, iter_shard_samples
from ..storage import Store
from .model import ImagePipeline, ModelSpec, tokenize, worker_preprocessors


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
    images, tokenizer, context = worker_preprocessors(spec, pp_json)
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
