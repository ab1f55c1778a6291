"""The job on a real multi-node Ray cluster, as a user with a cluster runs it: a head and two
workers started with ``ray start`` on 127.0.0.1 (tests/cluster.py), ``jobs/filter_pool.py``
submitted through the Job Submission API with a working dir, data on S3 (a moto server on
127.0.0.1). What it shows:

* the submitted job's output equals a local run's, byte for byte;
* a worker lost (its raylet killed) during embed, during graph and during write: the job completes,
  or fails with the stall error and its resubmission completes, with byte-identical output; the
  node-local caches (checkpoint copies, merged index) are gone from every node afterwards;
* relative paths: resolved against the config file (and then seen by every node), or refused
  with exit 2 naming the path when the nodes would each see their own copy.

And the README's one-machine recipe ("The same on one machine" in "Run on a cluster") read from
the README and run by bash as written: ``ray start`` for a head and two workers, the wait for the
job agent, ``ray job submit --working-dir . -- python jobs/filter_pool.py CONFIG``. What that test
changes, and why: the ports (6379, 8265, 52365) are free ports of its own and CONFIG is its config
file; bash runs with ``TMPDIR`` set to the test's own directory (Ray's default temp dir, which the
worker nodes take from the head, is then not another run's ``/tmp/ray``) and the venv's bin first on
``PATH`` (an activated venv); a worker's ``ray start`` runs through the same ``ray start`` command
line with Ray's replacement of 127.0.0.1 by the machine's address switched off
(:data:`cluster.WORKER_START`, a bash function ``ray`` in front of the recipe); instead of ``ray
stop`` (which ends every Ray of the machine's user) its processes are ended by pid. The regression
it guards: the driver ended with ``Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so`` once
a worker node unpacked the working dir over the driver's cwd
(:func:`pipeline.runtime.leave_ray_working_dir_copy`).

A few minutes on 2 cores: one small pool, the tiny model, one cluster for the module (and the
README's three nodes, up only during their test, which runs first).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.storage import Store
from pipeline.testing import make_config, save_random_checkpoint, write_pool

# tests/cluster.py (tests/ is on sys.path, not a package)
from cluster import WORKER_START, free_port, kill_processes_mentioning, start_cluster

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# what the job's working dir upload leaves out (the repository's .gitignore is honoured too)
EXCLUDES = ["tests/", "docs/", "benchmarks/", ".git/", "*.png"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@pytest.fixture(scope="module")
def cluster():
    cluster = start_cluster(workers=2)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.base, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_pool(s3_bucket, s3_store):
    return write_pool(f"{s3_bucket}/cluster-pool", store=s3_store, n_shards=6, per_shard=20, seed=5, broken=True)


@pytest.fixture(scope="module")
def s3_checkpoint(s3_bucket, s3_store, tmp_path_factory):
    local = save_random_checkpoint(str(tmp_path_factory.mktemp("cluster-ckpt") / "tiny.pt"), seed=77)
    url = f"{s3_bucket}/models/tiny.pt"
    s3_store.write_local_file(url, local)
    return url


def job_yaml(path: Path, workdir: str, output: str, pool, checkpoint: str, s3_server: str) -> str:
    """A job config file for the test pool: the tiny model with a checkpoint on S3, small parts so
    each stage runs several tasks (time to lose a node in each), a short stall timeout."""
    cfg = make_config(
        "/placeholder/work", pool.shards, "/placeholder/out",  # replaced below (they must differ: no overlap)
        storage={"endpoint_url": s3_server},
        embed={"pretrained": checkpoint, "num_actors": 2, "batch_size": 8},
        graph={"index": "ivfflat", "nlist": 4, "nprobe": 4},
        # short, yet above the start-up of the actors and read tasks (torch imports, model load:
        # over a minute on 2 shared cores), which is progress-free too
        job={"stall_timeout_s": 150},
        overrides=["output.samples_per_shard=4"],
    )
    raw = cfg.model_dump(mode="json")
    raw["workdir"], raw["output"]["url"] = workdir, output
    # the tiny architecture's config is read by the driver only (and shipped in the model spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def cfg_storage(s3_server: str):
    from pipeline.config import StorageConfig

    return StorageConfig(endpoint_url=s3_server)


def artefacts(store: Store, workdir: str, output: str) -> dict[str, bytes]:
    """Every file whose bytes must not depend on where or how often the job ran."""
    files = {}
    for pattern in ("embeddings/part-*.parquet", "graph/part-*.parquet", "selection/selected.parquet",
                    "selection/subset.npy"):
        for url in store.glob(f"{workdir}/{pattern}"):
            files[url[len(workdir):]] = store.read_bytes(url)
    for url in store.glob(f"{output}/**"):
        if url.endswith((".tar", ".parquet")):
            files["OUT" + url[len(output):]] = store.read_bytes(url)
    return files


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cluster_pool, s3_checkpoint, s3_server, s3_store):
    """The same job run locally (embedded Ray, `d2prune run`), in a process of its own."""
    import subprocess
    import sys

    base = tmp_path_factory.mktemp("local-run")
    config = job_yaml(base / "job.yaml", str(base / "work"), str(base / "out"), cluster_pool, s3_checkpoint, s3_server)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", config], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    files = artefacts(Store(), str(base / "work"), str(base / "out"))
    assert any(k.startswith("OUT") and k.endswith(".tar") for k in files)
    return files


def submit(cluster, entrypoint: str, working_dir: str, s3_server: str) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.headers)
    runtime_env = {
        "working_dir": working_dir,
        "excludes": EXCLUDES,
        # what a user passes for S3 (here the moto server's fake credentials), and the endpoint
        # of the config itself when it lives on S3
        "env_vars": {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
        | {"AWS_ENDPOINT_URL_S3": s3_server},
    }
    return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)


def wait(cluster, job_id: str, timeout_s: float = 480) -> tuple[str, str, object]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.headers)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = client.get_job_info(job_id)
        if str(info.status) in TERMINAL or getattr(info.status, "value", None) in TERMINAL:
            return str(getattr(info.status, "value", info.status)), client.get_job_logs(job_id), info
        time.sleep(2)
    client.stop_job(job_id)
    raise TimeoutError(f"job {job_id} did not finish in {timeout_s} s:\n{client.get_job_logs(job_id)[-4000:]}")


RECIPE_HEADING = "**The same on one machine**"
# in front of the recipe: a worker node's `ray start` through cluster.WORKER_START (same arguments)
RAY_FUNCTION = """ray() {
    if [ "$1" = start ] && [ "$2" != --head ]; then python -c "$D2PRUNE_WORKER_START" "$@"; else command ray "$@"; fi
}
"""


def readme_recipe() -> list[str]:
    """The command lines of the README's one-machine cluster recipe (its first indented block)."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(RECIPE_HEADING))
    block: list[str] = []
    for line in lines[start + 1:]:
        if line.startswith("    "):
            if block and block[-1].endswith("\\"):  # a continued line
                block[-1] = block[-1][:-1] + line.strip()
            else:
                block.append(line.strip())
        elif block:
            break
    return block


