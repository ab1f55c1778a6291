"""Ray job entrypoint: the whole d2prune job, as `ray job submit` and a KubeRay RayJob run it.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/filter_pool.py s3://bucket/jobs/laion.yaml --set select.prune_rate=0.5

The config is a local path or any fsspec URL. When the config itself lives on an S3-compatible
endpoint other than AWS, set botocore's standard AWS_ENDPOINT_URL_S3 for the job (the job's data
then goes through the config's own storage.endpoint_url). Inside a Ray job RAY_ADDRESS is set, so the stages join the
cluster rather than starting a local Ray. The exit status is the CLI's (0 done, 1 failed, 2 bad
config, 3 committed output made with other settings, 4 an earlier stage missing, 5 another job holds
the workdir, 143/130 stopped by SIGTERM/SIGINT), so the RayJob's status says what happened. A stop
(``ray job stop``, a preempted pod) is the CLI's too: the running stage stops, the workdir's lease is
released, the driver leaves the cluster (never shutting it down), one line on stderr, exit 143, and
resubmitting the same job resumes.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import main
from pipeline.job import STAGE_NAMES


def parse(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description="d2prune as a Ray job")
    parser.add_argument("config", help="YAML config: local path or fsspec URL (s3://...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--force-from", default=None, choices=STAGE_NAMES)
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    cli = (["-v"] if args.verbose else []) + ["run", args.config]
    for item in args.overrides:
        cli += ["--set", item]
    if args.force_from:
        cli += ["--force-from", args.force_from]
    if args.address:
        cli += ["--address", args.address]
    return cli


if __name__ == "__main__":
    sys.exit(main(parse()))
