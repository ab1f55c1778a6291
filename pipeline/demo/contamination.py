"""A pool contaminated on purpose, for ``select.prefilter.exact_duplicates`` and ``decontaminate``:
the demo's pictures (:mod:`.scenes`), an evaluation set of other pictures, and a ground truth the
pipeline never sees.

Layout under the output directory::

    pool/00000.tar ...     jpg + txt + json ({"uid": ...}) per sample
    eval/00000.tar ...     jpg + json per evaluation picture; its id is the sample's key (eval-NNNNNN)
    ground_truth.parquet   one row per pool sample: uid, shard, key, role, eval_id, transform, copy_of
    contamination.json     sizes, counts and the shard patterns

Planted (``role``):

* ``eval_copy``: a share of the evaluation pictures put into the pool transformed, one of
  :data:`TRANSFORMS` each in turn (re-encoded at a low JPEG quality, resized, cropped by 10%,
  flipped, grey-scaled);
* ``lookalike``: for another share, a picture of the same kind (shape and colour) that is another
  picture (its own size, texture, position, background): not a copy;
* ``exact_copy``: a pool sample's image bytes again, under another key, uid and caption in another
  shard (``copy_of`` = the uid of the earliest sample with those bytes, which is ``exact_original``).

Generation is a pure function of the seed (tar members carry a fixed mtime).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from ..formats.tar import TarWriter
from . import scenes

TRANSFORMS = ("jpeg_quality", "resize", "crop10", "flip", "greyscale")


@dataclass(frozen=True)
class ContaminationSpec:
    n_pool: int = 3000  # pool samples, planted ones included
    n_eval: int = 300  # evaluation pictures
    planted_share: float = 0.25  # of the evaluation pictures, put into the pool transformed
    lookalike_share: float = 0.25  # of the evaluation pictures, a look-alike put into the pool
    exact_copies: int = 60  # pool samples repeated byte for byte
    samples_per_shard: int = 500
    seed: int = 7


def transform(picture: Image.Image, name: str, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """`picture` as the web copies it by `name` (:data:`TRANSFORMS`); returns (picture, JPEG quality)."""
    w, h = picture.size
    if name == "jpeg_quality":
        return picture, int(rng.integers(25, 50))
    if name == "resize":
        f = float(rng.uniform(0.5, 0.8))
        return picture.resize((max(8, round(w * f)), max(8, round(h * f))), Image.BICUBIC), 90
    if name == "crop10":  # a window of 90% of each side (a 10% crop), placed at random, at its new size
        cw, ch = round(0.9 * w), round(0.9 * h)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return picture.crop((x, y, x + cw, y + ch)), 90
    if name == "flip":
        return ImageOps.mirror(picture), 90
    if name == "greyscale":
        return ImageOps.grayscale(picture).convert("RGB"), 90
    raise ValueError(f"unknown transform {name!r}; transforms are {', '.join(TRANSFORMS)}")


def _jpeg(picture: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _uid(seed: int, index: int) -> str:
    import hashlib

    return hashlib.md5(f"contaminated/{seed}/{index}".encode()).hexdigest()


def _write_shards(directory: str, samples: list[dict], per_shard: int, with_caption: bool) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    urls = []
    for s in range(0, max(1, (len(samples) + per_shard - 1) // per_shard)):
        path = os.path.join(directory, f"{s:05d}.tar")
        tmp = path + ".tmp"
        with TarWriter(tmp) as tar:
            for item in samples[s * per_shard:(s + 1) * per_shard]:
                item["shard"] = path
                tar.add(f"{item['key']}.jpg", item["jpg"])
                if with_caption:
                    tar.add(f"{item['key']}.txt", item["caption"].encode())
                tar.add(f"{item['key']}.json", json.dumps({"uid": item["uid"]}).encode())
        os.replace(tmp, path)
        urls.append(path)
    return urls


def generate(out_dir: str, spec: ContaminationSpec | None = None) -> dict:
    """Write the pool, the evaluation set and the ground truth under `out_dir`; returns the manifest
    (``pool`` and ``eval``: brace patterns for ``input.shards`` and a set's ``shards``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = spec or ContaminationSpec()
    rng = np.random.default_rng(spec.seed)
    evals = []
    for i in range(spec.n_eval):
        scene = scenes.sample_scene(rng)
        evals.append({"key": f"eval-{i:06d}", "uid": _uid(spec.seed + 1, i), "scene": scene,
                      "jpg": _jpeg(scenes.render(scene), 90)})
    n_planted = round(spec.planted_share * spec.n_eval)
    n_lookalike = round(spec.lookalike_share * spec.n_eval)
    chosen = rng.permutation(spec.n_eval)
    pool: list[dict] = []
    for j, e in enumerate(chosen[:n_planted].tolist()):
        name = TRANSFORMS[j % len(TRANSFORMS)]
        picture, quality = transform(scenes.render(evals[e]["scene"]), name, rng)
        pool.append({"jpg": _jpeg(picture, quality), "caption": scenes.caption(evals[e]["scene"]),
                     "role": "eval_copy", "eval_id": evals[e]["key"], "transform": name})
    for e in chosen[n_planted:n_planted + n_lookalike].tolist():
        own = evals[e]["scene"]
        scene = scenes.sample_scene(rng, shape_probs={own.shape: 1.0}, colour_probs={own.colour: 1.0})
        pool.append({"jpg": _jpeg(scenes.render(scene), 90), "caption": scenes.caption(scene), "role": "lookalike",
                     "eval_id": evals[e]["key"], "transform": ""})
    n_plain = spec.n_pool - len(pool) - spec.exact_copies
    if n_plain < spec.exact_copies:
        raise ValueError(f"a pool of {spec.n_pool} is too small for what is planted in it")
    plain = []
    for _ in range(n_plain):
        scene = scenes.sample_scene(rng, scenes.POOL_SHAPE_PROBS, scenes.POOL_COLOUR_PROBS)
        plain.append({"jpg": _jpeg(scenes.render(scene), 90), "caption": scenes.caption(scene), "role": "",
                      "eval_id": "", "transform": ""})
    pool += plain
    sources = rng.choice(len(plain), size=spec.exact_copies, replace=False)
    for k, src in enumerate(sources.tolist()):
        pool.append({"jpg": plain[src]["jpg"], "caption": f"copy {k} of a picture seen elsewhere", "role": "exact_copy",
                     "eval_id": "", "transform": ""})
    order = rng.permutation(len(pool))  # planted samples land anywhere, copies in other shards than their source
    pool = [pool[i] for i in order]
    for i, item in enumerate(pool):
        item.update(key=f"{i // spec.samples_per_shard:05d}{i % spec.samples_per_shard:04d}", uid=_uid(spec.seed, i))
    # the kept sample of each group of equal bytes is the earliest (shard, position): pool order
    first_uid: dict[bytes, str] = {}
    for item in pool:
        first_uid.setdefault(item["jpg"], item["uid"])
    for item in pool:
        item["copy_of"] = first_uid[item["jpg"]] if first_uid[item["jpg"]] != item["uid"] else ""
    originals = {item["copy_of"] for item in pool if item["copy_of"]}
    for item in pool:  # whichever of a group comes first is the original, the others its copies
        item["role"] = "exact_copy" if item["copy_of"] else "exact_original" if item["uid"] in originals \
            else item["role"]
    pool_urls = _write_shards(os.path.join(out_dir, "pool"), pool, spec.samples_per_shard, True)
    eval_urls = _write_shards(os.path.join(out_dir, "eval"), evals, spec.samples_per_shard, False)
    truth = pa.table({c: [item[c] for item in pool] for c in ("uid", "shard", "key", "role", "eval_id", "transform",
                                                               "copy_of")})
    pq.write_table(truth, os.path.join(out_dir, "ground_truth.parquet"))
    manifest = {
        "spec": spec.__dict__,
        "pool": os.path.join(os.path.abspath(out_dir), "pool", "{00000..%05d}.tar" % (len(pool_urls) - 1)),
        "eval": os.path.join(os.path.abspath(out_dir), "eval", "{00000..%05d}.tar" % (len(eval_urls) - 1)),
        "ground_truth": os.path.join(os.path.abspath(out_dir), "ground_truth.parquet"),
        "planted": {"eval_copy": n_planted, "lookalike": n_lookalike, "exact_copy": spec.exact_copies},
    }
    with open(os.path.join(out_dir, "contamination.json"), "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
    return manifest


__all__ = ["TRANSFORMS", "ContaminationSpec", "generate", "transform"]
