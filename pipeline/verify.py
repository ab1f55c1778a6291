"""``d2prune verify CONFIG``: is every committed file of the workdir and the output still what its
stage committed? Reads, never writes (no lease is taken; a running job may hold the workdir).

For every committed stage (``_SUCCESS.json``), in pipeline order:

1. its manifest (``_MANIFEST.json``, :mod:`pipeline.formats.manifest`) against one recursive
   listing of its folder (and of ``output.url`` for the write stage): a file missing, or of another
   size than committed, or, where the store's listing gives content checksums (S3's ETag of a
   single-part upload), with another checksum;
2. every file that passed as its format: a parquet file's magic bytes and footer (one or two small
   ranged reads, no data pages), a JSON file parses, an ``.npy`` header matches the file's size, an
   ``.npz`` ends with a zip directory, a tar ends with its end-of-archive blocks.

A stage committed before manifests were recorded gets the format checks of the files in its folder
(and a line saying so). Each damaged file is one line on stdout: the file, what is wrong, and the
``--force-from STAGE`` that recomputes it; the exit code is 0 when everything is intact and 3
(:data:`pipeline.errors.EXIT_STALE`, what ``d2prune run`` exits with when it meets the damage) when
something is damaged.
"""

from __future__ import annotations

import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import workdir
from .config import JobConfig
from .formats import manifest
from .formats.manifest import Damage
from .storage import Store

log = logging.getLogger(__name__)

STAGES = (workdir.EMBED, workdir.GRAPH, workdir.SELECT, workdir.WRITE)
FORMAT_CHECK_THREADS = 16
_TAR_END = 1024  # two zero blocks end every tar archive


@dataclass
class Report:
    damaged: list[Damage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one per stage: committed, files checked, ...

    @property
    def intact(self) -> bool:
        return not self.damaged


def format_problem(store: Store, url: str, size: int) -> str | None:
    """What is wrong with committed file `url` of `size` bytes as its format (by its suffix), or
    None. Reads at most a footer or a header (ranged reads), never the whole of a data file."""
    name = url.rsplit("/", 1)[-1]
    suffix = name.rsplit(".", 1)[-1] if "." in name else ""
    if suffix not in ("parquet", "json", "npy", "npz", "tar"):
        return None
    if size == 0:
        return "empty (0 bytes)"
    try:
        if suffix == "parquet":
            import pyarrow.parquet as pq

            if size < 12 or store.read_range(url, 0, 4) != b"PAR1" or store.read_range(url, size - 4, size) != b"PAR1":
                return "not a parquet file (its magic bytes are missing: truncated or overwritten)"
            with store.open(url, "rb") as fh:
                pq.ParquetFile(fh).metadata  # noqa: B018 - parses the footer
        elif suffix == "json":
            json.loads(store.read_bytes(url).decode())
        elif suffix == "npy":
            import numpy as np

            head = io.BytesIO(store.read_range(url, 0, min(size, 65536)))
            version = np.lib.format.read_magic(head)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(head)
            expected = head.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if expected != size:
                return f"its .npy header says {expected} bytes, the file has {size}"
        elif suffix == "npz":
            if size < 22 or store.read_range(url, size - 22, size - 18) != b"PK\x05\x06":
                return "not a complete .npz (no zip directory at its end: truncated or overwritten)"
        elif suffix == "tar":
            if size % 512 or store.read_range(url, size - _TAR_END, size) != bytes(_TAR_END):
                return "not a complete tar (no end-of-archive blocks: truncated or overwritten)"
    except FileNotFoundError:
        return "missing"
    except Exception as err:  # noqa: BLE001 - what the reader says is the finding
        return f"unreadable as .{suffix} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return None


def verify(cfg: JobConfig, store: Store, formats: bool = True) -> Report:
    """Every committed file of `cfg`'s workdir and output checked (module docstring); nothing written."""
    report = Report()
    for stage in STAGES:
        directory = workdir.stage_dir(cfg.workdir, stage)
        if workdir.read_success(store, directory) is None:
            report.notes.append(f"{stage}: not committed (nothing to check)")
            continue
        try:
            recorded = manifest.read(store, directory)
        except Exception as err:  # noqa: BLE001 - a damaged manifest is a finding
            report.damaged.append(Damage(manifest.url_of(directory, None, manifest.MANIFEST), stage,
                                         str(err).split(": ", 1)[-1].split("; rerun")[0]))
            continue
        if recorded is None:
            now = manifest.listing(store, directory)
            files = {manifest.url_of(directory, cfg.output.url, p): info["size"] for p, info in now.items()}
            damage: list[Damage] = []
            note = (f"{stage}: committed without {manifest.MANIFEST} (before manifests were recorded): "
                    f"sizes not checked, {len(files)} file(s) checked as their formats")
        else:
            damage = manifest.check(store, directory, recorded, cfg.output.url, etags=True)
            bad = {d.url for d in damage}
            files = {manifest.url_of(directory, cfg.output.url, p): s
                     for p, s in zip(recorded["paths"], recorded["sizes"])}
            files = {u: s for u, s in files.items() if u not in bad}
            note = f"{stage}: {len(recorded['paths'])} committed file(s) checked"
        if formats and files:
            with ThreadPoolExecutor(FORMAT_CHECK_THREADS) as pool:
                found = pool.map(lambda item: (item[0], format_problem(store, *item)), sorted(files.items()))
                damage += [Damage(url, stage, problem) for url, problem in found if problem]
        report.damaged += damage
        report.notes.append(note + (f", {len(damage)} damaged" if damage else ", intact"))
    return report


def verify_command(config: str, overrides: list[str] | None = None) -> int:
    """``d2prune verify CONFIG``: one line per damaged file on stdout, a line per stage on stderr;
    exit 0 when every committed file is intact, 3 when one is not."""
    import sys

    from .config import load_config
    from .errors import EXIT_OK, EXIT_STALE

    cfg = load_config(config, overrides)
    store = Store(cfg.storage)
    report = verify(cfg, store)
    for note in report.notes:
        print(f"d2prune verify: {note}", file=sys.stderr)
    for damage in report.damaged:
        print(f"DAMAGED {damage.line()}")
    if report.intact:
        print(f"d2prune verify: every committed file of {cfg.workdir} and {cfg.output.url} is intact", file=sys.stderr)
        return EXIT_OK
    stages = sorted({d.stage for d in report.damaged}, key=list(STAGES).index)
    print(f"d2prune verify: {len(report.damaged)} damaged file(s); rerun `d2prune run` with --force-from "
          f"{stages[0]} to recompute them", file=sys.stderr)
    return EXIT_STALE
