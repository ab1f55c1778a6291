"""``WORKDIR/selection/``: what the select stage commits.

``selected.parquet``: one row per ranked sample, in selection order: the configured budget's
selection and, when ``select.keep_rates`` asks for larger budgets, the nodes ranked after it up to
the largest (``selected`` false; :func:`read_selected` returns the configured selection only)::

    uid            string
    rank           int64    0 = picked first
    forward_score  float64  the score the reverse pass started from (shifted to be >= 0)
    final_score    float64  the score when picked
    partition      int32    the partition that picked it in the approximate mode; -1 where the
                            selection does not depend on partitions (exact D2, the baselines)
    selected       bool     rank < the configured budget

``subset.npy`` is what DataComp's resharder reads with ``--subset_file``: a 1-D numpy structured
array of dtype ``u8,u8`` (two little-endian uint64 fields: the upper and lower 64 bits of the
128-bit hex uid), sorted ascending (the resharder binary-searches it), saved with ``np.save``.
Only hex uids of at most 32 digits (DataComp's and our md5 default) can be written there.
``subset_keep{rate}.npy``: the same for each extra keep rate of ``select.keep_rates``.

``nodes/part-PPPPP.parquet`` (one per partition, rows in node order; together every node once)::

    node           int64    graph node id
    uid            string
    score          float64  the raw ``select.score`` value
    prefiltered    bool     dropped by a pre-filter, DataComp's basic filter or β (then not in the
                            graph: no scores below)
    prefilter      string   which one: "" (kept), the basic filter's rule
                            (:data:`pipeline.core.basic_filter.RULES`), "exact_duplicate",
                            "eval_duplicate" or "beta"
    rank           int64    selection rank up to the largest budget, -1 when not ranked
    forward_score  float64  D2: the forward pass's score; baselines: the shifted score (NaN if pre-filtered)
    final_score    float64  D2: the score when picked, for the others the score after every
                            suppression by the configured budget's selection; baselines: shifted score
    blame_node     int64    D2, a node not selected at the configured budget: the selected neighbour
                            whose single suppression of it was largest (ties: lower id); else -1
    blame_amount   float64  that suppression, in score units (0.0 when blame_node is -1)

``decisions.parquet/part-NNNNN.parquet`` (one per embedding part, same NNNNN as the part and its
input shard; together one row per input sample): what happened to each sample and why::

    shard          string   the input shard URL
    key            string   the sample's key in that shard
    uid            string   "" when a skipped sample had none
    decision       string   skipped | prefiltered | selected | ranked | pruned
                            (:mod:`pipeline.core.decide`; ranked = only for a larger keep rate)
    reason         string   skipped: the embed stage's reason; prefiltered: the basic filter's rule,
                            "exact_duplicate", "eval_duplicate" or "beta"; else ""
    rank           int64    selection rank (selected, ranked), else -1
    score          float64  the raw ``select.score`` value (NaN when skipped)
    blame_uid      string   D2, a candidate not selected at the configured budget: the selected
                            neighbour whose suppression of it was largest (``blame_node``); an
                            ``exact_duplicate``: the sample with the same image bytes that stayed
                            (the earliest); else ""
    blame_amount   float64  that suppression (0.0 without one)

    with select.prefilter.decontaminate only (appended; null except on ``eval_duplicate`` rows):
    eval_set        string   the evaluation set's name
    eval_id         string   the evaluation item's id (its key for a shards set, its id for vectors)
    eval_similarity float64  the cosine of the two image vectors (>= the threshold)

The embedded samples' rows come first, in the part's row order, then the part's skip records
(``embeddings/_skipped/part-NNNNN.parquet``) when the embed stage wrote them.
"""

from __future__ import annotations

import io
import re

import numba
import numpy as np

from ..core.basic_filter import RULES
from ..storage import Store, damaged_on_error, join
from ..workdir import committed_parts

SELECTED = "selected.parquet"
DECISIONS_DIR = "decisions.parquet"
SUBSET = "subset.npy"
NODES_DIR = "nodes"
DATACOMP_UID_DTYPE = np.dtype([("f0", "<u8"), ("f1", "<u8")])  # == np.dtype("u8,u8") on x86/ARM
_HEX_UID = re.compile(r"^[0-9a-fA-F]{1,32}$")


def selected_schema():
    import pyarrow as pa

    return pa.schema([("uid", pa.string()), ("rank", pa.int64()), ("forward_score", pa.float64()),
                      ("final_score", pa.float64()), ("partition", pa.int32()), ("selected", pa.bool_())])


