"""The stages' names (what a Stage declares and reads, what --force-from takes) and their folders in
the work directory: every stage finds another's folder through ``workdir.stage_dir(workdir, NAME)``.

A leaf module (it imports nothing of the package), so that the lowest layers (storage's checked
reads, the commit manifests) can name the stage a damaged file belongs to without importing the
work directory's logic above them."""

from __future__ import annotations

EMBED, GRAPH, SELECT, WRITE = "embed", "graph", "select", "write"
STAGE_DIRS = {EMBED: "embeddings", GRAPH: "graph", SELECT: "selection", WRITE: "write"}


def stage_of(url: str) -> str | None:
    """The stage whose folder holds `url` (by the folder names of :data:`STAGE_DIRS`, nearest
    first), or None."""
    folders = {d: s for s, d in STAGE_DIRS.items()}
    for part in reversed(url.rstrip("/").split("/")[:-1]):
        if part in folders:
            return folders[part]
    return None


def rerun_hint(url: str) -> str:
    """``; rerun ... --force-from STAGE ...`` for a damaged file of a stage folder (else empty)."""
    stage = stage_of(url)
    if stage is None:
        return ""
    return (f"; rerun `d2prune run` with --force-from {stage} to recompute the {stage} stage and every later one "
            "(`d2prune verify CONFIG` lists every damaged file)")
