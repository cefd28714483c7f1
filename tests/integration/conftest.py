"""The production topology on localhost, started once per run with the code of `reals cluster up`:
PostgreSQL (SQLite when absent), a Prefect server on it, a Ray head and one worker node, a moto S3 server."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from topology import CREDENTIALS, MICRO


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """``reals cluster up --no-serve`` in a temp folder; ``down`` at the end stops exactly its processes.

    This process is a driver: it holds the S3 credentials (``up`` passes none to the services)."""
    import os

    from flows.cluster import Cluster

    os.environ.update(CREDENTIALS)
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    c.up(serve=False)
    yield c
    c.down(purge=True)  # the database and Ray temp dirs live under the system temp dir


@pytest.fixture(scope="session")
def micro_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "micro.yaml"
    path.write_text(yaml.safe_dump({"output": "runs/micro", **MICRO}))
    return path
