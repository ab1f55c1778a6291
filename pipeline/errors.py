"""What can go wrong, and the exit code that tells a scheduler what to do about it.

| code | exception | meaning | what a scheduler / user does |
|---|---|---|---|
| 0 | - | done | - |
| 1 | anything else | the job failed (I/O, a node lost, a bug; :class:`StallError`: no progress for ``job.stall_timeout_s``) | retry: every stage resumes from what it committed |
| 2 | :class:`ConfigError`, :class:`UsageError` | the config, the arguments or an input location cannot work | fix the config; a retry gives the same answer |
| 3 | :class:`StaleStageError` | committed output was made with other settings | ``--force-from STAGE`` or another workdir |
| 3 | :class:`DamagedFileError` | a committed file is damaged (size differs from its commit, unreadable); ``d2prune verify`` exits 3 when it finds one | ``--force-from STAGE`` (the stage the message names) |
| 4 | :class:`PreconditionError` | an earlier stage is not committed (``d2prune select`` before ``graph``) | run the earlier stage (``d2prune run``) |
| 5 | :class:`LeaseHeldError` | another job holds the workdir's lease (:mod:`pipeline.lease`) | wait for it (``d2prune lease CONFIG`` says who); a retry after it ends succeeds |
| 143, 130 | :class:`JobInterrupted` (SIGTERM, SIGINT), KeyboardInterrupt | stopped by a signal (a preempted pod, a Slurm time limit, ^C): the running stage stopped, nothing half-written committed, the lease released, an embedded Ray shut down | rerun the same command: it resumes |

Only exit 1 promises that running the same command again can succeed; the Slurm script requeues
on it alone (exit 5 succeeds once the other job ends). Every non-zero exit prints one line ``d2prune: error: ...`` on stderr
(:func:`one_line`); a stop by a signal prints ``d2prune: stopped by SIGTERM during the embed stage; rerun
the same command to resume`` instead (:mod:`pipeline.runtime`'s stop-signal handling).
"""

from __future__ import annotations

import re
import signal

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_STALE, EXIT_PRECONDITION, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_BUSY = 5
EXIT_SIGNAL_BASE = 128  # stopped by signal N: exit 128 + N (the shell's convention): SIGTERM 143, SIGINT 130


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


class UsageError(ConfigError):
    """Bad command-line arguments."""


class StaleStageError(RuntimeError):
    """Committed output was produced with settings other than the current config's."""


class DamagedFileError(StaleStageError):
    """A committed file is no longer what its stage committed (truncated, overwritten, deleted: its
    size differs from the commit's manifest) or cannot be read as its format. The message names the
    file and the ``--force-from STAGE`` that recomputes it (exit 3, like stale output: a retry gives
    the same answer; ``d2prune verify CONFIG`` lists every damaged file)."""


class PreconditionError(RuntimeError):
    """A stage was asked to run before the stage it reads from was committed."""


class StallError(RuntimeError):
    """A stage committed nothing and made no progress for ``job.stall_timeout_s`` (exit 1: a retry
    resumes; :mod:`pipeline.watchdog`)."""


class LeaseHeldError(RuntimeError):
    """Another job holds the work directory's lease (it is running, or died less than a lease
    timeout ago): running now would make two jobs write the same files."""


class JobInterrupted(KeyboardInterrupt):
    """The job was told to stop by `signum` (SIGTERM: a preempted pod, a Slurm time limit, ``ray job
    stop``; SIGINT: ^C) while `stage` ran (None: before or between stages). A KeyboardInterrupt, the
    one exception Ray's blocking calls let through, so the running stage stops at once; exit
    128 + signum (:attr:`code`), and a rerun of the same command resumes."""

    def __init__(self, signum: int, stage: str | None = None):
        self.signum, self.stage = int(signum), stage
        super().__init__(self.message())

    def __reduce__(self):
        return type(self), (self.signum, self.stage)

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def code(self) -> int:
        return EXIT_SIGNAL_BASE + self.signum

    def message(self) -> str:
        where = f" during the {self.stage} stage" if self.stage else ""
        return f"stopped by {self.signal_name}{where}; rerun the same command to resume"


def _is_marker(err: BaseException) -> bool:
    """Ray Data raises the real error ``from SystemException()``: a marker with no message."""
    return type(err).__module__.startswith("ray") and not str(err).strip()


def innermost(err: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (RayTaskError.cause) and explicit chaining."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException) and cause is not err and not _is_marker(cause):
            err = cause
        elif (err.__cause__ is not None and type(err).__module__.startswith("ray")
              and not _is_marker(err.__cause__)):
            err = err.__cause__
        else:
            break
    return err


def exit_code_for(err: BaseException) -> int:
    if isinstance(err, ConfigError):
        return EXIT_CONFIG
    if isinstance(err, StaleStageError):
        return EXIT_STALE
    if isinstance(err, PreconditionError):
        return EXIT_PRECONDITION
    if isinstance(err, LeaseHeldError):
        return EXIT_BUSY
    if isinstance(err, JobInterrupted):
        return err.code
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    inner = innermost(err)  # e.g. the error inside a Ray task
    if inner is not err:
        return exit_code_for(inner)
    return EXIT_FAILED


_EXC_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit)): (.+)$")


def _joined(lines: list[str]) -> str:
    """A heading ending in ':' and the lines it introduces (a listing of keys or shards) as one line."""
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {'; '.join(lines[1:])}"
    return "; ".join(lines)


def one_line(err: BaseException) -> str:
    """A one-line reason: the original exception's type and message (config errors: every key;
    a message that introduces a listing, such as the shards that could not be read: all of it)."""
    if isinstance(err, ConfigError):
        return _joined([line.strip() for line in str(err).splitlines() if line.strip()])
    inner = innermost(err)
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    if type(inner).__module__.startswith("ray") and len(lines) > 1:
        # a remote traceback as text: its last "SomeError: message" line is the cause
        found = [(i, m) for i, m in enumerate(map(_EXC_LINE.match, lines)) if m and not m.group(1).startswith("ray.")]
        if found:
            i, match = found[-1]
            message = match.group(2).strip()
            if message.endswith(":"):  # "Error(s) in loading state_dict for CLIP:" + one line per problem
                message = _joined([message] + lines[i + 1: i + 4])
            return f"{match.group(1)}: {message}"
    name = type(inner).__name__
    if not lines:
        return name
    return f"{name}: {_joined(lines) if lines[0].endswith(':') else lines[0]}"
