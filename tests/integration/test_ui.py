"""The Prefect UI on the production topology (PostgreSQL), as a user meets it: the pipeline's Run form in the
project's order, a standalone Ray stage's log lines in its flow run, a former field name through the API, and
the report's link opened by a browser."""
from __future__ import annotations

import re
import time

import pytest

from helpers import run_when_served
from test_topology import _s3_env, _serving

UNITS_DONE = re.compile(r"shard train: (\d+)/\1 units \(100%\)")


@pytest.fixture(scope="module")
def served(cluster, micro_config):
    """``(reals serve, run_deployment, Prefect client)`` on the cluster for this module."""
    from prefect import get_client

    with _serving(cluster, micro_config) as (serve, run_deployment), get_client(sync_client=True) as client:
        yield serve, run_deployment, client


def _form_order(properties: dict) -> list[str]:
    """The order of Prefect's UI form (its SchemaFormFields): by ``position``, none last, ties as stored."""
    return [k for k, _ in sorted(properties.items(), key=lambda kv: kv[1].get("position", float("inf")))]


def _resolve(prop: dict, definitions: dict) -> dict:
    ref = prop.get("$ref") or next((a["$ref"] for a in prop.get("anyOf", []) if "$ref" in a), None)
    return definitions[ref.rsplit("/", 1)[1]] if ref else prop


def test_the_pipeline_form_keeps_the_project_order_on_postgresql(cluster, served):
    from pipelines.pipeline_config import PipelineConfig

    assert cluster.state.get("postgres"), "the cluster's Prefect server runs on SQLite: no PostgreSQL found"
    serve, _, client = served
    deadline = time.monotonic() + 600
    while True:
        try:
            deployment = client.read_deployment_by_name("reals-pipeline/reals-pipeline")
            break
        except Exception:  # noqa: BLE001 - not registered yet
            assert serve.poll() is None and time.monotonic() < deadline
            time.sleep(2)
    schema = deployment.parameter_openapi_schema
    definitions = schema["definitions"]
    config = _resolve(schema["properties"]["config"], definitions)
    assert list(config["properties"]) != list(PipelineConfig.model_fields)  # PostgreSQL reordered the keys
    assert _form_order(config["properties"]) == list(PipelineConfig.model_fields)
    for name, info in PipelineConfig.model_fields.items():
        section = _resolve(config["properties"][name], definitions)
        if "properties" in section:
            model = next(a for a in [info.annotation, *getattr(info.annotation, "__args__", ())]
                         if hasattr(a, "model_fields"))
            assert _form_order(section["properties"]) == list(model.model_fields), name


def test_a_served_shard_run_under_a_former_field_name_logs_its_units_done_line(cluster, served, tmp_path):
    """The shard deployment alone (its flow run ends with the stage), its input given as ``data_path``."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from pipelines.stages.synthetic import SyntheticConfig, run as synthetic

    serve, run_deployment, client = served
    images = tmp_path / "images"
    synthetic(SyntheticConfig(output=str(images), classes=2, per_class=8, size=32, seed=0))
    config = {"data_path": str(images), "output": "s3://reals/it/ui-shards", "resolution": 32, "shard_size": 4,
              "workers": 2, "show_progress": False}
    run = run_when_served(run_deployment, "shard/shard", serve, parameters={"config": config})
    assert run.state.is_completed(), (run.state.message, cluster.log("serve").read_text()[-4000:])
    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    done = [log.message for log in logs if UNITS_DONE.search(log.message)]
    assert len(done) == 1, [log.message for log in logs]
    assert UNITS_DONE.search(done[0]).group(1) == "4"  # 16 images in shards of 4


def test_the_report_link_opens_as_a_page_with_its_pictures_inside(cluster, tmp_path, monkeypatch):
    import io

    import httpx
    import numpy as np

    from flows.artifacts import browser_url
    from flows.pipeline import HTML
    from pipelines.report import ReportConfig, ReportStep, write_report
    from pipelines.stages.sample import SampleConfig
    from storage.fs import write_bytes_atomic

    _s3_env(cluster, monkeypatch)
    samples = "s3://reals/it/ui-report/samples.npz"
    buf = io.BytesIO()
    np.savez(buf, arr_0=np.full((8, 16, 16, 3), 120, np.uint8), arr_1=np.arange(8) % 2)
    write_bytes_atomic(samples, buf.getvalue())
    sample = SampleConfig(mode="ODE", ckpt="unused", vae_path="unused", output=samples)
    summary = write_report(ReportConfig(output="s3://reals/it/ui-report/report",
                                        steps=[ReportStep(stage="sample", config=sample.model_dump(mode="json"))]))
    public = cluster.env["AWS_ENDPOINT_URL"].replace("127.0.0.1", "localhost")
    monkeypatch.setenv("REALS_PUBLIC_S3_ENDPOINT", public)
    href = browser_url(summary.page, HTML)
    assert href.startswith(public + "/")
    got = httpx.get(href)
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/html")
    assert got.text.count('src="data:image/png;base64,') == 1 and ".png" not in got.text
