"""The job config: validation errors name the bad key, --set overrides, the example configs."""

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, config_from_dict, load_config
from pipeline.job import stage_fingerprints

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def minimal(**extra):
    raw = {"workdir": "/tmp/w", "input": {"shards": "/tmp/p/{00000..00001}.tar"}, "output": {"url": "/tmp/o"}}
    raw.update(extra)
    return raw


def test_example_configs_exist_and_validate():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "datacomp-small.yaml", "laion-style.yaml"} <= names
    for path in CONFIGS:
        cfg = load_config(path)
        for stage in ("embed", "graph", "select", "write"):
            assert len(stage_fingerprints(cfg)[stage]) == 16


def test_example_configs_say_what_they_promise():
    demo = load_config(CONFIGS[[p.name for p in CONFIGS].index("demo.yaml")])
    # The demo's model files are written relative to demo.yaml itself (configs/demo.yaml is a link
    # to pipeline/demo/demo.yaml) and resolved when loaded, so the job finds them from any
    # directory, and on a cluster no worker resolves them against its own per-node working dir.
    assets = Path(__file__).resolve().parents[1] / "pipeline" / "demo" / "assets"
    assert demo.embed.model_config_path == str(assets / "tiny_clip.json")
    assert demo.embed.pretrained == str(assets / "tiny_clip.pt")
    assert Path(demo.embed.pretrained).is_file() and Path(demo.embed.model_config_path).is_file()
    assert demo.workdir == str(Path(__file__).resolve().parents[1] / "d2prune-demo" / "work")
    small = load_config(Path(CONFIGS[0]).parent / "datacomp-small.yaml")
    assert small.embed.encoder == "precomputed"
    assert small.embed.precomputed.score_column == "clip_l14_similarity_score"
    assert small.graph.k == 1 and small.select.gamma_reverse == 1.0 and small.select.prune_rate == 0.7
    laion = load_config(Path(CONFIGS[0]).parent / "laion-style.yaml")
    assert (laion.embed.model, laion.embed.pretrained) == ("ViT-B-32", "laion2b_s34b_b79k")
    assert laion.storage.endpoint_url.startswith("http")


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'select\.gama_reverse'"):
        config_from_dict(minimal(select={"gama_reverse": 1.0}))
    with pytest.raises(ConfigError, match=r"unknown key 'outptu'"):
        config_from_dict(minimal(outptu={"url": "x"}))


def test_keys_of_the_removed_approximate_mode_are_refused_by_name():
    for key, value in (("approximate", True), ("budget_mode", "uniform"), ("exact_check_max_n", 10)):
        with pytest.raises(ConfigError, match=rf"select\.{key} was removed with the approximate partitioned mode"):
            config_from_dict(minimal(select={key: value}))


@pytest.mark.parametrize("section,key,value,needle", [
    ("graph", "k", "many", "graph.k"),
    ("graph", "k", 0, "graph.k"),
    ("select", "prune_rate", 1.5, "select.prune_rate"),
    ("select", "method", "magic", "select.method"),
    ("select", "partitions", "some", "select.partitions"),
    ("output", "samples_per_shard", -3, "output.samples_per_shard"),
    ("embed", "uid_registry_actors", 0, "embed.uid_registry_actors"),
    ("embed", "uid_registry_actors", "many", "embed.uid_registry_actors"),
])
def test_bad_types_and_ranges_name_the_field(section, key, value, needle):
    raw = minimal()
    raw.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        config_from_dict(raw)


def test_missing_required_section_is_named():
    raw = minimal()
    del raw["output"]
    with pytest.raises(ConfigError, match="output"):
        config_from_dict(raw)


def test_set_overrides_parse_yaml_scalars_and_lists(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("workdir: /tmp/w\ninput: {shards: a.tar}\noutput: {url: /tmp/o}\n")
    cfg = load_config(path, ["select.prune_rate=0.5", "graph.k=7", "embed.pretrained=null",
                             "input.shards=[a.tar, b.tar]", "select.partitions=cells", "select.partitions=3"])
    assert cfg.select.prune_rate == 0.5 and cfg.graph.k == 7 and cfg.embed.pretrained is None
    # relative --set paths are resolved against the current directory (test below)
    assert cfg.input.shards == [str(Path.cwd() / "a.tar"), str(Path.cwd() / "b.tar")] and cfg.select.partitions == 3
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["select.prune_rate"])
    with pytest.raises(ConfigError, match=r"unknown key 'select\.nope'"):
        load_config(path, ["select.nope=1"])