def selected_table(uids, rank_start: int, forward, final, partition, budget: int):
    """A block of selected.parquet's rows, in selection order from rank ``rank_start``."""
    import pyarrow as pa

    n = len(uids)
    rank = np.arange(rank_start, rank_start + n, dtype=np.int64)
    return pa.table({
        "uid": uids if isinstance(uids, (pa.Array, pa.ChunkedArray)) else pa.array(list(uids), pa.string()),
        "rank": pa.array(rank),
        "forward_score": pa.array(np.asarray(forward, np.float64)),
        "final_score": pa.array(np.asarray(final, np.float64)),
        "partition": pa.array(np.asarray(partition, np.int32)),
        "selected": pa.array(rank < budget),
    }, schema=selected_schema())


def read_selected(store: Store, directory: str, columns: list[str] | None = None, ranked: bool = False):
    """selected.parquet: the configured budget's selection (``ranked``: every ranked row). A file
    without the ``selected`` column (written before keep rates existed) is all selection."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    url = join(directory, SELECTED)
    with damaged_on_error(url), store.open(url, "rb") as fh:
        pf = pq.ParquetFile(fh)
        flag = not ranked and "selected" in pf.schema_arrow.names
        cols = None if columns is None else list(dict.fromkeys(columns + (["selected"] if flag else [])))
        table = pf.read(columns=cols)
    if flag:
        table = table.filter(pc.field("selected"))
        if columns is not None and "selected" not in columns:
            table = table.drop_columns(["selected"])
    return table


def subset_name(rate: float | None) -> str:
    """``subset.npy`` for the configured budget, ``subset_keep{rate}.npy`` for an extra keep rate."""
    return SUBSET if rate is None else f"subset_keep{rate:g}.npy"


def node_part_urls(store: Store, directory: str) -> list[str]:
    """The committed ``nodes/part-PPPPP.parquet`` files of the selection in `directory`, in
    partition order ([] when there are none: a selection committed before they existed)."""
    nodes_dir = join(directory, NODES_DIR)
    return committed_parts(store, nodes_dir) if store.exists(nodes_dir) else []


def iter_node_batches(store: Store, url: str, columns: list[str], batch_rows: int = 65536):
    """One ``nodes/part-PPPPP.parquet`` file as dicts of numpy arrays of at most `batch_rows`
    rows, in its (node) order: a reader never holds more than one batch of a partition."""
    import pyarrow.parquet as pq

    with damaged_on_error(url), store.open(url, "rb") as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows, columns=columns):
            yield {c: batch.column(c).to_numpy(zero_copy_only=False) for c in columns}


BETA = "beta"
EXACT_DUPLICATE = "exact_duplicate"
EVAL_DUPLICATE = "eval_duplicate"
# prefilter codes (int8): -1 kept, i < len(RULES) the basic filter's rule i, len(RULES) the β
# pre-filter, then select.prefilter.exact_duplicates and select.prefilter.decontaminate (after β
# in the numbering only: they run before it)
PREFILTER_KEPT = -1
PREFILTER_BETA = len(RULES)
PREFILTER_EXACT = len(RULES) + 1
PREFILTER_EVAL = len(RULES) + 2
PREFILTER_LABELS = ("",) + RULES + (BETA, EXACT_DUPLICATE, EVAL_DUPLICATE)


def prefilter_labels(codes):
    """The ``prefilter`` strings of prefilter codes (a dictionary lookup, no Python strings per row)."""
    import pyarrow as pa

    codes = np.asarray(codes, np.int64)
    if codes.size and (codes.min() < PREFILTER_KEPT or codes.max() > PREFILTER_EVAL):
        raise ValueError(f"prefilter codes must lie in {PREFILTER_KEPT}..{PREFILTER_EVAL}")
    return pa.DictionaryArray.from_arrays(pa.array((codes + 1).astype(np.int32)),
                                          pa.array(PREFILTER_LABELS, pa.string())).cast(pa.string())


def nodes_table(node, uid, score, prefilter_codes, rank, forward, final, blame_node, blame_amount):
    """A ``nodes/part-PPPPP.parquet`` table (module docstring); ``prefilter_codes`` as
    :func:`prefilter_labels` reads them."""
    import pyarrow as pa

    codes = np.asarray(prefilter_codes, np.int64)
    return pa.table({
        "node": pa.array(np.asarray(node, np.int64)), "uid": uid,
        "score": pa.array(np.asarray(score, np.float64)), "prefiltered": pa.array(codes != PREFILTER_KEPT),
        "prefilter": prefilter_labels(codes),
        "rank": pa.array(np.asarray(rank, np.int64)), "forward_score": pa.array(np.asarray(forward, np.float64)),
        "final_score": pa.array(np.asarray(final, np.float64)),
        "blame_node": pa.array(np.asarray(blame_node, np.int64)),
        "blame_amount": pa.array(np.asarray(blame_amount, np.float64)),
    })


def decisions_schema(eval_columns: bool = False):
    """The decisions schema; ``eval_columns`` (select.prefilter.decontaminate on) appends
    :data:`EVAL_COLUMNS`."""
    import pyarrow as pa

    fields = [("shard", pa.string()), ("key", pa.string()), ("uid", pa.string()),
              ("decision", pa.string()), ("reason", pa.string()), ("rank", pa.int64()),
              ("score", pa.float64()), ("blame_uid", pa.string()), ("blame_amount", pa.float64())]
    if eval_columns:
        fields += [("eval_set", pa.string()), ("eval_id", pa.string()), ("eval_similarity", pa.float64())]
    return pa.schema(fields)


EVAL_COLUMNS = ("eval_set", "eval_id", "eval_similarity")


def decisions_table(shard, key, uid, decision_codes, reason, rank, score, blame_uid, blame_amount, evals=None):
    """A ``decisions.parquet`` part (module docstring): string columns as pyarrow arrays,
    ``decision_codes`` int8 indices into :data:`pipeline.core.decide.DECISIONS`; ``evals`` (with
    select.prefilter.decontaminate): (eval_set, eval_id, eval_similarity) arrays, null where the
    row is not an ``eval_duplicate``."""
    import pyarrow as pa

    from ..core.decide import DECISIONS

    codes = np.asarray(decision_codes, np.int32)
    decision = pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(DECISIONS, pa.string())).cast(pa.string())
    return pa.Table.from_arrays([
        shard, key, uid, decision, reason, pa.array(np.asarray(rank, np.int64)), pa.array(np.asarray(score, np.float64)),
        blame_uid, pa.array(np.asarray(blame_amount, np.float64))] + list(evals or ()),
        schema=decisions_schema(evals is not None))


@numba.njit(cache=True, nogil=True)
def _hex_pairs(offsets, data):
    n = offsets.shape[0] - 1
    hi = np.zeros(n, np.uint64)
    lo = np.zeros(n, np.uint64)
    ok = np.ones(n, np.bool_)
    for i in range(n):
        a, b = offsets[i], offsets[i + 1]
        if b - a < 1 or b - a > 32:
            ok[i] = False
            continue
        h = np.uint64(0)
        low = np.uint64(0)
        for j in range(a, b):
            c = data[j]
            if 48 <= c <= 57:
                v = c - 48
            elif 97 <= c <= 102:
                v = c - 87
            elif 65 <= c <= 70:
                v = c - 55
            else:
                ok[i] = False
                break
            # shift the 128-bit (h, low) left by 4 and add v
            h = (h << np.uint64(4)) | (low >> np.uint64(60))
            low = (low << np.uint64(4)) | np.uint64(v)
        if ok[i]:
            hi[i] = h
            lo[i] = low
    return hi, lo, ok


def hex_uid_pairs(uids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(upper 64 bits, lower 64 bits, valid) of each uid read as a hex number of 1 to 32 digits
    (valid false for any other string): the subset file's two fields, without Python ints."""
    from .shuffle import _string_buffers

    offsets, data = _string_buffers(uids)
    return _hex_pairs(offsets, data)


def not_hex_message(count: int, examples) -> str:
    return (f"{count} uids are not 128-bit hex strings (DataComp subset files hold only those), "
            f"e.g. {', '.join(repr(u) for u in list(examples)[:5])}")


def npy_header(n: int) -> bytes:
    """The ``.npy`` header np.save writes for ``n`` subset entries (the data follows it)."""
    buf = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(np.zeros(0, DATACOMP_UID_DTYPE))
    header["shape"] = (int(n),)
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def datacomp_subset(uids) -> np.ndarray:
    """uids as DataComp's resharder reads them: dtype ``u8,u8`` (upper, lower 64 bits), sorted.

    Raises ValueError naming up to five uids that are not hex strings of at most 32 digits.
    """
    uids = [str(u) for u in uids]
    bad = [u for u in uids if not _HEX_UID.match(u)]
    if bad:
        raise ValueError(not_hex_message(len(bad), bad))
    out = np.empty(len(uids), DATACOMP_UID_DTYPE)
    for i, u in enumerate(uids):
        value = int(u, 16)
        out[i] = (value >> 64, value & 0xFFFF_FFFF_FFFF_FFFF)
    out.sort()
    return out


def subset_npy_bytes(subset: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, subset, allow_pickle=False)
    return buf.getvalue()