def test_the_readmes_one_machine_cluster_recipe_runs_the_job():
    """Over 60 s: three Ray nodes start one after another as the README starts them, and a job runs
    on them (412 s measured at load 40; the recipe's own pace, nothing to share with the module's
    cluster, which is started its own way)."""
    recipe = readme_recipe()
    assert [line.split()[:3] for line in recipe] == [
        ["export", "RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN=$(python"],
        ["ray", "start", "--head"], ["ray", "start", "--address"], ["ray", "start", "--address"],
        ["until", "ray", "job"], ["ray", "job", "submit"]], recipe
    base = tempfile.mkdtemp(prefix="d2prune-readme-cluster-")  # short: Ray's socket paths live under it
    pool = write_pool(os.path.join(base, "pool"), n_shards=2, per_shard=12, seed=3, broken=False)
    workdir, output = os.path.join(base, "work"), os.path.join(base, "out")
    config = os.path.join(base, "job.yaml")
    raw = make_config(workdir, pool.shards, output).model_dump(mode="json")
    Path(config).write_text(yaml.safe_dump(raw, sort_keys=False))
    gcs_port, dashboard_port, agent_port = free_port(), free_port(), free_port()
    script = "\n".join(line.replace(":6379", f":{gcs_port}").replace(" 6379", f" {gcs_port}")
                       .replace(":8265", f":{dashboard_port}").replace(" 8265", f" {dashboard_port}")
                       .replace(" 52365", f" {agent_port}").replace(" CONFIG", f" {config}") for line in recipe)
    assert str(agent_port) in script and config in script
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS") and not k.startswith("RAY_AUTH")}
    env.update(TMPDIR=base, RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               D2PRUNE_WORKER_START=WORKER_START,
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    try:
        run_recipe_and_check_output(script, env, base, gcs_port, config, workdir, output, pool.n_kept)
    finally:
        kill_processes_mentioning(base, f"127.0.0.1:{gcs_port}")
        shutil.rmtree(base, ignore_errors=True)


def run_recipe_and_check_output(script: str, env: dict[str, str], base: str, gcs_port: int, config: str,
                                workdir: str, output: str, n_samples: int) -> None:
    run = subprocess.run(["bash", "-euc", RAY_FUNCTION + script], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600, stdin=subprocess.DEVNULL)
    kill_processes_mentioning(base, f"127.0.0.1:{gcs_port}")  # the cluster's work is done (its CPUs back)
    logs = run.stdout + run.stderr
    assert run.returncode == 0, logs[-8000:]
    assert f"joined the Ray cluster at 127.0.0.1:{gcs_port}" in logs and "3 alive node(s)" in logs, logs[-8000:]
    assert "oneMKL" not in logs
    # the job's output: every committed file intact, and the output shards hold the selected samples
    verify = subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", config], capture_output=True,
                            text=True, timeout=300, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    selected = sorted(pq.read_table(os.path.join(workdir, "selection", "selected.parquet"), columns=["uid"])
                      .column("uid").to_pylist())
    written = sorted(uid for part in sorted(Path(output, "shards").glob("*.parquet"))
                     for uid in pq.read_table(part, columns=["uid"]).column("uid").to_pylist())
    assert 0 < len(selected) < n_samples and written == selected


LEFT_COPY_SCRIPT = """
import os, shutil, sys
copy = sys.argv[1]
os.chdir(copy)
shutil.rmtree(copy); os.makedirs(copy)  # what another node's runtime-env agent does to the copy
from pipeline.runtime import leave_ray_working_dir_copy
left = leave_ray_working_dir_copy()
import torch  # torch's oneMKL ends the process here when the cwd is gone
print(left, os.getcwd(), float((torch.ones(8, 8) @ torch.ones(8, 8)).sum()))
"""


def test_a_driver_whose_working_dir_copy_was_replaced_leaves_it_and_imports_torch(tmp_path):
    """The cause of the README recipe's oneMKL failure in one process: the cwd (Ray's unpacked
    working dir) deleted and unpacked again, then ``import torch``; left first, torch works."""
    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    run = subprocess.run([sys.executable, "-c", LEFT_COPY_SCRIPT, str(copy)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stdout + run.stderr
    left, cwd, total = run.stdout.split()
    assert left == "(deleted)" and cwd == tempfile.gettempdir() and float(total) == 512.0


def test_submitted_job_equals_a_local_run(cluster, reference, cluster_pool, s3_checkpoint, s3_server, tmp_path):
    """`ray job submit --working-dir . -- python jobs/filter_pool.py CONFIG` through the Job
    Submission API. The config's workdir and output are *relative* paths: resolved against the
    config file's directory, which every node sees (one machine: a shared filesystem). The
    checkpoint is a local file on the head alone: the embed stage ships it to the workers.
    Over 60 s: a whole job through the Job Submission API on three nodes, plus (in its setup, once
    per module) the local reference run it is compared with byte for byte."""
    conf = tmp_path / "conf"
    # the checkpoint as a local file only the head (the driver's node) has: shipped to the actors
    checkpoint = Path(cluster.nodes[0].temp_dir) / "models" / "tiny.pt"
    checkpoint.parent.mkdir(exist_ok=True)
    checkpoint.write_bytes(Store(cfg_storage(s3_server)).read_bytes(s3_checkpoint))
    config = job_yaml(conf / "job.yaml", "work", "out", cluster_pool, str(checkpoint), s3_server)
    status, logs, info = wait(cluster, submit(cluster, f"python jobs/filter_pool.py {config}", str(REPO), s3_server))
    assert status == "SUCCEEDED", logs[-5000:]
    if cluster.private_head_dir:
        assert f"embed.pretrained {checkpoint} is not on every node: shipped through the object store" in logs
    assert f"joined the Ray cluster at {cluster.address}" in logs or "joined the Ray cluster at" in logs
    assert "ray.num_cpus=2, ray.object_store_memory=300000000 ignored" in logs
    assert artefacts(Store(), str(conf / "work"), str(conf / "out")) == reference


def test_losing_a_worker_in_each_stage_still_gives_the_same_output(cluster, reference, cluster_pool,
                                                                   s3_checkpoint, s3_server, s3_bucket, s3_store,
                                                                   tmp_path):
    """Over 60 s: up to three submissions of a whole job, each resuming after a node is lost in
    the stage under way, and a replacement node started after each loss."""
    workdir, output = f"{s3_bucket}/lost/work", f"{s3_bucket}/lost/out"
    config_url = f"{s3_bucket}/lost/job.yaml"
    s3_store.write_bytes(config_url, Path(job_yaml(tmp_path / "job.yaml", workdir, output, cluster_pool,
                                                   s3_checkpoint, s3_server)).read_bytes())
    # kill a worker's raylet once each stage is under way (its first sign in the workdir) and not
    # yet committed; a fresh worker joins after each loss, as a replaced machine would
    signs = [("embed", "embeddings/part-00000.parquet", "embeddings/_SUCCESS.json"),
             ("graph", "graph/_FINGERPRINT.json", "graph/_SUCCESS.json"),
             ("write", "write/_FINGERPRINT.json", "write/_SUCCESS.json")]
    killed: list[tuple[str, bool]] = []
    stop = threading.Event()

    def killer():
        for stage, started, committed in signs:
            while not stop.is_set() and not s3_store.exists(f"{workdir}/{started}"):
                time.sleep(0.2)
            if stop.is_set():
                return
            victim = next(n for n in cluster.nodes if n.name.startswith("worker") and n.process.poll() is None)
            during = not s3_store.exists(f"{workdir}/{committed}")  # checked just before the SIGKILL
            cluster.kill_raylet(victim)
            killed.append((stage, during))
            cluster.add_worker()

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    attempts = []
    try:
        for _ in range(3):  # what a scheduler does with exit 1: run it again (it resumes)
            status, logs, info = wait(cluster, submit(cluster, f"python jobs/filter_pool.py {config_url}",
                                                      str(REPO), s3_server))
            attempts.append((status, info.driver_exit_code, logs))
            if status == "SUCCEEDED":
                break
            # the only acceptable failure: a retryable one with a clear reason (the stall error)
            assert info.driver_exit_code == 1 and "d2prune: error:" in logs, logs[-5000:]
    finally:
        stop.set()
        thread.join(60)
    print("attempts (status, exit code):", [a[:2] for a in attempts], "kills (stage, during it):", killed)
    stalls = [line for a in attempts for line in a[2].splitlines() if "d2prune: error:" in line]
    print("failed attempts said:", stalls)
    assert attempts[-1][0] == "SUCCEEDED", attempts[-1][2][-5000:]
    assert [stage for stage, _ in killed] == ["embed", "graph", "write"], (killed, [a[:2] for a in attempts])
    assert all(during for _, during in killed), f"a kill landed after its stage committed: {killed}"
    assert artefacts(s3_store, workdir, output) == reference
    # every node's caches of this job are gone (removed on each alive node when its stage committed)
    for node in cluster.nodes:
        if node.process.poll() is None:
            assert not [e for e in os.listdir(node.cache_dir) if e.startswith(("checkpoints-", "faiss-"))], node.name


def test_relative_paths_that_each_node_would_resolve_to_its_own_copy_are_refused(cluster, tmp_path, s3_server):
    """A config and pool inside the job's working dir, paths relative to it: each node has its own
    copy of the working dir, so the driver's resolved paths are not what the workers see. The job
    is refused before any work, exit 2, naming the path and what to do instead."""
    if not cluster.private_head_dir:
        pytest.skip("no mount namespaces here: every node of the test cluster sees the head's files")
    # the refusal checked here comes after the CPU-fit check: give the replacement workers of the
    # lost-worker test time to join (a run once saw 1 CPU here and failed on that, not on paths);
    # no error if they do not, the check below then says what it saw
    deadline = time.monotonic() + 120
    while (alive := cluster.alive_nodes()) < 3 and time.monotonic() < deadline:
        time.sleep(2)
    print("alive nodes before submitting:", alive)  # -1: the count itself failed
    wd = tmp_path / "wd"
    (wd / "jobs").mkdir(parents=True)
    shutil.copy(REPO / "jobs" / "filter_pool.py", wd / "jobs" / "filter_pool.py")
    pool = write_pool(str(wd / "pool"), n_shards=2, per_shard=12, seed=2, broken=False)
    assert len(pool.shards) == 2
    (wd / "job.yaml").write_text("workdir: work\ninput: {shards: 'pool/{00000..00001}.tar'}\noutput: {url: out}\n")
    status, logs, info = wait(cluster, submit(cluster, "python jobs/filter_pool.py job.yaml", str(wd), s3_server))
    assert status == "FAILED" and info.driver_exit_code == 2, logs[-4000:]
    line = [ln for ln in logs.splitlines() if ln.startswith("d2prune: error:")][-1]
    # every path the workers would not see, named with its field: the shards (their copy of the
    # working dir is elsewhere) and the workdir and output (a probe file the driver wrote there)
    assert "not the same on every node of the Ray cluster" in line
    for named in ("input.shards: /", "pool/00000.tar", "workdir: /", "output.url: /"):
        assert named in line, line
    assert "filesystem every node mounts" in line and "s3://" in line
    assert "embedding" not in logs  # refused before any work
