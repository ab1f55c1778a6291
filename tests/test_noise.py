"""Output a user reads: stdout holds only the summary (C and Ray worker output go to stderr), no
'No pretrained weights loaded' for the driver's weightless build, one readable line for an error
that Ray Data wraps."""

from __future__ import annotations

import logging
import subprocess
import sys

from pipeline.errors import one_line


def test_stdout_holds_only_the_summary_even_for_c_level_output():
    code = """
import ctypes, os, sys
from pipeline.console import stdout_for_summary_only
libc = ctypes.CDLL(None)
with stdout_for_summary_only() as out:
    libc.printf(b"printf from C++\\n"); libc.fflush(None)  # FAISS prints like this
    os.write(1, b"raw write to fd 1\\n")
    print("print from Python (a Ray worker's line forwarded to the driver)")
    print("d2prune summary", file=out)
print("after the job: stdout is stdout again")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "d2prune summary\nafter the job: stdout is stdout again\n"
    for noise in ("printf from C++", "raw write to fd 1", "print from Python"):
        assert noise in run.stderr


def test_no_random_weights_warning_for_the_weightless_preprocessing_build(caplog):
    from pipeline.embed.model import ModelSpec, preprocess_config
    from pipeline.testing import TINY_MODEL_CONFIG, TINY_MODEL_NAME

    import json

    caplog.set_level(logging.INFO)
    preprocess_config(ModelSpec(TINY_MODEL_NAME, "/some/checkpoint.pt", json.dumps(TINY_MODEL_CONFIG)))
    assert not [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]
    assert not logging.getLogger().filters  # the filter is gone afterwards


def test_an_error_wrapped_by_ray_data_reads_as_its_cause():
    class ActorDiedError(Exception):
        pass

    class SystemException(Exception):
        pass

    ActorDiedError.__module__, SystemException.__module__ = "ray.exceptions", "ray.data.exceptions"
    err = ActorDiedError("The actor died because of an error raised in its creation task\nTraceback (most recent "
                         "call last):\n  File \"x.py\", line 1\nRuntimeError: Error(s) in loading state_dict for CLIP:\n"
                         "\tsize mismatch for visual.proj: copying a param with shape [64, 16]")
    err.__cause__ = SystemException()  # what Ray Data raises it "from"
    assert one_line(err) == ("RuntimeError: Error(s) in loading state_dict for CLIP: size mismatch for visual.proj: "
                             "copying a param with shape [64, 16]")
