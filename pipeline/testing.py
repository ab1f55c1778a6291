"""Small, real test and demo data: WebDataset pools with deliberately broken samples, a tiny
open_clip architecture, random-weight checkpoints, a DataComp pool as DataComp users have it on disk
(metadata parquet + npz, img2dataset shards), configs.

Everything here is deterministic for a seed. The generators *know* what they broke, so each
returns a manifest of what a correct reader must keep and skip; tests compare the pipeline's
output with that manifest (computed from the construction, never from running the pipeline).

Importable by every test module and by the benchmarks; no pytest dependency. Tar files are
written with the pipeline's own deterministic writer (:class:`pipeline.formats.tar.TarWriter`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import JobConfig, config_from_dict
from .formats.tar import BLOCK, TarWriter
from .formats.webdataset import (
    BAD_KEY,
    BAD_METADATA,
    BAD_UID,
    DUPLICATE_UID,
    MISSING_CAPTION,
    MISSING_IMAGE,
    TOO_LARGE,
    TRUNCATED_TAR,
    UNDECODABLE_IMAGE,
    fallback_uid,
)
from .storage import Store, join

# -- a tiny open_clip architecture ----------------------------------------------------------------

TINY_MODEL_NAME = "d2prune-tiny"
# Same schema as open_clip's model_configs/*.json; vocab_size must stay 49408 (the default
# SimpleTokenizer). ~0.4M parameters: a forward costs microseconds, so tests measure the pipeline.
TINY_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_model_config(path: str, config: dict[str, Any] | None = None, store: Store | None = None) -> str:
    """Write an open_clip model config JSON (for ``embed.model_config_path``); returns the path."""
    (store or Store()).write_json(path, config or TINY_MODEL_CONFIG)
    return path


def tiny_model_config_path() -> str:
    """A local file holding TINY_MODEL_CONFIG (content-addressed, so concurrent writers agree)."""
    blob = json.dumps(TINY_MODEL_CONFIG, sort_keys=True).encode()
    path = os.path.join(tempfile.gettempdir(), f"d2prune-tiny-{hashlib.sha1(blob).hexdigest()[:10]}.json")
    if not os.path.exists(path):
        write_model_config(path)
    return path


def save_random_checkpoint(path: str, model_name: str = TINY_MODEL_NAME,
                           config: dict[str, Any] | None = TINY_MODEL_CONFIG, seed: int = 1234) -> str:
    """Build `model_name` with seeded random weights and save its state dict (a user-style
    checkpoint file, loaded by the pipeline through open_clip's ``pretrained=<path>``)."""
    import open_clip
    import torch

    from .embed.model import register_model_config

    if config is not None:
        register_model_config(model_name, config)
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


# -- WebDataset pools -----------------------------------------------------------------------------

def render_image(rng: np.random.Generator, size: int) -> tuple[Any, str]:
    """A procedural picture and the caption that describes it: the demo's scene generator
    (:mod:`pipeline.demo.scenes`, one picture generator for the demo and the tests) at `size` pixels."""
    from .demo import scenes

    scene = scenes.sample_scene(rng)
    return scenes.render(scene, size), scenes.caption(scene)


def encode_image(image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        image.save(buf, format="JPEG", quality=90)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


class _ShardCounts:
    """Totals of a manifest's per-shard ``kept`` samples and ``skipped`` counts."""

    kept: list[list[dict[str, Any]]]
    skipped: list[dict[str, int]]

    @property
    def kept_uids(self) -> list[str]:
        return [s["uid"] for shard in self.kept for s in shard]

    @property
    def n_kept(self) -> int:
        return sum(len(k) for k in self.kept)

    @property
    def skipped_total(self) -> dict[str, int]:
        total: Counter = Counter()
        for counts in self.skipped:
            total.update(counts)
        return dict(total)


@dataclass
class PoolManifest(_ShardCounts):
    """What a correct reader of a generated pool keeps and skips, shard by shard."""

    shards: list[str]
    kept: list[list[dict[str, str]]]  # per shard, in tar order: {"uid", "key", "caption"}
    skipped: list[dict[str, int]]  # per shard: reason -> count
    truncated_shards: list[int] = field(default_factory=list)
    without_json_uid: list[int] = field(default_factory=list)  # per shard: kept samples whose json has no uid
    # per shard, in tar order, where the generator knows them: {"key", "uid" (json's, else ""), "reason"}
    # of each sample a correct reader skips ("" key for a truncated tar and a key that is not UTF-8)
    skipped_samples: list[list[dict[str, str]]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"shards": self.shards, "kept": self.kept, "skipped": self.skipped,
                "truncated_shards": self.truncated_shards}


def _sample_uid(seed: int, shard: int, pos: int) -> str:
    return hashlib.md5(f"d2prune-pool/{seed}/{shard}/{pos}".encode()).hexdigest()


def _breakage(shard: int, pos: int) -> str | None:
    """Which deliberate defect sample `pos` of `shard` gets in a broken pool (None = healthy).
    ``cross_dup`` reuses the uid of sample 5 of the previous shard; ``dup`` reuses sample 0's uid;
    ``no_json`` has no json member (its uid is the md5 fallback) and is healthy."""
    if pos == 1:
        return UNDECODABLE_IMAGE
    if pos == 2:
        return MISSING_CAPTION
    if pos == 3:
        return "dup"
    if pos == 4 and shard > 0:
        return "cross_dup"
    if pos == 6:
        return "no_json"
    if pos == 7 and shard % 2 == 0:
        return BAD_METADATA
    if pos == 8 and shard % 2 == 1:
        return MISSING_IMAGE
    if pos == 9 and shard == 0:
        return "empty_caption"
    return None


def write_pool(dest_dir: str, store: Store | None = None, n_shards: int = 4, per_shard: int = 40,
               seed: int = 0, broken: bool = True, image_size: int = 48, truncate_last: bool | None = None,
               formats: tuple[str, ...] = ("jpg", "png")) -> PoolManifest:
    """Write `n_shards` WebDataset tars ``{dest_dir}/{00000..}.tar`` of `per_shard` samples each
    (``jpg``/``png`` + ``txt`` + ``json`` with ``uid``, img2dataset layout) and return the manifest.

    With ``broken`` every shard carries deliberate defects (see :func:`_breakage`): an
    undecodable image, a missing and an empty caption, a bad json, a sample without image, a
    within-shard and a cross-shard duplicate uid, a sample without json; and (``truncate_last``,
    default = ``broken``) the last shard is cut in the middle of an image three samples from its
    end.
    """
    store = store or Store()
    if truncate_last is None:
        truncate_last = broken
    if broken and per_shard < 12:
        raise ValueError("a broken pool needs per_shard >= 12 (defects sit at fixed positions)")
    rng = np.random.default_rng(seed)
    store.makedirs(dest_dir)
    urls, kept, skipped, truncated, without_json_uid, skipped_samples = [], [], [], [], [], []
    seen: set[str] = set()
    for shard in range(n_shards):
        no_uid = 0
        url = join(dest_dir, f"{shard:05d}.tar")
        buf = io.BytesIO()
        cut_pos = per_shard - 3 if (truncate_last and shard == n_shards - 1) else None
        cut_offset = None
        shard_kept: list[dict[str, str]] = []
        shard_skipped: Counter = Counter()
        shard_records: list[dict[str, str]] = []
        with TarWriter(buf) as tf:
            for pos in range(per_shard):
                key = f"{shard:05d}{pos:04d}"
                image, caption = render_image(rng, image_size)
                fmt = formats[pos % len(formats)]
                defect = _breakage(shard, pos) if broken else None
                uid = _sample_uid(seed, shard, pos)
                if defect == "dup":
                    uid = _sample_uid(seed, shard, 0)
                elif defect == "cross_dup":
                    uid = _sample_uid(seed, shard - 1, 5)
                image_bytes = encode_image(image, fmt)
                if defect == UNDECODABLE_IMAGE:
                    fmt = "jpg"
                    image_bytes = b"\xff\xd8\xff\xe0 this is not a jpeg " + rng.bytes(64)
                members: list[tuple[str, bytes]] = []
                if defect != MISSING_IMAGE:
                    members.append((fmt, image_bytes))
                if defect == "empty_caption":
                    members.append(("txt", b"   \n"))
                elif defect != MISSING_CAPTION:
                    members.append(("txt", caption.encode()))
                if defect == BAD_METADATA:
                    members.append(("json", b'{"uid": "truncated json'))
                elif defect != "no_json":
                    members.append(("json", json.dumps({"uid": uid, "key": key, "caption": caption}).encode()))
                else:
                    uid = fallback_uid(url, key)
                for ext, data in members:
                    offset = tf.add(f"{key}.{ext}", data)
                    if pos == cut_pos and cut_offset is None:
                        # cut in the middle of this sample's first member's data
                        cut_offset = offset + BLOCK + len(data) // 2
                if cut_pos is not None and pos >= cut_pos:
                    continue  # lost to the truncation: not counted (unreadable), see shards.py
                reason = {UNDECODABLE_IMAGE: UNDECODABLE_IMAGE, MISSING_CAPTION: MISSING_CAPTION,
                          "empty_caption": MISSING_CAPTION, BAD_METADATA: BAD_METADATA,
                          MISSING_IMAGE: MISSING_IMAGE}.get(defect or "")
                if reason is None and uid in seen:
                    reason = DUPLICATE_UID
                if reason is None:
                    seen.add(uid)
                    shard_kept.append({"uid": uid, "key": key, "caption": caption})
                    no_uid += defect == "no_json"
                else:
                    shard_skipped[reason] += 1
                    shard_records.append({"key": key, "uid": "" if defect in (BAD_METADATA, "no_json") else uid,
                                          "reason": reason})
        data = buf.getvalue()
        if cut_offset is not None:
            data = data[:cut_offset]
            shard_skipped[TRUNCATED_TAR] += 1
            shard_records.append({"key": "", "uid": "", "reason": TRUNCATED_TAR})
            truncated.append(shard)
        store.write_bytes(url, data)
        urls.append(url)
        kept.append(shard_kept)
        skipped.append(dict(shard_skipped))
        without_json_uid.append(no_uid)
        skipped_samples.append(shard_records)
    return PoolManifest(shards=urls, kept=kept, skipped=skipped, truncated_shards=truncated,
                        without_json_uid=without_json_uid, skipped_samples=skipped_samples)


def skip_record_mismatches(store: Store, embed_dir: str, manifest) -> list[str]:
    """What is wrong with the embed stage's ``part-NNNNN.skipped.parquet`` files against a
    generated pool's manifest (its ``skipped_samples``, known from construction) and against the
    parts' own stats json (rows per reason = its ``skipped``): one line per problem, [] when
    every shard's records are right."""
    from .formats.embeddings import SKIPPED_COLUMNS, read_skipped, skipped_url
    from .workdir import part_name

    problems = []
    for i, shard in enumerate(manifest.shards):
        name = part_name(i)
        table = read_skipped(store, skipped_url(embed_dir, name))
        stats = store.read_json(join(embed_dir, name + ".stats.json"))
        if table.schema.names != list(SKIPPED_COLUMNS) or any(str(t) != "string" for t in table.schema.types):
            problems.append(f"{name}: schema {table.schema}")
        rows = table.to_pylist()
        by_reason = dict(sorted(Counter(r["reason"] for r in rows).items()))
        if by_reason != stats["skipped"]:
            problems.append(f"{name}: records per reason {by_reason} != stats {stats['skipped']}")
        if any(r["shard"] != shard for r in rows):
            problems.append(f"{name}: records of another shard than {shard}")
        got = [{k: r[k] for k in ("key", "uid", "reason")} for r in rows]
        if got != manifest.skipped_samples[i]:
            problems.append(f"{name}: records {got} != expected {manifest.skipped_samples[i]}")
    return problems


# -- a bad-input corpus ---------------------------------------------------------------------------

# The corpus's limits (give them to make_config as input settings): small, so the oversized cases
# stay small files.
CORPUS_INPUT = {"max_image_pixels": 1_000_000, "max_member_bytes": 2**20, "image_exts": ["jpg", "png"]}


@dataclass
class BadInputCorpus:
    """A pool with every kind of bad input the reader must survive, and what it must make of it.

    ``manifest`` covers the readable shards (kept samples and skip counts per shard, with
    ``CORPUS_INPUT``); ``unreadable`` maps the shards that are not tars at all to the reason the
    up-front check gives; ``empty_shards`` are valid tars without samples."""

    manifest: PoolManifest
    unreadable: dict[str, str]
    empty_shards: list[str]

    @property
    def shards(self) -> list[str]:
        return self.manifest.shards


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height 1-bit pixels, with one row of data: what a
    decompression bomb looks like to a reader that checks the header (PIL refuses it at open)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + (width + 7) // 8))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def odd_mode_images(rng: np.random.Generator, size: int = 48) -> dict[str, tuple[str, bytes]]:
    """One picture in each PIL mode a pool may hold that is not 8-bit RGB: name -> (ext, bytes)."""
    from PIL import Image

    base, _ = render_image(rng, size)
    grey16 = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    cmyk = io.BytesIO()
    base.convert("CMYK").save(cmyk, format="JPEG", quality=90)
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent = io.BytesIO()
    palette.save(transparent, format="PNG", transparency=bytes([0] + [255] * 15))  # bytes: PIL warns on convert
    return {
        "palette_transparency": ("png", transparent.getvalue()),
        "grey_alpha": ("png", _png(base.convert("LA"))),
        "cmyk_jpeg": ("jpg", cmyk.getvalue()),
        "grey16": ("png", _png(grey16)),
        "bilevel": ("png", _png(base.convert("1"))),
        "rgba": ("png", _png(base.convert("RGBA"))),
    }


def write_bad_input_pool(dest_dir: str, store: Store | None = None, seed: int = 0) -> BadInputCorpus:
    """Five shards (read with ``CORPUS_INPUT``):

    ``00000.tar`` every sample-level defect next to healthy samples: uids ``1`` (a number: bad_uid)
    and ``"1"`` (kept: the two must not collide), a list uid, garbage / zero-byte / cut image
    bytes, an empty and a non-UTF-8 caption, a bomb by size (1200x1200 > max_image_pixels) and by
    header (30000x30000 announced), every odd image mode (kept), a member over max_member_bytes, a
    member name that is not UTF-8, no image, bad json, a repeated uid, and members that belong to
    no sample (a folder, a name without extension);
    ``00001.tar`` cut in the middle of its seventh sample, with a uid repeated from shard 0;
    ``00002.tar`` a valid tar with no member; ``00003.tar`` zero bytes; ``00004.tar`` random bytes.
    """
    import tarfile

    from PIL import Image

    store = store or Store()
    rng = np.random.default_rng(seed)
    store.makedirs(dest_dir)
    urls = [join(dest_dir, f"{i:05d}.tar") for i in range(5)]
    kept: list[list[dict[str, str]]] = [[], [], []]
    skipped: list[Counter] = [Counter(), Counter(), Counter()]
    skipped_samples: list[list[dict[str, str]]] = [[], [], []]

    def healthy(pos: int, uid: Any) -> tuple[list[tuple[str, bytes]], str]:
        image, caption = render_image(rng, 48)
        fmt = ("jpg", "png")[pos % 2]
        meta = json.dumps({"uid": uid, "caption": caption}).encode()
        return [(fmt, encode_image(image, fmt)), ("txt", caption.encode()), ("json", meta)], caption

    # -- shard 0: sample-level defects
    buf = io.BytesIO()
    first_uid = _sample_uid(seed, 0, 0)
    with TarWriter(buf) as tar:
        info = tarfile.TarInfo("somedir")  # a folder entry and a name without extension: no sample
        info.type = tarfile.DIRTYPE
        tar._tar.addfile(info)
        tar.add("README", b"not a sample member")
        pos = 0

        def add(members: list[tuple[str, bytes]], expect: str, uid: str | None = None, caption: str = "",
                key: str | None = None) -> None:
            nonlocal pos
            key = key or f"{pos:04d}"
            for ext, data in members:
                tar.add(f"{key}.{ext}", data)
            if expect == "keep":
                kept[0].append({"uid": uid, "key": key, "caption": caption})
            else:
                skipped[0][expect] += 1
                skipped_samples[0].append({"key": "" if expect == BAD_KEY else key, "uid": uid or "",
                                           "reason": expect})
            pos += 1

        for i in range(12):
            uid = first_uid if i == 0 else _sample_uid(seed, 0, pos)
            members, caption = healthy(pos, uid)
            add(members, "keep", uid, caption)
        members, _ = healthy(pos, 1)
        add(members, BAD_UID)
        members, caption = healthy(pos, "1")
        add(members, "keep", "1", caption)
        members, _ = healthy(pos, [1])
        add(members, BAD_UID)
        image, caption = render_image(rng, 48)
        png = encode_image(image, "png")
        meta = lambda: json.dumps({"uid": _sample_uid(seed, 0, pos)}).encode()  # noqa: E731
        here = lambda: _sample_uid(seed, 0, pos)  # noqa: E731 - the uid meta() writes (skip records name it)
        add([("jpg", b"\xff\xd8\xff\xe0 garbage " + rng.bytes(200)), ("txt", b"a caption"), ("json", meta())],
            UNDECODABLE_IMAGE, here())
        add([("png", b""), ("txt", b"a caption"), ("json", meta())], UNDECODABLE_IMAGE, here())
        add([("png", png[: len(png) // 2]), ("txt", b"a caption"), ("json", meta())], UNDECODABLE_IMAGE, here())
        add([("png", png), ("txt", b""), ("json", meta())], MISSING_CAPTION, here())
        add([("png", png), ("txt", b"\xff\xfe\xfa"), ("json", meta())], MISSING_CAPTION, here())
        big = Image.fromarray(np.full((1200, 1200), 128, np.uint8), mode="L")
        add([("png", _png(big)), ("txt", b"a caption"), ("json", meta())], TOO_LARGE, here())
        add([("png", _png_header_only(30000, 30000)), ("txt", b"a caption"), ("json", meta())], TOO_LARGE, here())
        for name, (ext, data) in odd_mode_images(rng).items():
            uid = _sample_uid(seed, 0, pos)
            add([(ext, data), ("txt", f"an image in mode {name}".encode()), ("json", json.dumps({"uid": uid}).encode())],
                "keep", uid, f"an image in mode {name}")
        add([("png", png), ("txt", b"a caption"), ("bin", bytes(2**20 + 1)), ("json", meta())], TOO_LARGE, here())
        add([("png", png), ("txt", b"a caption"), ("json", meta())], BAD_KEY, here(), key="\udcff\udcfe-key")
        add([("txt", b"a caption"), ("json", meta())], MISSING_IMAGE, here())
        add([("png", png), ("txt", b"a caption"), ("json", b'{"uid": ')], BAD_METADATA)
        members, _ = healthy(pos, first_uid)
        add(members, DUPLICATE_UID, first_uid)
    store.write_bytes(urls[0], buf.getvalue())

    # -- shard 1: cut in the middle of its seventh sample; its third repeats a uid of shard 0
    buf = io.BytesIO()
    cut = None
    with TarWriter(buf) as tar:
        for i in range(8):
            uid = kept[0][3]["uid"] if i == 2 else _sample_uid(seed, 1, i)
            members, caption = healthy(i, uid)
            for ext, data in members:
                offset = tar.add(f"1{i:03d}.{ext}", data)
                if i == 6 and cut is None:
                    cut = offset + BLOCK + len(data) // 2
            if i < 6:
                if i == 2:
                    skipped[1][DUPLICATE_UID] += 1
                    skipped_samples[1].append({"key": f"1{i:03d}", "uid": uid, "reason": DUPLICATE_UID})
                else:
                    kept[1].append({"uid": uid, "key": f"1{i:03d}", "caption": caption})
    skipped[1][TRUNCATED_TAR] += 1
    skipped_samples[1].append({"key": "", "uid": "", "reason": TRUNCATED_TAR})
    store.write_bytes(urls[1], buf.getvalue()[:cut])

    # -- shard 2: an empty tar; 3: zero bytes; 4: random bytes
    buf = io.BytesIO()
    TarWriter(buf).close()
    store.write_bytes(urls[2], buf.getvalue())
    store.write_bytes(urls[3], b"")
    store.write_bytes(urls[4], b"\x00GARBAGE" + rng.bytes(3000))
    manifest = PoolManifest(shards=urls[:3], kept=kept, skipped=[dict(c) for c in skipped], truncated_shards=[1],
                            skipped_samples=skipped_samples)
    return BadInputCorpus(manifest, {urls[3]: "not a tar archive (0 bytes)", urls[4]: "not a tar archive"},
                          [urls[2]])


def write_repeated_keys_pool(dest_dir: str, store: Store | None = None, seed: int = 0) -> PoolManifest:
    """One shard whose keys repeat: ``e1 e2 e1`` (later, distinct uids: three samples), ``d1 d1`` back
    to back (distinct uids: two samples, never one merged), ``n1 n1`` back to back without json (the
    same fallback uid: one kept, one duplicate_uid), plus healthy samples so a job has a graph."""
    store = store or Store()
    rng = np.random.default_rng(seed)
    url = join(dest_dir, "00000.tar")
    kept: list[dict[str, str]] = []
    counts: Counter = Counter()
    buf = io.BytesIO()
    keys = [f"h{i:02d}" for i in range(10)] + ["e1", "e2", "e1", "d1", "d1", "n1", "n1"]
    with TarWriter(buf) as tar:
        for pos, key in enumerate(keys):
            image, caption = render_image(rng, 48)
            members = [("png", encode_image(image, "png")), ("txt", caption.encode())]
            uid = fallback_uid(url, key) if key == "n1" else _sample_uid(seed, 9, pos)
            if key != "n1":
                members.append(("json", json.dumps({"uid": uid}).encode()))
            for ext, data in members:
                tar.add(f"{key}.{ext}", data)
            if any(k["uid"] == uid for k in kept):
                counts[DUPLICATE_UID] += 1
            else:
                kept.append({"uid": uid, "key": key, "caption": caption})
    store.write_bytes(url, buf.getvalue())
    return PoolManifest(shards=[url], kept=[kept], skipped=[dict(counts)])


# -- DataComp-style precomputed embeddings ---------------------------------------------------------
# -- a DataComp pool, laid out as download_upstream.py + img2dataset lay it out ---------------------

DATACOMP_DIMS = {"b32": 8, "l14": 16}  # (real: 512 and 768) widths of the npz arrays
# captions that DataComp's basic filter drops, each for one reason (phase-B tests use them)
FILTERED_CAPTIONS = {"caption_not_english": "ein kleiner roter Hund spielt im Garten",
                     "caption_too_few_words": "red dog", "caption_too_short": "a b c"}


@dataclass
class DataCompManifest(_ShardCounts):
    """What a correct reader of :func:`write_datacomp_pool`'s pool keeps, skips and joins."""

    metadata_dir: str
    shards_dir: str
    shards: list[str]
    metadata: list[tuple[str, str]]  # (parquet, npz) in name order
    kept: list[list[dict[str, Any]]]  # per shard, tar order: uid, key, caption, original_width/height, url,
    #                                   sha256, file, row (the metadata row whose embedding it gets)
    skipped: list[dict[str, int]]  # per shard: reason -> count
    not_in_shards: int  # metadata rows (first of their uid) whose sample is in no shard
    metadata_duplicate_uid: int
    metadata_without_uid: int
    arrays: list[dict[str, np.ndarray]]  # per metadata file: npz key -> float16 array as written
    scores: list[dict[str, np.ndarray]]  # per metadata file: score column -> float64
    skipped_samples: list[list[dict[str, str]]] = field(default_factory=list)  # per shard, tar order:
    #                                   key, uid (the json's, else ""), reason of each sample not kept


def _original_size(rng: np.random.Generator, j: int) -> tuple[int, int]:
    """Original (pre-resize) sizes: mostly ordinary photos, some too small or too elongated."""
    if j % 11 == 3:
        return 150, 120  # smaller side < 200
    if j % 13 == 5:
        return 1200, 300  # aspect ratio 4
    return int(rng.integers(220, 1600)), int(rng.integers(220, 1200))


def write_datacomp_pool(root: str, store: Store | None = None, n_shards: int = 3, per_shard: int = 20,
                        n_metadata_files: int = 2, seed: int = 0, image_size: int = 32) -> DataCompManifest:
    """A DataComp pool under `root` exactly as DataComp users have it on disk:

    * ``metadata/<md5>.parquet`` (uid, url, text, original_width, original_height,
      clip_b32_similarity_score, clip_l14_similarity_score, face_bboxes, sha256) + ``<md5>.npz``
      (``b32_img``, ``b32_txt``, ``l14_img``, ``l14_txt``, float16, rows aligned with the parquet),
      `n_metadata_files` files holding ``n_shards * per_shard`` rows between them;
    * ``shards/{00000000..}.tar`` + ``.parquet`` + ``_stats.json`` as img2dataset writes them:
      input row ``i`` of the metadata (files in name order) is attempted in shard
      ``i // per_shard`` under key ``{shard:08d}{i % per_shard:04d}``; one in seven failed to
      download (in the metadata and the shard's parquet, in no tar); samples carry jpg, txt and
      json (with ``uid``, ``url``, ``caption``, ``original_width``/``height``, ``sha256``).

    Planted on purpose (each counted in the manifest): per shard one extra sample whose uid is in
    no metadata file (``no_embedding``); in shard 0 a sample whose json has no uid (``no_uid``)
    and a second sample under the key of its first sample (a repeated key, different uid); in the
    last shard a sample repeating a uid of shard 0 (``duplicate_uid``); a uid on two metadata rows
    (the first file's wins), a metadata row without uid, a row with zero vectors
    (``bad_embedding``); original sizes and captions that DataComp's basic filter drops.
    """
    import pyarrow as pa

    store = store or Store()
    rng = np.random.default_rng(seed)
    meta_dir, shards_dir = join(root, "metadata"), join(root, "shards")
    store.makedirs(meta_dir)
    store.makedirs(shards_dir)
    n_rows = n_shards * per_shard
    if per_shard < 8 or n_shards < 2 or not 1 <= n_metadata_files <= n_rows:
        raise ValueError("write_datacomp_pool needs per_shard >= 8, n_shards >= 2, 1 <= n_metadata_files <= rows")

    # the metadata rows in download order (img2dataset reads the files in name order)
    names = sorted(hashlib.md5(f"d2prune-datacomp/{seed}/{f}".encode()).hexdigest() for f in range(n_metadata_files))
    cuts = np.linspace(0, n_rows, n_metadata_files + 1).astype(int)
    file_of_row = np.searchsorted(cuts, np.arange(n_rows), side="right") - 1
    rows: list[dict[str, Any]] = []
    for i in range(n_rows):
        url = f"https://img.example.com/{seed}/{i}.jpg"
        image, caption = render_image(rng, image_size)
        reason = list(FILTERED_CAPTIONS)[(i // 5) % len(FILTERED_CAPTIONS)] if i % 5 == 4 else None
        width, height = _original_size(rng, i)
        rows.append({"uid": hashlib.md5(url.encode()).hexdigest(), "url": url, "image": image,
                     "caption": FILTERED_CAPTIONS[reason] if reason else caption,
                     "original_width": width, "original_height": height,
                     "file": int(file_of_row[i]), "row": int(i - cuts[file_of_row[i]]),
                     "failed": i % 7 == 6})
    # planted metadata defects: a row without uid, zero vectors, a uid repeated in a later file
    no_uid_row = 1
    zero_row = per_shard + 2  # in shard 1
    dup_row = n_rows - 1  # the last row repeats the uid of row 0 (a later file: row 0's wins)
    rows[no_uid_row]["metadata_uid"] = ""
    rows[dup_row]["metadata_uid"] = rows[0]["uid"]
    rows[dup_row]["failed"] = True  # never downloaded under that uid
    rows[zero_row]["failed"] = False

    arrays: list[dict[str, np.ndarray]] = []
    scores: list[dict[str, np.ndarray]] = []
    metadata: list[tuple[str, str]] = []
    for f, name in enumerate(names):
        mine = [r for r in rows if r["file"] == f]
        n = len(mine)
        vecs = {f"{m}_{kind}": rng.normal(size=(n, d)).astype(np.float16)
                for m, d in DATACOMP_DIMS.items() for kind in ("img", "txt")}
        for j, r in enumerate(mine):
            if r is rows[zero_row]:
                for key in vecs:
                    vecs[key][j] = 0
        unit = {k: v.astype(np.float32) / np.maximum(np.linalg.norm(v.astype(np.float32), axis=1, keepdims=True),
                                                     1e-12) for k, v in vecs.items()}
        file_scores = {f"clip_{m}_similarity_score": (unit[f"{m}_img"] * unit[f"{m}_txt"]).sum(axis=1).astype(np.float64)
                       for m in DATACOMP_DIMS}
        table = pa.table({
            "uid": [r.get("metadata_uid", r["uid"]) for r in mine],
            "url": [r["url"] for r in mine],
            "text": [r["caption"] for r in mine],
            "original_width": pa.array([r["original_width"] for r in mine], pa.int64()),
            "original_height": pa.array([r["original_height"] for r in mine], pa.int64()),
            **file_scores,
            "face_bboxes": pa.array([[] for _ in mine], pa.list_(pa.list_(pa.float64()))),
            "sha256": [hashlib.sha256(r["url"].encode()).hexdigest() for r in mine],
        })
        meta_url = join(meta_dir, name + ".parquet")
        npz_url = join(meta_dir, name + ".npz")
        store.write_parquet(meta_url, table)
        buf = io.BytesIO()
        np.savez(buf, **vecs)
        store.write_bytes(npz_url, buf.getvalue())
        metadata.append((meta_url, npz_url))
        arrays.append(vecs)
        scores.append(file_scores)

    shards, kept, skipped, skipped_samples = [], [], [], []
    first_of_shard0 = None
    for shard in range(n_shards):
        members: list[tuple[str, bytes]] = []
        shard_rows: list[dict[str, Any]] = []  # img2dataset's parquet: every attempted sample
        shard_kept: list[dict[str, Any]] = []
        counts: Counter = Counter()
        shard_skipped: list[dict[str, str]] = []

        def add_sample(key: str, r: dict[str, Any], uid: str | None, expect: str | None) -> None:
            data = encode_image(r["image"], "jpg")
            meta = {"url": r["url"], "caption": r["caption"], "key": key, "status": "success", "error_message": None,
                    "width": image_size, "height": image_size, "original_width": r["original_width"],
                    "original_height": r["original_height"], "exif": "{}",
                    "sha256": hashlib.sha256(data).hexdigest()}
            if uid is not None:
                meta["uid"] = uid
            members.extend([(f"{key}.jpg", data), (f"{key}.txt", r["caption"].encode()),
                            (f"{key}.json", json.dumps(meta).encode())])
            shard_rows.append({**{k: meta.get(k) for k in ("url", "caption", "key", "status", "error_message",
                                                           "width", "height", "original_width", "original_height",
                                                           "exif", "sha256")}, "uid": uid})
            if expect is None:
                shard_kept.append({"uid": uid, "key": key, "caption": r["caption"],
                                   "original_width": r["original_width"], "original_height": r["original_height"],
                                   "url": r["url"], "sha256": meta["sha256"], "file": r["file"], "row": r["row"]})
            else:
                counts[expect] += 1
                shard_skipped.append({"key": key, "uid": uid or "", "reason": expect})

        for pos in range(per_shard):
            i = shard * per_shard + pos
            r = rows[i]
            key = f"{shard:08d}{pos:04d}"
            if r["failed"]:
                shard_rows.append({"url": r["url"], "caption": r["caption"], "key": key, "status": "failed_to_download",
                                   "error_message": "HTTP Error 404: Not Found", "width": None, "height": None,
                                   "original_width": None, "original_height": None, "exif": None, "sha256": None,
                                   "uid": r["uid"]})
                continue
            expect = None
            uid: str | None = r["uid"]
            if i == no_uid_row:
                expect = "no_embedding"  # its metadata row has no uid
            elif i == zero_row:
                expect = "bad_embedding"
            elif shard == 0 and pos == 3:
                uid, expect = None, "no_uid"  # img2dataset run without save_additional_columns=['uid']
            add_sample(key, r, uid, expect)
            if shard == 0 and first_of_shard0 is None and expect is None:
                first_of_shard0 = (key, r)
        # one sample per shard whose uid is in no metadata file
        stray = {**rows[shard * per_shard], "url": f"https://img.example.com/{seed}/stray-{shard}.jpg"}
        add_sample(f"{shard:08d}{per_shard:04d}", stray, hashlib.md5(stray["url"].encode()).hexdigest(), "no_embedding")
        if shard == 0:
            # a second sample under the first sample's key: another uid (one whose download at its
            # own position failed), with its own metadata row
            other = next(r for r in rows[:per_shard] if r["failed"])
            add_sample(first_of_shard0[0], other, other["uid"], None)
        if shard == n_shards - 1:
            r0 = first_of_shard0[1]
            add_sample(f"{shard:08d}{per_shard + 1:04d}", r0, r0["uid"], "duplicate_uid")
        url = join(shards_dir, f"{shard:08d}.tar")
        buf = io.BytesIO()
        with TarWriter(buf) as tar:
            for name, data in members:
                tar.add(name, data)
        store.write_bytes(url, buf.getvalue())
        store.write_parquet(join(shards_dir, f"{shard:08d}.parquet"), pa.Table.from_pylist(shard_rows))
        successes = sum(1 for row in shard_rows if row["status"] == "success")
        store.write_json(join(shards_dir, f"{shard:08d}_stats.json"), {
            "count": len(shard_rows), "successes": successes, "failed_to_download": len(shard_rows) - successes,
            "failed_to_resize": 0, "status_dict": {"success": successes,
                                                   "HTTP Error 404: Not Found": len(shard_rows) - successes}})
        shards.append(url)
        kept.append(shard_kept)
        skipped.append(dict(counts))
        skipped_samples.append(shard_skipped)

    in_shards = {s["uid"] for k in kept for s in k} | {rows[zero_row]["uid"]}
    first_rows = [r for r in rows if r.get("metadata_uid", r["uid"]) and r is not rows[dup_row]]
    not_in_shards = sum(1 for r in first_rows if r["uid"] not in in_shards)
    return DataCompManifest(meta_dir, shards_dir, shards, metadata, kept, skipped, not_in_shards,
                            metadata_duplicate_uid=1, metadata_without_uid=1, arrays=arrays, scores=scores,
                            skipped_samples=skipped_samples)


# -- configs and object storage ------------------------------------------------------------------

def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def make_config(workdir: str, shards: str | list[str], output: str | None = None,
                overrides: list[str] | None = None, **sections: Any) -> JobConfig:
    """A valid JobConfig for a test pool: the tiny open_clip model with random weights, small
    batches, one CPU actor with one torch thread, a Ray sized for CI. `sections` are nested dicts
    merged over those defaults (``embed={"batch_size": 8}``, ``storage={"endpoint_url": ...}``);
    `overrides` are ``section.key=value`` strings as on the command line."""
    raw: dict[str, Any] = {
        "workdir": workdir,
        "input": {"shards": shards},
        "output": {"url": output or workdir.rstrip("/") + "_out"},
        "embed": {
            "model": TINY_MODEL_NAME,
            "model_config_path": tiny_model_config_path(),
            "pretrained": None,
            "batch_size": 16,
            "num_actors": 1,
            "cpus_per_actor": 1,
            "torch_threads": 1,
        },
        "graph": {"k": 5, "index": "flat", "recall_sample": 0},
        "ray": {"num_cpus": 2, "object_store_memory": 300_000_000},
    }
    _deep_merge(raw, sections)
    return config_from_dict(raw, source="make_config", overrides=overrides)


def create_bucket(endpoint_url: str, bucket: str, region: str = "us-east-1") -> None:
    """Create an S3 bucket through the S3 API (s3fs's mkdir fails on moto with a
    location-constraint error). Idempotent."""
    import botocore.session

    client = botocore.session.get_session().create_client("s3", endpoint_url=endpoint_url, region_name=region)
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


def commit_stage(store: Store, cfg: JobConfig, stage: str, stats: dict[str, Any]) -> None:
    """Mark `stage` committed with `cfg`'s fingerprint, as the stage itself would (tests that write
    a stage's files by hand use it to stand in for the stage)."""
    from .stages import stage_fingerprints
    from .workdir import commit, stage_dir

    commit(store, stage_dir(cfg.workdir, stage), stage_fingerprints(cfg)[stage], stage, stats)


def is_committed(store: Store, cfg: JobConfig, stage: str) -> bool:
    """Whether `stage` is committed with `cfg`'s settings (StaleStageError when with others)."""
    from . import workdir
    from .stages import stage_fingerprints

    return workdir.is_committed(store, workdir.stage_dir(cfg.workdir, stage), stage_fingerprints(cfg)[stage], stage)


class FailAtShard:
    """A write-stage hook (``Hooks(shard_written=FailAtShard(i))``) that fails output shard `i`
    after its tar is committed and before its metadata (= its commit), as a job killed in the
    middle of the write stage leaves it. Defined here so Ray workers can import it."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, index: int) -> None:
        if index == self.index:
            raise RuntimeError(f"injected failure in output shard {index:05d}")


class StopAfterStep:
    """A stage hook (``Hooks(step_done=StopAfterStep("graph", "assign"))``) that stops the stage
    right after one of its internal steps is committed, as a job killed there leaves it; `seen`
    lists the stage's steps that ran (the hook runs in the driver)."""

    def __init__(self, stage: str, step: str):
        self.stage, self.step = stage, step
        self.seen: list[str] = []

    def __call__(self, stage: str, step: str) -> None:
        if stage == self.stage:
            self.seen.append(step)
        if (stage, step) == (self.stage, self.step):
            raise KeyboardInterrupt(f"stopped after {stage}/{step}")


@contextmanager
def local_cluster(nodes: int, cpus_per_node: int = 1, object_store_memory: int = 150 * 2**20,
                  memory: int | None = None):
    """A multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``), every component on
    127.0.0.1, with this process connected as its driver; shut down on exit. Ray must not be
    initialised in this process yet.

    Ray rewrites a 127.0.0.1 address to the machine's own address when a driver connects (so that
    other machines could reach it); with the GCS on loopback that address is refused, so the
    rewrite is switched off for this process and the nodes it starts (Ray's own switch for
    single-machine clusters). ``Cluster`` would also record its address in Ray's machine-wide
    address file, where any plain ``ray.init()`` on the machine (another job, another test run)
    would find and join it: that write is skipped."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants
    from ray._private import utils as ray_utils
    from ray.cluster_utils import Cluster

    ray_constants.ENABLE_RAY_CLUSTER = False
    node_args = {"num_cpus": cpus_per_node, "node_ip_address": "127.0.0.1",
                 "object_store_memory": object_store_memory}
    if memory:
        node_args["memory"] = memory
    write_address = ray_utils.write_ray_address
    ray_utils.write_ray_address = lambda *args, **kwargs: None
    try:
        cluster = Cluster(initialize_head=True, head_node_args=dict(node_args, include_dashboard=False))
    finally:
        ray_utils.write_ray_address = write_address
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
# -- committed embed + graph stages for a given graph (select-stage tests, benchmarks) -------------

def write_graph_stages(store: Store, cfg: JobConfig, neighbors: np.ndarray, sq_distances: np.ndarray,
                       cells: np.ndarray, scores: np.ndarray, uids: list[str] | None = None, n_parts: int = 3,
                       vectors: np.ndarray | None = None, score_column: str = "score",
                       return_uids: bool = True, captions: list[str] | None = None, widths=None,
                       heights=None, sha256s=None) -> list[str] | None:
    """Commit the embed and graph stages of ``cfg`` holding exactly this kNN graph, in the stages'
    own formats: ``n_parts`` embedding parts (uids, float32 ``clip_score`` = the scores, the
    float64 scores also as ``score_column``, ``vectors`` or 2-d zeros as both embeddings,
    ``captions`` (default "") and original ``widths``/``heights`` (default unknown) and
    ``sha256s`` (default unknown) per node),
    ``nodes.parquet`` and one graph part per embedding part. ``uids`` default to each node id
    as 32 hex digits (built part by part). Returns the uids."""
    import pyarrow as pa

    from .formats.embeddings import part_table
    from .formats.graph import graph_part_table
    from .workdir import EMBED, GRAPH, part_name, stage_dir

    n = len(scores)
    given = uids is not None
    vectors = np.zeros((n, 2), np.float32) if vectors is None else np.asarray(vectors, np.float32)
    bounds = np.linspace(0, n, n_parts + 1).astype(np.int64)
    emb_dir, graph_dir = stage_dir(cfg.workdir, EMBED), stage_dir(cfg.workdir, GRAPH)
    node_tables = []
    for p in range(n_parts):
        lo, hi = int(bounds[p]), int(bounds[p + 1])
        part_uids = list(uids[lo:hi]) if given else [f"{i:032x}" for i in range(lo, hi)]  # node id as hex
        table = part_table(f"pool/{p:05d}.tar", part_uids, [f"{i:09d}" for i in range(lo, hi)],
                           np.asarray(scores[lo:hi], np.float32), vectors[lo:hi], vectors[lo:hi],
                           [""] * (hi - lo) if captions is None else list(captions[lo:hi]),
                           [None] * (hi - lo) if widths is None else list(widths[lo:hi]),
                           [None] * (hi - lo) if heights is None else list(heights[lo:hi]),
                           None if sha256s is None else list(sha256s[lo:hi]))
        table = table.append_column(score_column, pa.array(np.asarray(scores[lo:hi], np.float64)))
        store.write_parquet(join(emb_dir, f"{part_name(p)}.parquet"), table)
        store.write_parquet(join(graph_dir, f"{part_name(p)}.parquet"),
                            graph_part_table(np.arange(lo, hi), neighbors[lo:hi], sq_distances[lo:hi], cells[lo:hi]))
        node_tables.append(pa.table({"node": pa.array(np.arange(lo, hi, dtype=np.int64)),
                                     "uid": pa.array(part_uids, pa.string()),
                                     "part": pa.array([part_name(p)] * (hi - lo), pa.string())}))
    _write_row_groups(store, join(graph_dir, "nodes.parquet"), node_tables)
    commit_stage(store, cfg, "embed", {"samples": n, "skipped": {}})
    commit_stage(store, cfg, "graph", {"n_nodes": n})
    if not return_uids:
        return None
    return list(uids) if given else [f"{i:032x}" for i in range(n)]


def _write_row_groups(store: Store, url: str, tables: list) -> None:
    """One parquet file with one row group per table (as the graph stage writes nodes.parquet)."""
    import pyarrow.parquet as pq

    def fill(path: str) -> None:
        with pq.ParquetWriter(path, tables[0].schema, compression="zstd") as writer:
            for table in tables:
                writer.write_table(table)

    store.write_file(url, fill)


# -- synthetic embeddings (graph tests and benchmarks) ------------------------------------------


class ClipLikeClusters:
    """CLIP-like cluster geometry: `clusters` centres grouped under 20 topics in a `latent`-d space
    (spreads drawn from [0.5, 1.0]), mapped to `dim` by a fixed random matrix, plus isotropic noise
    and a shared offset (CLIP embeddings share a common direction). Drawn from `rng` in a fixed order,
    so the same rng state gives the same clusters; :meth:`rows` draws unit vectors of given clusters."""

    def __init__(self, rng: np.random.Generator, clusters: int, dim: int, latent: int = 64):
        self.latent = latent
        self.projection = rng.normal(size=(latent, dim)).astype(np.float32) / np.sqrt(latent)
        topics = rng.normal(size=(20, latent))
        self.centres = (topics[rng.integers(0, 20, clusters)]
                        + 0.7 * rng.normal(size=(clusters, latent))).astype(np.float32)
        self.spreads = rng.uniform(0.5, 1.0, size=clusters).astype(np.float32)
        self.offset = 2.0 * rng.normal(size=dim).astype(np.float32) / np.sqrt(dim)

    def rows(self, rng: np.random.Generator, cluster: np.ndarray) -> np.ndarray:
        """Unit vectors (float32 [len(cluster), dim]), one of each given cluster."""
        m = len(cluster)
        z = self.centres[cluster] + self.spreads[cluster, None] * rng.normal(size=(m, self.latent)).astype(np.float32)
        x = z @ self.projection + 0.05 * rng.normal(size=(m, self.projection.shape[1])).astype(np.float32) + self.offset
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


def clip_like_chunks(n: int, dim: int = 512, seed: int = 0, latent: int = 64, chunk: int = 100_000):
    """Unit vectors with CLIP-like structure, `chunk` rows at a time (float32 [rows, dim] each): N/500
    equally likely clusters of :class:`ClipLikeClusters`. The chunks of one (n, seed) are the same
    whatever reads them."""
    rng = np.random.default_rng(seed)
    clusters = max(50, n // 500)
    geometry = ClipLikeClusters(rng, clusters, dim, latent)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        yield geometry.rows(rng, rng.integers(0, clusters, stop - start))


def clip_like_vectors(n: int, dim: int = 512, seed: int = 0, latent: int = 64, chunk: int = 100_000) -> np.ndarray:
    """All N vectors of :func:`clip_like_chunks` in one array. The run reports the mean cosine to the
    nearest and 10th neighbour and between random pairs."""
    out = np.empty((n, dim), dtype=np.float32)
    start = 0
    for x in clip_like_chunks(n, dim, seed, latent, chunk):
        out[start:start + len(x)] = x
        start += len(x)
    return out
