"""A stage of one's own (``docs/examples/sample_stats.py``): one module and one registry entry give it a command,
a flow, a deployment that a served worker runs through the API, a section of the pipeline form, a step in
``reals pipeline`` placed by its roles, and a part of the run report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import run_when_served

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{EXAMPLES}", "REALS_STAGE_MODULES": "sample_stats"}

PROBE = """
import json, sys
from flows.deployments import build_deployments
from flows.stages import STAGE_FLOWS
from pipelines.pipeline_config import PipelineConfig, load_pipeline_config, pipeline_steps
from pipelines.report import ReportConfig, ReportStep, write_report

config = load_pipeline_config(output=sys.argv[1])
steps = {s.name: s for s in pipeline_steps(config)}
stats = steps["sample-stats"]
deployment = next(d for d in build_deployments(config) if d.name == "sample-stats")
form = PipelineConfig.model_json_schema()
report = write_report(ReportConfig(output=sys.argv[2], steps=[
    ReportStep(stage="sample-stats", config={"samples": sys.argv[3], "output": sys.argv[4]})]))
print(json.dumps({
    "flow": STAGE_FLOWS["sample-stats"].name, "entrypoint": deployment.entrypoint,
    "prefilled": deployment.parameters["config"], "after": list(stats.after),
    "samples": stats.config.samples, "sample_output": steps["sample"].config.output,
    "last": list(steps)[-1], "section": "sample_stats" in form["properties"],
    "report": report.markdown}))
"""


def _samples(path: Path) -> Path:
    images = np.zeros((4, 8, 8, 3), np.uint8)
    images[..., 0] = 255  # red only
    np.savez(path, arr_0=images, arr_1=np.zeros(4, np.int64))
    return path


def test_one_module_and_one_registry_entry_give_a_command_flow_form_step_and_report(tmp_path):
    samples = _samples(tmp_path / "samples.npz")
    stats = tmp_path / "stats.json"
    r = subprocess.run([sys.executable, "-m", "flows.cli", "sample-stats", "--samples", str(samples), "--output",
                        str(stats)], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(stats.read_text())["mean"] == [1.0, 0.0, 0.0]

    r = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "run"), str(tmp_path / "report"), str(samples),
                        str(stats)], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["flow"] == "sample-stats" and seen["entrypoint"] == "flows.stages.sample_stats_flow"
    assert seen["section"] and seen["after"] == ["sample"] and seen["samples"] == seen["sample_output"]
    assert seen["last"] == "sample-stats"  # placed by its roles: after sample, and the last registered
    assert seen["prefilled"]["output"] == str(tmp_path / "run" / "sample_stats.json")
    assert "## Sample statistics" in seen["report"] and "| R | 1 | 0 |" in seen["report"]

    r = subprocess.run([sys.executable, "-c", "from pipelines.registry import stages; print(list(stages()))"],
                       env={**ENV, "REALS_STAGE_MODULES": "no_such_stage_module"}, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "no_such_stage_module" in r.stderr


def test_a_served_worker_runs_the_deployment_of_ones_own_stage_through_the_api(prefect_api, tmp_path):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    samples = _samples(tmp_path / "samples.npz")
    env = {**ENV, "PREFECT_API_URL": PREFECT_API_URL.value()}
    data = tmp_path / "data"  # the served pipeline config needs a data folder; this deployment reads none of it
    (data / "train" / "n0").mkdir(parents=True)
    (data / "val" / "n0").mkdir(parents=True)
    config = tmp_path / "serve.yaml"
    config.write_text(f"output: {tmp_path / 'run'}\nimages: {data}\n")
    serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--config", str(config)], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run = run_when_served(run_deployment, "sample-stats/sample-stats", serve, timeout=600, parameters={
            "config": {"samples": str(samples), "output": str(tmp_path / "served.json")}})
        assert run.state.is_completed(), run.state.message
        assert json.loads((tmp_path / "served.json").read_text())["images"] == 4
    finally:
        serve.terminate()
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
