"""The graph stage's plan (fixed on its first run, ``graph/index/plan.json``) and where every file
of the stage lives.

Layout under ``WORKDIR/graph/`` (the committed output first, then the stage's own files)::

    part-NNNNN.parquet     one graph part per embedding part (pipeline.formats.graph)
    nodes.parquet          node -> uid (pipeline.formats.graph)
    lists.parquet          per IVF list: nodes, coarse cell, search group (pipeline.formats.graph)
    index/plan.json        the parts, sizes and units this run computes with (a resume checks them)
    index/centroids.npz    the trained lists (float32 [nlist, d]), the coarse cell of each and the
                           k1 coarse centroids (the assign step routes through them)
    index/groups.npz       the search groups: group of each list, list sizes, probe counts, bound
    index/waves.npz        the waves: first group of each wave (then G), the disk bound they were cut under
    index/pairs/wave-WWW.npz  wave W's (query, group) pairs per group (from its query files' indexes)
    train/sample-UUUUU     unit U's rows of the training samples      (blocked: coarse, fine)
    train/coarse.npz       the k1 coarse centroids
    train/split-UUUUU      unit U's fine-sample rows by coarse cell   (blocked: k1 cells)
    train/fine-CCCCC.npz   coarse cell C's fine centroids
    assign/unit-UUUUU.npz  unit U's home lists and probes, list sizes, probe counts, raw rows (raw_copy)
    buckets/wave-WWW/base-UUUUU   unit U's rows by the group of their home list   (blocked: wave W's groups)
    buckets/wave-WWW/query-UUUUU  unit U's queries by the groups they probe       (blocked: wave W's groups)
    candidates/group-GGGGG group G's top-(k+1) per query by merge unit       (blocked: M units)

A *unit* is a contiguous run of embedding parts (a node-id range) balanced by rows: the map side of
every shuffle (gather, split, assign, shuffle) and the merge of candidates work per unit. A *wave*
is a contiguous run of search groups whose shuffle files fit ``graph.scratch_gb``: a wave's buckets
are written, searched and removed before the next wave's are written. train/, assign/, buckets/ and
candidates/ are scratch: removed once every graph part is committed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..core import ivf
from ..core.knn import prepare_raw
from ..core.runs import consecutive_runs
from ..storage import join
from .scratch import BlockSchema

PLAN = "index/plan.json"


@dataclass(frozen=True)
class Layout:
    graph_dir: str
    vector: str
    widths: tuple[int, ...]  # the embedding columns of `vector`, side by side in every raw row
    n_nodes: int
    nlist: int
    nprobe: int
    k: int
    seed: int
    unit_parts: tuple[tuple[int, int], ...]  # [first part, end part) of each unit
    unit_starts: tuple[int, ...]  # first node of each unit, then N
    # the assign files keep each unit's raw rows for the shuffle (decoding float16 parquet columns is
    # ~25 us per 512-d row); false when that copy (N rows) would not fit graph.scratch_gb beside a
    # wave: then every wave's shuffle reads the embedding parts again
    raw_copy: bool = True
    rows_schema: BlockSchema = field(init=False, compare=False)
    base_schema: BlockSchema = field(init=False, compare=False)
    query_schema: BlockSchema = field(init=False, compare=False)
    candidate_schema: BlockSchema = field(init=False, compare=False)

    def __post_init__(self) -> None:
        raw = ("raw", "<f2", self.dim)
        kk = self.k + 1
        object.__setattr__(self, "rows_schema", BlockSchema((("id", "<i8", 0), raw)))
        object.__setattr__(self, "base_schema", BlockSchema((("id", "<i8", 0), ("list", "<i4", 0), raw)))
        object.__setattr__(self, "query_schema", BlockSchema((("id", "<i8", 0), ("probes", "<i4", self.nprobe), raw)))
        object.__setattr__(self, "candidate_schema", BlockSchema((("id", "<i8", 0), ("d", "<f4", kk), ("i", "<i8", kk))))

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(sum(self.widths))

    @property
    def k1(self) -> int:
        return ivf.coarse_count(self.nlist)

    @property
    def n_units(self) -> int:
        return len(self.unit_parts)

    def unit_range(self, unit: int) -> tuple[int, int]:
        return self.unit_starts[unit], self.unit_starts[unit + 1]

    def prepare(self, raw: np.ndarray) -> np.ndarray:
        """Prepared float32 graph vectors of raw rows (any subset: row by row)."""
        return prepare_raw(raw, self.vector, self.widths)

    # -- files -------------------------------------------------------------------------------------
    @property
    def centroids_url(self) -> str:
        return join(self.graph_dir, "index/centroids.npz")

    @property
    def groups_url(self) -> str:
        return join(self.graph_dir, "index/groups.npz")

    @property
    def coarse_url(self) -> str:
        return join(self.graph_dir, "train/coarse.npz")

    def sample(self, unit: int) -> str:
        return join(self.graph_dir, f"train/sample-{unit:05d}")

    def split(self, unit: int) -> str:
        return join(self.graph_dir, f"train/split-{unit:05d}")

    def fine(self, cell: int) -> str:
        return join(self.graph_dir, f"train/fine-{cell:05d}.npz")

    def assign(self, unit: int) -> str:
        return join(self.graph_dir, f"assign/unit-{unit:05d}.npz")

    @property
    def waves_url(self) -> str:
        return join(self.graph_dir, "index/waves.npz")

    def pairs(self, wave: int) -> str:
        return join(self.graph_dir, f"index/pairs/wave-{wave:03d}.npz")

    def wave_dir(self, wave: int) -> str:
        return join(self.graph_dir, f"buckets/wave-{wave:03d}")

    def base(self, unit: int, wave: int) -> str:
        return join(self.wave_dir(wave), f"base-{unit:05d}")

    def query(self, unit: int, wave: int) -> str:
        return join(self.wave_dir(wave), f"query-{unit:05d}")

    def candidates(self, group: int) -> str:
        return join(self.graph_dir, f"candidates/group-{group:05d}")

    SCRATCH = ("train", "assign", "buckets", "candidates")

    # -- plan.json -----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        out = asdict(self)
        for key in ("graph_dir", "rows_schema", "base_schema", "query_schema", "candidate_schema"):
            out.pop(key)
        return out

    @classmethod
    def from_json(cls, graph_dir: str, plan: dict) -> "Layout":
        return cls(graph_dir=graph_dir, vector=plan["vector"], widths=tuple(plan["widths"]), n_nodes=plan["n_nodes"],
                   nlist=plan["nlist"], nprobe=plan["nprobe"], k=plan["k"], seed=plan["seed"],
                   unit_parts=tuple(tuple(u) for u in plan["unit_parts"]), unit_starts=tuple(plan["unit_starts"]),
                   raw_copy=plan.get("raw_copy", True))  # plans before the flag always kept the copy


def plan_units(part_rows: list[int], unit_rows: int) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """Contiguous runs of parts of at most `unit_rows` rows (a larger part is a unit of its own):
    ([first, end) part range of each unit, first node of each unit then N)."""
    units = tuple(consecutive_runs(part_rows, max(1, int(unit_rows))))
    offsets = np.concatenate([[0], np.cumsum(part_rows, dtype=np.int64)])
    return units, tuple(int(offsets[a]) for a, _ in units) + (int(offsets[-1]),)
