"""The job's stages, in the order they run (embed → graph → select → write), and their
fingerprints: what the job runner, the CLI and the test fixtures that commit stages share."""

from __future__ import annotations

from .config import JobConfig
from .embed.stage import STAGE as EMBED_STAGE
from .graph.stage import STAGE as GRAPH_STAGE
from .select.stage import STAGE as SELECT_STAGE
from .stage import Stage, fingerprints
from .write.stage import STAGE as WRITE_STAGE

STAGES: tuple[Stage, ...] = (EMBED_STAGE, GRAPH_STAGE, SELECT_STAGE, WRITE_STAGE)
STAGE_NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}


def stage_fingerprints(cfg: JobConfig) -> dict[str, str]:
    """Each stage's fingerprint for `cfg` (:func:`pipeline.stage.fingerprints`)."""
    return fingerprints(cfg, STAGES)
