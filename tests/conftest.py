"""Session-wide fixtures: Ray once, one moto S3 server, the synthetic dataset, its shards, a tiny VAE and its store."""
from __future__ import annotations

import os
import socket
import uuid
from typing import TYPE_CHECKING, NamedTuple

import pytest

from helpers import make_vae_dir

if TYPE_CHECKING:
    from pipelines.stages.encode import EncodeSummary

# The integration suite (tests/integration: a real cluster, minutes) runs as its own step: `make test-integration`.
collect_ignore = [] if os.environ.get("REALS_INTEGRATION") == "1" else ["integration"]

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models on 2 shared cores (and beside Ray workers) run faster and steadier on one intra-op thread."""
    import torch

    torch.set_num_threads(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """A local Ray with 2 CPUs, started once; it starts after the S3 server so workers see its endpoint."""
    import ray

    from pipelines.parallel import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    for attempt in range(3):  # Ray gives its raylet a fixed 30 s to register: a busy machine can miss it
        try:
            ensure_ray(num_cpus=2)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback; AWS_* variables point every client (and Ray workers) at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh bucket per test: ``s3://<name>``."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    name = f"reals-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path):
    """The same test on local disk and on S3 (moto): a root URL to write under."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A tiny synthetic ImageNet-layout folder: 4 classes x 12 train images (+ 3 val) at 48 px."""
    from pipelines.stages.synthetic import SyntheticConfig, run

    out = tmp_path_factory.mktemp("synthetic")
    run(SyntheticConfig(output=str(out), classes=4, per_class=12, val_per_class=3, size=48, seed=0))
    return out


@pytest.fixture(scope="session")
def tiny_shards(synthetic_root, tmp_path_factory, ray_session):
    """Shards of the synthetic folder at 32 px (train: 2 shards of <= 24, val: 1), on local disk."""
    from pipelines.stages.shard import ShardConfig, run

    out = tmp_path_factory.mktemp("shards")
    for split in ("train", "val"):
        run(ShardConfig(data_path=str(synthetic_root), output=str(out), split=split, resolution=32,
                        shard_size=24, workers=2, show_progress=False))
    return str(out)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A converted tiny ReaLS VAE dir (seed 0; 4x8x8 latents at 32 px; teacher tiny-dinov2 at 28 px)."""
    return make_vae_dir(tmp_path_factory.mktemp("vae") / "tiny")


class EncodedStore(NamedTuple):
    """A latent store and the summary of the encode run that wrote it."""

    url: str
    summary: EncodeSummary


@pytest.fixture(scope="session")
def tiny_store(tiny_shards, tiny_vae_dir, tmp_path_factory):
    """The tiny train shards encoded in-process with ``tiny_vae_dir`` into a local store of 16-row chunks."""
    from pipelines.stages.encode import EncodeConfig, run

    url = str(tmp_path_factory.mktemp("latents") / "store")
    summary = run(EncodeConfig(data_path=tiny_shards, vae_path=tiny_vae_dir, output=url, chunk_rows=16, workers=0,
                               show_progress=False))
    return EncodedStore(url, summary)
