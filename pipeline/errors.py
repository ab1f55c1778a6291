"""What can go wrong, and the exit code that tells a scheduler what to do about it.

| code | exception | meaning | what a scheduler / user does |
|---|---|---|---|
| 0 | - | done | - |
| 1 | anything else | the job failed (I/O, a node lost, a bug) | retry: every stage resumes from what it committed |
| 2 | :class:`ConfigError`, :class:`UsageError` | the config, the arguments or an input location cannot work | fix the config; a retry gives the same answer |
| 3 | :class:`StaleStageError` | committed output was made with other settings | ``--force-from STAGE`` or another workdir |
| 4 | :class:`PreconditionError` | an earlier stage is not committed (``d2prune select`` before ``graph``) | run the earlier stage (``d2prune run``) |
| 130 | KeyboardInterrupt | interrupted | rerun to resume |

Only exit 1 promises that running the same command again can succeed; the Slurm script requeues
on it alone. Every non-zero exit prints one line ``d2prune: error: ...`` on stderr
(:func:`one_line`).
"""

from __future__ import annotations

import re

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_STALE, EXIT_PRECONDITION, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


class UsageError(ConfigError):
    """Bad command-line arguments."""


class StaleStageError(RuntimeError):
    """Committed output was produced with settings other than the current config's."""


class PreconditionError(RuntimeError):
    """A stage was asked to run before the stage it reads from was committed."""


def innermost(err: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (RayTaskError.cause) and explicit chaining."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException) and cause is not err:
            err = cause
        elif err.__cause__ is not None and type(err).__module__.startswith("ray"):
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
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    inner = innermost(err)  # e.g. the error inside a Ray task
    if inner is not err:
        return exit_code_for(inner)
    return EXIT_FAILED


_EXC_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit)): (.+)$")


def one_line(err: BaseException) -> str:
    """A one-line reason: the original exception's type and first line (config errors: every key)."""
    if isinstance(err, ConfigError):
        return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    inner = innermost(err)
    lines = [line for line in str(inner).splitlines() if line.strip()]
    if type(inner).__module__.startswith("ray") and len(lines) > 1:
        # a remote traceback as text: its last "SomeError: message" line is the cause
        found = [m for m in map(_EXC_LINE.match, lines) if m and not m.group(1).startswith("ray.")]
        if found:
            return f"{found[-1].group(1)}: {found[-1].group(2).strip()}"
    name = type(inner).__name__
    return f"{name}: {lines[0].strip()}" if lines else name
