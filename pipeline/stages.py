"""The job's stages, in the order they run (embed → graph → select → write), and their
fingerprints: what the job runner, the CLI and the test fixtures that commit stages share."""

from __future__ import annotations

import dataclasses

from .config import JobConfig
from .embed import metadata_only
from .embed.stage import STAGE as SHARDS_EMBED_STAGE
from .graph.stage import STAGE as GRAPH_STAGE
from .select.stage import STAGE as SELECT_STAGE
from .stage import Stage, fingerprints
from .write.stage import STAGE as WRITE_STAGE



def _by_input(on_shards, on_metadata):
    """`on_shards` for a job with input shards, `on_metadata` for a metadata-only one."""
    return lambda cfg, *args: (on_metadata if metadata_only.is_metadata_only(cfg) else on_shards)(cfg, *args)


# The embed stage reads input shards (open_clip, or the precomputed join) or, without shards, the
# precomputed metadata alone (pipeline.embed.metadata_only): one stage name, two ways to fill it.
EMBED_STAGE = dataclasses.replace(
    SHARDS_EMBED_STAGE, settings=_by_input(SHARDS_EMBED_STAGE.settings, metadata_only.settings),
    check=_by_input(SHARDS_EMBED_STAGE.check, metadata_only.check), run=_by_input(SHARDS_EMBED_STAGE.run, metadata_only.run),
    node_caches=_by_input(SHARDS_EMBED_STAGE.node_caches or (lambda cfg: []), lambda cfg: []))
STAGES: tuple[Stage, ...] = (EMBED_STAGE, GRAPH_STAGE, SELECT_STAGE, WRITE_STAGE)
STAGE_NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}


def stage_fingerprints(cfg: JobConfig) -> dict[str, str]:
    """Each stage's fingerprint for `cfg` (:func:`pipeline.stage.fingerprints`)."""
    return fingerprints(cfg, STAGES)
