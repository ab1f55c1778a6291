"""Shared fixtures: an embedded Ray, a real S3 endpoint (moto server) on 127.0.0.1, small broken
WebDataset pools (local and on S3), the tiny open_clip model and a checkpoint file.

Fixtures (all session-scoped; treat what they return as read-only):
  ray_local            -> the ``ray`` module, initialised with 2 CPUs / 300 MB object store
  s3_server            -> endpoint URL "http://127.0.0.1:PORT" of a moto S3 server
  s3_bucket            -> "s3://d2prune-test" (created through the S3 API on s3_server)
  s3_store             -> pipeline.storage.Store configured for s3_server
  tiny_model_config    -> local path of the tiny open_clip config JSON (embed.model_config_path)
  tiny_checkpoint      -> local path of a random-weight checkpoint of the tiny model
  small_pool           -> PoolManifest of a local 4-shard x 75-sample broken pool (300 samples)
  s3_pool              -> PoolManifest of a 3-shard x 24-sample broken pool in s3_bucket
Helpers live in pipeline.testing (write_pool, make_config, write_precomputed, create_bucket, ...).
"""

from __future__ import annotations

import os
import socket

import pytest

# Fake credentials for the local moto endpoint, set at import time so that every process started
# later (Ray workers inherit the driver's environment) signs requests the same way, and so that no
# test can ever pick up a real AWS profile.
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SECURITY_TOKEN": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
    }
)
os.environ.pop("AWS_PROFILE", None)

TEST_BUCKET = "d2prune-test"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300_000_000,
                 log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_server):
    from pipeline.testing import create_bucket

    create_bucket(s3_server, TEST_BUCKET)
    return f"s3://{TEST_BUCKET}"


@pytest.fixture(scope="session")
def s3_store(s3_server):
    from pipeline.config import StorageConfig
    from pipeline.storage import Store

    return Store(StorageConfig(endpoint_url=s3_server))


@pytest.fixture(scope="session")
def tiny_model_config():
    from pipeline.testing import tiny_model_config_path

    return tiny_model_config_path()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from pipeline.testing import save_random_checkpoint

    return save_random_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-random.pt"), seed=1234)


@pytest.fixture(scope="session")
def small_pool(tmp_path_factory):
    from pipeline.testing import write_pool

    return write_pool(str(tmp_path_factory.mktemp("pool")), n_shards=4, per_shard=75, seed=0, broken=True)


@pytest.fixture(scope="session")
def s3_pool(s3_bucket, s3_store):
    from pipeline.testing import write_pool

    return write_pool(f"{s3_bucket}/pool", store=s3_store, n_shards=3, per_shard=24, seed=1, broken=True)
