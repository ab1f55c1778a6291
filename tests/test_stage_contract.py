"""The stage declarations (pipeline.stage) and the config's output marks (pipeline.config): which
stages a stage reads, and which settings its fingerprint holds. Fast: no Ray, no model."""

from __future__ import annotations

import copy

import pytest

from pipeline import config as config_module
from pipeline.config import AFFECTS_OUTPUT, config_from_dict
from pipeline.errors import PreconditionError
from pipeline.job import BY_NAME, STAGES, stage_fingerprints
from pipeline.stage import StageContext, run_stage
from pipeline.storage import Store
from pipeline.testing import commit_stage
from pipeline.workdir import EMBED, GRAPH, SELECT, STAGE_DIRS, WRITE

BASE = {"workdir": "/jobs/work", "input": {"shards": "/jobs/pool/{00000..00003}.tar"}, "output": {"url": "/jobs/out"}}
PRECOMPUTED = {"encoder": "precomputed", "precomputed": {"metadata": "/jobs/meta"}}
# the stage whose output each config section decides
SECTION_STAGE = {"input": EMBED, "embed": EMBED, "embed.precomputed": EMBED, "graph": GRAPH, "select": SELECT,
                 "output": WRITE}
# values tried, in order, for a field: the first that validates and differs from the default is used
CANDIDATES = (3, 2, 0.5, 0.25, True, False, "auto", "cells", "ccs", "text", "euclidean", "flat", "fp32", "png", "x")


def base_raw(section: str) -> dict:
    raw = copy.deepcopy(BASE)
    if section.startswith("embed"):
        raw["embed"] = copy.deepcopy(PRECOMPUTED)
    return raw


def section_of(cfg, section: str):
    node = cfg
    for name in section.split("."):
        node = getattr(node, name)
    return node


def changed_config(section: str, field: str):
    """A config differing from base_raw(section) in `section.field` only, or None when no candidate fits."""
    raw = base_raw(section)
    current = getattr(section_of(config_from_dict(raw), section), field)
    for value in CANDIDATES:
        changed = copy.deepcopy(raw)
        node = changed
        for name in section.split("."):
            node = node.setdefault(name, {})
        node[field] = value
        try:
            cfg = config_from_dict(changed)
        except config_module.ConfigError:
            continue
        if repr(getattr(section_of(cfg, section), field)) != repr(current):
            return cfg
    return None


def fields(section: str):
    """(name, mark) of every scalar field of a config section (mark: its affects_output value, or None)."""
    cls = type(section_of(config_from_dict(base_raw(section)), section))
    for name, info in cls.model_fields.items():
        if isinstance(getattr(section_of(config_from_dict(base_raw(section)), section), name), config_module.BaseModel):
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        yield name, extra.get(AFFECTS_OUTPUT)


@pytest.mark.parametrize("section", list(SECTION_STAGE))
def test_a_field_changes_the_fingerprint_of_the_stage_it_changes_the_output_of(section):
    stage = SECTION_STAGE[section]
    base = stage_fingerprints(config_from_dict(base_raw(section)))
    tried = 0
    for name, mark in fields(section):
        cfg = changed_config(section, name)
        if cfg is None or mark == "resolved":  # resolved: see test_embed*.py (the resolved values count)
            continue
        tried += 1
        prints = stage_fingerprints(cfg)
        if mark is None:
            assert prints[stage] != base[stage], f"{section}.{name} changes output but not the {stage} fingerprint"
        elif mark is False:
            assert prints == base, f"{section}.{name} is marked as not changing output, yet changes a fingerprint"
        else:  # used by a later stage: that one's fingerprint, not its own stage's
            assert prints[stage] == base[stage] and prints[mark.split()[0]] != base[mark.split()[0]], name
    assert tried >= 2


def test_fingerprints_of_embed_and_graph_are_those_of_the_hand_kept_lists():
    """The marks replaced exclude lists in the stage files: the same fields count, so a workdir
    committed before is reused (values computed by the code before the marks)."""
    prints = stage_fingerprints(config_from_dict(BASE))
    assert (prints[EMBED], prints[GRAPH]) == ("2531b78f1449925b", "702bdea592d2001b")
    prints = stage_fingerprints(config_from_dict(dict(BASE, embed=PRECOMPUTED)))
    assert (prints[EMBED], prints[GRAPH]) == ("d3f40eaf81887b78", "04d8fd32250b4d66")


def test_every_stage_reads_only_earlier_stages_and_has_a_folder():
    names = [s.name for s in STAGES]
    assert names == list(STAGE_DIRS)
    for i, stage in enumerate(STAGES):
        assert set(stage.reads) <= set(names[:i]), stage.name
    assert BY_NAME[SELECT].reads == (EMBED, GRAPH) and BY_NAME[WRITE].reads == (EMBED, SELECT)


def run_without_running(stage_name: str, cfg, store):
    """run_stage up to its requirements: the stage's own check and run must not be reached."""
    stage = BY_NAME[stage_name]

    def never(*_):
        raise AssertionError("the stage ran although a stage it reads is not committed")

    prints = stage_fingerprints(cfg)
    ctx = StageContext(fingerprint=prints[stage_name], fingerprints=prints)
    from dataclasses import replace

    return run_stage(replace(stage, check=never, run=never), cfg, store, ctx)


def test_run_stage_requires_every_stage_it_reads_naming_the_missing_one(tmp_path):
    store = Store()
    cfg = config_from_dict(dict(BASE, workdir=str(tmp_path / "work"), output={"url": str(tmp_path / "out")}))
    with pytest.raises(PreconditionError, match="committed graph stage"):  # the latest missing first
        run_without_running(SELECT, cfg, store)
    commit_stage(store, cfg, GRAPH, {})
    with pytest.raises(PreconditionError, match="committed embed stage: no _SUCCESS.json in .*embeddings"):
        run_without_running(SELECT, cfg, store)
    commit_stage(store, cfg, SELECT, {})
    with pytest.raises(PreconditionError, match="committed embed stage.*d2prune embed"):
        run_without_running(WRITE, cfg, store)