def test_a_checkpoint_replaced_in_place_changes_the_embed_fingerprint(tmp_path):
    """Same name, other weights: the embed stage (and every later one) must run again instead of
    serving the old model's embeddings; the same file read again keeps the fingerprint."""
    import os

    from pipeline.embed.stage import settings

    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights v1")
    cfg = config_from_dict(minimal(embed={"pretrained": str(ckpt)}))
    before = stage_fingerprints(cfg)
    assert stage_fingerprints(cfg) == before and "pretrained" in settings(cfg)["model_files"]
    ckpt.write_bytes(b"weights v2")  # same size, new content
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))
    after = stage_fingerprints(cfg)
    assert all(after[s] != before[s] for s in before)
    # an open_clip tag names no file: nothing is added to the settings
    tag = config_from_dict(minimal(embed={"pretrained": "openai"}))
    assert "model_files" not in settings(tag) or "pretrained" not in settings(tag)["model_files"]


def test_a_checkpoint_replaced_at_the_same_s3_url_changes_the_embed_fingerprint(s3_store, s3_bucket, s3_server,
                                                                                tmp_path):
    url = f"{s3_bucket}/models/fingerprinted.pt"
    cfg = config_from_dict(minimal(embed={"pretrained": url}, storage={"endpoint_url": s3_server}))
    prints = []
    for content in (b"weights v1", b"weights v2"):  # same size: the ETag tells them apart
        (tmp_path / "c.pt").write_bytes(content)
        s3_store.write_local_file(url, str(tmp_path / "c.pt"))
        prints.append(stage_fingerprints(cfg)["embed"])
    assert prints[0] != prints[1] and stage_fingerprints(cfg)["embed"] == prints[1]


def test_fingerprints_change_only_for_the_stages_that_depend_on_a_setting():
    base = config_from_dict(minimal())
    k = config_from_dict(minimal(graph={"k": 3}))
    rate = config_from_dict(minimal(select={"prune_rate": 0.5}))
    assert stage_fingerprints(base)["embed"] == stage_fingerprints(k)["embed"]
    assert stage_fingerprints(base)["graph"] != stage_fingerprints(k)["graph"]
    assert stage_fingerprints(base)["graph"] == stage_fingerprints(rate)["graph"]
    assert stage_fingerprints(base)["select"] != stage_fingerprints(rate)["select"]
    assert stage_fingerprints(base)["write"] != stage_fingerprints(rate)["write"]  # the chain carries it


