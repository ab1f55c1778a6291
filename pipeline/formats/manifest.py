"""``WORKDIR/<stage>/_MANIFEST.json``: every file a stage committed, with its size (and the store's
own content checksum where its listing gives one), recorded at the stage's commit just before
``_SUCCESS.json``; what later stages and ``d2prune verify`` check the committed files against.

Layout (compact, columnar: one entry per file, sorted by path)::

    {"version": 1, "stage": "embed", "fingerprint": "...",
     "paths": ["_FINGERPRINT.json", "_skipped/part-00000.parquet", "part-00000.parquet", ...],
     "sizes": [41, 1203, 88211, ...],
     "etags": ["9b2c...", ...]}          # only when the store's listing gives them (S3's ETag)

Paths are relative to the stage's folder; files the stage commits outside the workdir (the write
stage's output shards, ``OUTPUT/_PLAN.json``, ``OUTPUT/_stats.json``) are listed under
``@output/`` (relative to ``output.url``). Not listed: the marker itself, this file, hidden files
(interrupted local writes) and the temporary folders a stage removes or rewrites after its commit
(``_work/``, ``_join/``: the select stage computes comparison variants in ``_work/`` later on).

Recording costs one recursive listing of the stage's folder (one paginated LIST on S3, not a HEAD
per file); so does checking. At 10^6 input shards the embed manifest holds 3·10^6 entries (~100 MB
of JSON, ~200 MB with S3 ETags), read once by each stage that reads the embeddings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..storage import Store, join

MANIFEST = "_MANIFEST.json"
OUTPUT = "@output/"  # manifest paths under output.url
_MARKER = "_SUCCESS.json"
VERSION = 1
# rewritten or removed after the commit, or never part of it
TEMPORARY_DIRS = ("_work", "_join")
_PLAIN_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")


@dataclass(frozen=True)
class Damage:
    """One committed file that is not what its stage committed."""

    url: str
    stage: str
    problem: str  # "missing", "truncated: 100 bytes, committed with 5233", ...

    def line(self) -> str:
        return f"{self.url}: {self.problem}; rerun `d2prune run` with --force-from {self.stage}"


def _kept(rel: str) -> bool:
    parts = rel.split("/")
    return rel not in (_MARKER, MANIFEST) and not any(p in TEMPORARY_DIRS for p in parts[:-1])


def _under(rel: str, prefixes: list[str]) -> bool:
    return any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in prefixes)


def listing(store: Store, directory: str, outside: tuple[str, list[str]] | None = None) -> dict[str, dict[str, Any]]:
    """The files a manifest records (or is checked against) as they are now: manifest path -> size
    and etag. `outside`: (output.url, the paths under it that the stage commits)."""
    files = {rel: info for rel, info in store.list_files(directory).items() if _kept(rel)}
    if outside is not None:
        root, names = outside
        for rel, info in store.list_files(root).items():
            if _under(rel, names):
                files[OUTPUT + rel] = info
    return files


def record(store: Store, directory: str, stage: str, fingerprint: str,
           outside: tuple[str, list[str]] | None = None) -> dict[str, Any]:
    """Write the manifest of `directory` (and of `outside`) as it is now; returns it."""
    files = listing(store, directory, outside)
    paths = sorted(files)
    manifest: dict[str, Any] = {"version": VERSION, "stage": stage, "fingerprint": fingerprint, "paths": paths,
                                "sizes": [files[p]["size"] for p in paths]}
    if paths and all(files[p]["etag"] for p in paths):
        manifest["etags"] = [files[p]["etag"] for p in paths]
    if outside is not None:
        manifest["outside"] = outside[1]
    store.write_bytes(join(directory, MANIFEST), _dumps(manifest))
    return manifest


def _dumps(manifest: dict[str, Any]) -> bytes:
    import json

    return (json.dumps(manifest, sort_keys=True, separators=(",", ":")) + "\n").encode()


def read(store: Store, directory: str) -> dict[str, Any] | None:
    """The manifest of a committed stage folder; None when the stage was committed before
    manifests were recorded (or is not committed). A manifest that does not parse is itself
    damage: :class:`pipeline.errors.DamagedFileError`."""
    import json

    from ..errors import DamagedFileError
    from ..stage_names import rerun_hint

    url = join(directory, MANIFEST)
    if not store.exists(url):
        return None
    try:
        manifest = json.loads(store.read_bytes(url).decode())
        if len(manifest["paths"]) != len(manifest["sizes"]):
            raise ValueError("paths and sizes differ in length")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise DamagedFileError(f"{url} is damaged: not a readable manifest ({err}){rerun_hint(url)}") from None
    return manifest


def url_of(directory: str, output_url: str | None, path: str) -> str:
    if path.startswith(OUTPUT):
        return join(output_url or "", path[len(OUTPUT):])
    return join(directory, path)


def check(store: Store, directory: str, manifest: dict[str, Any], output_url: str | None = None,
          etags: bool = False) -> list[Damage]:
    """The files of `manifest` that are missing or whose size differs from the recorded one now (one
    listing of `directory`, and of output.url when the manifest lists files there). `etags`: also
    compare the store's content checksums where both the recorded and the current one are plain
    MD5s (S3 single-part uploads; a multipart ETag depends on the part size, so a copy may differ)."""
    outside = manifest.get("outside")
    now = listing(store, directory, (output_url, outside) if outside is not None and output_url else None)
    recorded_etags = manifest.get("etags") or [None] * len(manifest["paths"])
    stage = manifest.get("stage", "?")
    damaged = []
    for path, size, etag in zip(manifest["paths"], manifest["sizes"], recorded_etags):
        if path.startswith(OUTPUT) and not output_url:
            continue
        url = url_of(directory, output_url, path)
        cur = now.get(path)
        if cur is None:
            damaged.append(Damage(url, stage, "missing (deleted after its stage committed)"))
        elif cur["size"] != size:
            what = "truncated" if cur["size"] < size else "grown"
            damaged.append(Damage(url, stage, f"{what}: {cur['size']} bytes, committed with {size}"))
        elif (etags and etag and cur["etag"] and cur["etag"] != etag
              and _PLAIN_MD5.match(etag) and _PLAIN_MD5.match(cur["etag"])):
            damaged.append(Damage(url, stage, f"content changed since its commit (checksum {cur['etag']}, "
                                              f"committed with {etag})"))
    return damaged
