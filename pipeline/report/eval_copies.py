"""The pairs of the report's "removed as a copy of an evaluation image" gallery: pool samples that
``select.prefilter.decontaminate`` dropped (``decisions.parquet`` rows with reason
``eval_duplicate``), most similar first, each with the evaluation picture it copies when the set
was given as shards (the stage kept each embedded item's shard in ``selection/eval/NAME/``).

One decisions file at a time, keeping a heap of the best ``n``: memory is one part's rows.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from ..formats.selection import DECISIONS_DIR
from ..storage import Store, join

GALLERY_PAIRS = 12


@dataclass(frozen=True)
class EvalCopy:
    uid: str
    shard: str
    key: str
    eval_set: str
    eval_id: str
    similarity: float
    eval_shard: str | None  # where the evaluation picture is (None: the set was given as vectors)


def find_eval_copies(store: Store, select_dir: str, n: int = GALLERY_PAIRS) -> list[EvalCopy]:
    """The ``n`` most similar pool samples removed as evaluation copies ([] when none, or when the
    selection has no evaluation columns)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    directory = join(select_dir, DECISIONS_DIR)
    if not store.exists(directory):
        return []
    best: list[tuple] = []
    for url in sorted(store.glob(join(directory, "*.parquet"))):
        with store.open(url, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if "eval_similarity" not in pf.schema_arrow.names:
                return []
            table = pf.read(columns=["uid", "shard", "key", "reason", "eval_set", "eval_id", "eval_similarity"])
        table = table.filter(pc.equal(table.column("reason"), "eval_duplicate"))
        for row in table.to_pylist():
            item = (row["eval_similarity"], row["uid"], row)
            if len(best) < n:
                heapq.heappush(best, item)
            elif item > best[0]:
                heapq.heapreplace(best, item)
    rows = [r for _, _, r in sorted(best, reverse=True)]
    shards = _eval_shards(store, select_dir, {(r["eval_set"], r["eval_id"]) for r in rows})
    return [EvalCopy(r["uid"], r["shard"], r["key"], r["eval_set"], r["eval_id"], float(r["eval_similarity"]),
                     shards.get((r["eval_set"], r["eval_id"]))) for r in rows]


def _eval_shards(store: Store, select_dir: str, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """(set, id) -> the shard of each wanted item of a shards set (sets given as vectors have none)."""
    from ..select.eval_sets import EVAL_DIR

    out: dict[tuple[str, str], str] = {}
    for name in {s for s, _ in wanted}:
        folder = join(select_dir, EVAL_DIR, name)
        if not store.exists(folder):
            continue
        ids = {i for s, i in wanted if s == name}
        for url in sorted(store.glob(join(folder, "*.parquet"))):
            table = store.read_parquet(url, columns=["id", "shard"]).to_pydict()
            out.update({(name, i): s for i, s in zip(table["id"], table["shard"]) if i in ids})
    return out


__all__ = ["EvalCopy", "GALLERY_PAIRS", "find_eval_copies"]
