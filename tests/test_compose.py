"""docker-compose.yml: valid against the compose specification, and every environment variable the code reads
is set for the services that run the code; secrets come from .env, which is never committed."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(__file__).resolve().parents[2] / "shared/schemas/compose-spec.json"
CODE = ("reals", "storage", "pipelines", "flows")
CODE_SERVICES = ("ray-head", "ray-worker", "pipeline-worker")  # the services that run this package

# Variables the code reads that a deployment need not set, and why.
OPTIONAL = {
    "REALS_DEBUG": "debug: the CLI shows tracebacks",
    "AWS_ENDPOINT_URL_S3": "override of AWS_ENDPOINT_URL for S3 alone",
    "REALS_DINOV2_DIR": "override of where DINOv2 weights are looked up (default: the HF cache)",
    "REALS_INCEPTION_WEIGHTS": "override of where the FID-Inception weights are looked up (default: torch hub's)",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "start-up budget of the local Prefect API (default 180 s)",
    "REALS_API_WAIT_SECONDS": "how long `reals serve` waits for the Prefect API (default 120 s)",
    "REALS_STAGE_MODULES": "stages of a user's own, beside ours (default: none)",
    "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "set by the CLI itself (a signal reaches Python, not Ray's crash dump)",
    "RANK": "set per process by torchrun / Ray Train",
    "LOCAL_RANK": "set per process by torchrun / Ray Train",
    "WORLD_SIZE": "set per process by torchrun / Ray Train",
    "LOCAL_WORLD_SIZE": "set per process by torchrun / Ray Train",
}


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _env_name(node: ast.AST, constants: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    return None


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name) \
        and node.value.id == "os"


def env_reads(source: str) -> set[str]:
    """Names read by ``os.environ[...]``, ``os.environ.get/setdefault(...)`` and ``os.getenv(...)``."""
    tree = ast.parse(source)
    constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                 and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                 for t in n.targets if isinstance(t, ast.Name)}
    names = set()
    for node in ast.walk(tree):
        arg = None
        if isinstance(node, ast.Subscript) and _is_environ(node.value) and isinstance(node.ctx, ast.Load):
            arg = node.slice
        elif isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute):
            f = node.func
            if (f.attr in ("get", "setdefault") and _is_environ(f.value)) or (
                    f.attr == "getenv" and isinstance(f.value, ast.Name) and f.value.id == "os"):
                arg = node.args[0]
        if arg is not None and (name := _env_name(arg, constants)):
            names.add(name)
    return names


def code_env_reads() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for package in CODE:
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in env_reads(path.read_text()):
                found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


def dockerfile_env() -> set[str]:
    """Variables the image itself sets (``ENV`` lines)."""
    names = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("ENV "):
            names.update(re.findall(r"([A-Z_][A-Z0-9_]*)=", line))
    return names


@pytest.mark.skipif(not SCHEMA.is_file(), reason=f"compose specification schema not found at {SCHEMA}")
def test_compose_file_matches_the_compose_specification():
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_the_scan_finds_reads_of_every_form():
    source = 'import os\nNAME = "C"\nos.environ["A"]\nos.environ.get("B")\nos.getenv(NAME)\n' \
             'os.environ.setdefault("D", "1")\nos.environ["E"] = "x"\nos.environ.pop("F", None)\n'
    assert env_reads(source) == {"A", "B", "C", "D"}


def test_every_variable_the_code_reads_is_set_for_the_services_that_run_it():
    reads = code_env_reads()
    assert {"RAY_ADDRESS", "PREFECT_API_URL", "AWS_ENDPOINT_URL"} <= set(reads)  # the scan sees the code
    services = compose()["services"]
    image_env = dockerfile_env()
    missing = {}
    for name in CODE_SERVICES:
        env = services[name].get("environment") or {}
        env = set(env) if isinstance(env, dict) else {e.split("=", 1)[0] for e in env}
        unset = sorted(v for v in reads if v not in env | image_env | set(OPTIONAL))
        if unset:
            missing[name] = {v: reads[v] for v in unset}
    assert not missing, f"variables read by the code but not set in docker-compose.yml: {missing}"


def test_secrets_come_from_an_uncommitted_env_file():
    gitignore = (ROOT / ".gitignore").read_text().split()
    assert ".env" in gitignore
    used = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", (ROOT / "docker-compose.yml").read_text()))
    example = {line.split("=", 1)[0].strip() for line in (ROOT / ".env.example").read_text().splitlines()
               if "=" in line and not line.lstrip().startswith("#")}
    assert used and used <= example, f"missing from .env.example: {sorted(used - example)}"


def test_services_wait_for_what_they_need_and_restart():
    services = compose()["services"]
    worker = services["pipeline-worker"]
    assert worker["depends_on"] == {"prefect-server": {"condition": "service_healthy"},
                                    "ray-head": {"condition": "service_healthy"},
                                    "minio-init": {"condition": "service_completed_successfully"}}
    # the driver joins the cluster as a CPU-less node before serving (a driver needs a local raylet)
    command = " ".join(worker["command"]) if isinstance(worker["command"], list) else worker["command"]
    assert command.index("ray start --address=ray-head:6379 --num-cpus=0") < command.index("reals serve")
    assert services["ray-worker"]["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    for name in ("postgres", "prefect-server", "minio", "ray-head"):
        assert services[name]["healthcheck"]["test"], name
    long_running = [n for n in services if n != "minio-init"]
    assert {services[n].get("restart") for n in long_running} == {"unless-stopped"}
    assert services["minio-init"]["restart"] == "no"


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    return env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def test_the_s3_secret_goes_only_to_the_services_that_hold_s3_and_the_driver():
    """The Ray nodes get no credentials: the driver hands its own to the Ray workers in memory."""
    services = compose()["services"]
    holders = {name for name, service in services.items()
               if any("${AWS_SECRET_ACCESS_KEY" in str(v) for v in _environment(service).values())}
    assert holders == {"minio", "minio-init", "pipeline-worker"}
    for name in ("ray-head", "ray-worker"):
        assert not [k for k in _environment(services[name]) if k.startswith("AWS_") and "ENDPOINT" not in k], name
    assert "AWS_SECRET_ACCESS_KEY" not in (ROOT / "docker-compose.yml").read_text().split("x-project-env")[1] \
        .split("services:")[0]  # the block every project service shares carries no secret


def test_the_ray_dashboard_is_published_on_the_hosts_loopback_only():
    services = compose()["services"]
    published = {name: port for name, s in services.items() for port in s.get("ports", []) if "8265" in str(port)}
    assert published == {"ray-head": "127.0.0.1:8265:8265"}


def test_the_pipeline_worker_stops_and_turns_unhealthy_when_its_ray_node_is_gone():
    import subprocess

    worker = compose()["services"]["pipeline-worker"]
    command = " ".join(worker["command"]) if isinstance(worker["command"], list) else worker["command"]
    # both the node (`--block`: it exits when its raylet dies) and the server in the foreground; either ending
    # ends the container, and `restart: unless-stopped` starts it again
    assert "--num-cpus=0 --block &" in command and "wait -n; exit 1" in command
    assert worker["restart"] == "unless-stopped"
    kind, check = worker["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    # the check itself, run here: it fails without a process named raylet, and passes beside one (this one)
    assert "raylet" in check
    assert subprocess.run(["sh", "-c", check.replace("raylet", "no-such-raylet-process")]).returncode != 0
    me = Path("/proc/self/comm").read_text().strip()
    assert subprocess.run(["sh", "-c", check.replace("raylet", me)]).returncode == 0