def test_cli_exit_code_2_with_one_line_reason(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("workdir: /tmp/w\ninput: {shards: a.tar}\noutput: {url: /tmp/o}\nselect: {bogus: 1}\n")
    assert main(["select", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("d2prune: error:") and "select.bogus" in err[-1]
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    # beta larger than the prune rate cannot meet the budget: refused before any work
    assert main(["run", str(path), "--set", "select={beta: 0.5, prune_rate: 0.3}"]) == 2
    assert "select.beta=0.5" in capsys.readouterr().err


def test_deploy_manifests_parse_and_their_job_config_validates():
    import yaml

    from pipeline.config import config_from_dict

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    kinds = {}
    for path in sorted((deploy / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kinds.setdefault(doc["kind"], []).append(doc)
    assert {"RayJob", "RayCluster", "CronJob", "ConfigMap"} <= set(kinds)
    job_yaml = kinds["ConfigMap"][0]["data"]["job.yaml"]
    config_from_dict(yaml.safe_load(job_yaml), source="deploy/k8s/rayjob.yaml")
    for rayjob in kinds["RayJob"]:
        entry = rayjob["spec"]["entrypoint"]
        assert "/app/jobs/filter_pool.py" in entry and (deploy.parent / "jobs" / "filter_pool.py").exists()
    assert "filter_pool.py" in (deploy / "slurm" / "d2prune.sbatch").read_text()
    assert "pip install --no-cache-dir ." in (deploy / "Dockerfile").read_text()  # the package and its pins


def test_cross_field_rules_fail_at_load_not_after_work():
    # partitions 0 used to pass validation and fail after the embed and graph stages
    with pytest.raises(ConfigError, match=r"select\.partitions"):
        config_from_dict(minimal(select={"partitions": 0}))
    with pytest.raises(ConfigError, match=r"select\.beta=0\.5"):
        config_from_dict(minimal(select={"beta": 0.5, "prune_rate": 0.3}))


def test_settings_are_fingerprinted_with_the_stage_that_uses_them():
    base = config_from_dict(minimal())
    euclid = config_from_dict(minimal(graph={"distance": "euclidean"}))
    # graph.distance is applied by the select stage: changing it must not rebuild the graph
    assert stage_fingerprints(base)["graph"] == stage_fingerprints(euclid)["graph"]
    assert stage_fingerprints(base)["select"] != stage_fingerprints(euclid)["select"]


def test_missing_upstream_stage_is_not_a_retryable_failure(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(f"workdir: {tmp_path / 'work'}\ninput: {{shards: a.tar}}\noutput: {{url: {tmp_path / 'out'}}}\n")
    # exit 1 tells a scheduler to retry; no retry can make a missing graph stage appear
    assert main(["select", str(path)]) == 4
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("d2prune: error:") and "committed graph stage" in err


def test_relative_paths_resolve_against_the_config_file_not_the_current_directory(tmp_path, monkeypatch):
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "job.yaml").write_text(
        "workdir: work\ninput: {shards: 'pool/{00000..00001}.tar'}\noutput: {url: ../out}\n"
        "embed: {pretrained: models/ckpt.pt, model_config_path: model.json}\nselect: {score_file: s.parquet}\n")
    (tmp_path / "link.yaml").symlink_to(conf_dir / "job.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for path in (conf_dir / "job.yaml", tmp_path / "link.yaml", "../conf/job.yaml"):
        cfg = load_config(str(path), ["output.samples_per_shard=5"])
        assert cfg.workdir == str(conf_dir / "work")
        assert cfg.input.shards == str(conf_dir / "pool/{00000..00001}.tar")
        assert cfg.output.url == str(tmp_path / "out")
        assert cfg.embed.pretrained == str(conf_dir / "models/ckpt.pt")
        assert cfg.embed.model_config_path == str(conf_dir / "model.json")
        assert cfg.select.score_file == str(conf_dir / "s.parquet")
    # --set values are typed in a shell: relative to the current directory
    cfg = load_config(str(conf_dir / "job.yaml"), ["workdir=w2", "input.shards=[a.tar, /abs/b.tar, s3://b/c.tar]"])
    assert cfg.workdir == str(elsewhere / "w2")
    assert cfg.input.shards == [str(elsewhere / "a.tar"), "/abs/b.tar", "s3://b/c.tar"]
    # an open_clip tag is a name, not a path; URLs and absolute paths stay as they are
    cfg = load_config(str(conf_dir / "job.yaml"), ["embed.pretrained=laion2b_s34b_b79k", "output.url=s3://b/o"])
    assert cfg.embed.pretrained == "laion2b_s34b_b79k" and cfg.output.url == "s3://b/o"


def test_relative_path_in_a_config_read_from_a_url_is_refused(s3_server, s3_bucket, s3_store, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)  # how a job reads its config from a non-AWS endpoint
    url = f"{s3_bucket}/configs/relative.yaml"
    s3_store.write_bytes(url, b"workdir: s3://b/w\ninput: {shards: pool/0.tar}\noutput: {url: s3://b/o}\n")
    with pytest.raises(ConfigError, match=r"input\.shards='pool/0\.tar' is a relative path.*read from a URL"):
        load_config(url)
    s3_store.write_bytes(url, b"workdir: s3://b/w\ninput: {shards: s3://b/0.tar}\noutput: {url: /shared/o}\n"
                              b"embed: {pretrained: openai}\n")
    cfg = load_config(url)
    assert cfg.output.url == "/shared/o" and cfg.embed.pretrained == "openai"


def test_actor_pool_bounds_and_stall_timeout_are_checked_at_load():
    with pytest.raises(ConfigError, match=r"embed\.min_actors \(3\) is larger than embed\.num_actors \(2\)"):
        config_from_dict(minimal(embed={"num_actors": 2, "min_actors": 3}))
    with pytest.raises(ConfigError, match=r"job\.stall_timeout_s"):
        config_from_dict(minimal(job={"stall_timeout_s": 0}))
    assert config_from_dict(minimal(job={"stall_timeout_s": None})).job.stall_timeout_s is None
