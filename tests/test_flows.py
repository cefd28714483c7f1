"""Prefect flows: the end-to-end pipeline on micro data (artifacts in the API, complete stages skipped on a
re-run), retries on transient storage errors, torchrun training, deployments and their schedule, the CLI."""
from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from flows.artifacts import IMAGE_REF
from pipelines.pipeline_config import PipelineConfig, load_pipeline_config, pipeline_steps as plan_steps
from pipelines import StageError
from pipelines.registry import stages
from storage.markers import read_json

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

MICRO = {
    "synthetic": {"classes": 4, "per_class": 12, "val_per_class": 6, "size": 32},
    "shard": {"resolution": 32, "shard_size": 24, "workers": 2, "show_progress": False},
    "train_vae": {"vae_config": "tiny", "dino_model": "tiny-dinov2", "perceptual": "none", "align_hidden_dim": 32,
                  "disc_channels": 8, "disc_layers": 2, "lr": 2e-3, "shuffle_buffer": 16, "ema_decay": 0.9,
                  "batch_size": 8, "max_steps": 4, "log_every": 2, "sample_every": 4, "show_progress": False},
    "convert": {"num_samples": 32, "batch_size": 16, "show_progress": False},
    "encode": {"workers": 1, "batch_size": 16, "show_progress": False},
    "generator": {"model": "SiT-T/4", "global_batch_size": 8, "max_steps": 4, "log_every": 2, "sample_every": 0,
                  "show_progress": False},
    "sample": {"num_sampling_steps": 2, "sampling_method": "euler", "num_fid_samples": 16, "cfg_scale": 1.0,
               "per_proc_batch_size": 8, "unit_size": 8, "workers": 1, "show_progress": False},
    "make_reference": {"show_progress": False},
    "evaluate": {"features": ["effnet"], "batch_size": 16, "show_progress": False},
}
STAGES = ["synthetic", "shard-train", "shard-val", "train-vae", "convert", "encode", "train-sit", "sample",
          "make-reference", "evaluate"]


def _client():
    from prefect import get_client

    return get_client(sync_client=True)


def _subflow_runs(client, parent_id) -> dict:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))
    return {r.name.split(" ", 1)[0]: r for r in runs}  # named <step> <output> <start>


def assert_cards_render_by_themselves(cards) -> None:
    """What a browser needs from the UI's cards: pictures embedded, no link it cannot open, each picture once
    per flow run, a description on every card."""
    cards = list(cards)
    assert cards and all(c.description for c in cards)
    per_run: dict = {}
    for c in cards:
        if c.type == "markdown":
            targets = [t for _, t in IMAGE_REF.findall(c.data)]
            assert all(t.startswith("data:image/png;base64,") for t in targets), "relative or remote image path"
            assert "](file://" not in c.data and "](s3://" not in c.data
        elif c.type == "image":
            targets = [c.data]
            assert c.data.startswith("data:image/png;base64,")
        else:
            targets = []
        if c.type == "link":
            assert c.data.startswith(("http://", "https://")), c.data
        per_run.setdefault(c.flow_run_id, []).extend(targets)
    for pictures in per_run.values():
        assert len(pictures) == len(set(pictures)), "a picture shown twice in one run"


def _log_lines(client, flow_run_id, wait_for: str, timeout: float = 60.0) -> list[str]:
    """The messages of a flow run's log, read back through the API once one holds ``wait_for`` (or at timeout);
    lines from Ray workers arrive in batches."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    while True:
        lines = [log.message for log in client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
        if any(wait_for in line for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(1)


def _artifacts(client, flow_run_ids) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids)))
    return {a.key: a for a in found if a.key}


# ---------------------------------------------------------------------------------------------------
# The end-to-end flow
# ---------------------------------------------------------------------------------------------------

def test_pipeline_runs_end_to_end_then_skips_complete_stages(prefect_api, ray_session, tmp_path):
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    from flows.pipeline import reals_pipeline, reencode
    from pipelines.stages.convert import ConvertConfig
    from pipelines.stages.convert import run as convert_run

    out = tmp_path / "run"
    config = PipelineConfig(output=str(out), **MICRO)
    state = reals_pipeline(config, return_state=True)
    summary = state.result()
    assert [r["stage"] for r in summary.stages] == STAGES
    assert all(r["status"] == "ran" for r in summary.stages)

    metrics = read_json(str(out / "metrics.json"))["metrics"]
    assert metrics["FD_effnet"]["feature_space"] == "effnet" and "FID" not in metrics
    assert summary.metrics["FD_effnet"] == pytest.approx(metrics["FD_effnet"]["value"])
    report = (out / "report" / "report.md").read_text()
    assert "FD_effnet" in report and "not FID" in report and "perceptual loss: none" in report
    page = (out / "report" / "report.html").read_text()
    assert "<table>" in page and "FD_effnet" in page and ".png" not in page
    assert page.count('src="data:image/png;base64,') == len(IMAGE_REF.findall(report)) >= 4
    for png in ("loss_curves_vae.png", "loss_curves_sit.png", "samples_grid.png", "vae_reconstructions.png"):
        assert Image.open(out / "report" / png).size[0] > 0

    run_id = state.state_details.flow_run_id
    with _client() as client:
        subflows = _subflow_runs(client, run_id)
        assert sorted(subflows) == sorted(STAGES)
        assert re.fullmatch(rf"shard-val {re.escape(str(out / 'shards'))} \d{{4}}-\d\d-\d\d \d\d:\d\d",
                            subflows["shard-val"].name), subflows["shard-val"].name
        assert all(r.state.is_completed() for r in subflows.values())
        arts = _artifacts(client, [run_id, *(r.id for r in subflows.values())])
    assert {"pipeline-stages", "shard-train-counts", "shard-train-skipped-files", "encode-train-store",
            "evaluate-metrics", "reals-report", "sample-grid-image", "train-vae-loss-curves-image",
            "train-sit-loss-curves-image"} <= set(arts)
    assert arts["encode-train-store"].type == "table" and "rows done" in arts["encode-train-store"].data
    assert "FD_effnet" in arts["reals-report"].data
    assert arts["sample-grid-image"].data.startswith("data:image/png;base64,")
    assert_cards_render_by_themselves(arts.values())
    pictures = IMAGE_REF.findall(arts["reals-report"].data)
    alts = {alt for alt, _ in pictures}
    assert alts >= {"samples", "VAE reconstructions", "VAE training loss curves"}
    assert any(a.startswith("SiT training (SiT-") and a.endswith("loss curves") for a in alts), alts
    for stage in ("train-vae", "encode", "sample"):
        assert arts[f"{stage}-progress"].type == "progress" and float(arts[f"{stage}-progress"].data) == 100.0

    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with _client() as client:
        sit_log = _log_lines(client, subflows["train-sit"].id, "step 4/4")
    step = re.compile(r"train-sit SiT-T/4 step 2/4 \| .*loss \S+.* \| lr \S+ \| [\d.]+ samples/s \| ETA ")
    assert any(step.search(line) for line in sit_log), sit_log

    again = reals_pipeline(config, return_state=True)
    assert all(r["status"] == "skipped (complete)" for r in again.result().stages)
    with _client() as client:
        assert _subflow_runs(client, again.state_details.flow_run_id) == {}
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[again.state_details.flow_run_id])))
    skipped = {t.name: t.state.name for t in tasks if t.name.endswith("skipped (complete)")}
    assert skipped == {f"{s}: skipped (complete)": "Skipped" for s in STAGES}

    (out / "metrics.json").unlink()
    third = reals_pipeline(config)
    assert [r["stage"] for r in third.stages if r["status"] == "ran"] == ["evaluate"]
    assert read_json(str(out / "metrics.json"))["metrics"]["FD_effnet"]["value"] == pytest.approx(
        metrics["FD_effnet"]["value"])

    # reencode: the store already holds this VAE's rows; a new VAE version (raw weights) gets its own version
    raw = convert_run(ConvertConfig(ckpt=str(out / "vae"), output_dir=str(tmp_path / "vae-raw"), ema=False,
                                    data_path=str(out / "shards"), num_samples=32, show_progress=False))
    current, new = reencode(config, vae_paths=[raw.output_dir])
    assert (current.shards_encoded, current.shards_skipped) == (0, 2)
    assert (new.version, new.shards_encoded, new.rows_done) == (raw.fingerprint, 2, 48)

    # an image arriving in the first class: one new shard, and only its row encoded for each VAE version
    first = sorted((out / "data" / "train").iterdir())[0]
    shutil.copy(sorted(first.iterdir())[-1], first / "aaa_arrival.JPEG")
    tars = {p.name: p.read_bytes() for p in (out / "shards").glob("train-*.tar")}
    current, new = reencode(config, vae_paths=[raw.output_dir])
    assert [(s.shards_encoded, s.shards_skipped, s.rows_encoded) for s in (current, new)] == [(1, 2, 1)] * 2
    assert {n: (out / "shards" / n).read_bytes() for n in tars} == tars
    assert sorted(p.name for p in (out / "shards").glob("train-*.tar")) == [*sorted(tars), "train-000002.tar"]


def test_shard_flow_reports_skipped_files(prefect_api, ray_session, synthetic_root, tmp_path):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.stages import shard_flow
    from pipelines.stages.shard import ShardConfig

    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "train", data / "train")
    (data / "train" / "n00000000" / "broken.JPEG").write_bytes(b"not a jpeg")
    summary = shard_flow(ShardConfig(data_path=str(data), output=str(tmp_path / "shards"), resolution=32,
                                     shard_size=24, show_progress=False))
    assert summary.skipped_files == 1
    with _client() as client:
        [table] = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["shard-train-skipped-files"])), limit=1, sort="CREATED_DESC")
    assert "broken.JPEG" in table.data and "not an image" in table.data


def test_batch_units_are_logged_with_rate(caplog):
    from pipelines.parallel import UnitLog

    log = UnitLog("encode train", 3)
    with caplog.at_level("INFO", logger="pipelines.parallel"):
        for _ in range(3):
            log.advance()
    lines = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"encode train: 3/3 units \(100%\), \S+ units/s", lines[-1]), lines
    assert len(lines) <= 2  # the first unit (interval elapsed from the start) at most, and the end


def test_ray_workers_trouble_lines_reach_the_run_log_once():
    """A worker's warning goes to the run's log; the console echo of a stage's own record does not come again."""
    import logging

    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from flows.runtime import ray_worker_logs

    got = []

    class Keep(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    logger = logging.getLogger("test-run-log")
    logger.addHandler(Keep())
    lines = ["RuntimeError: something odd", "14:00:00.000 | WARNING | pipelines.parallel - unit 3 lost; re-submitting",
             "all fine"]
    with ray_worker_logs(logger):
        dispatcher.emit({"is_err": True, "task_name": "encode_unit", "pid": 1, "lines": lines})
    dispatcher.emit({"is_err": True, "task_name": "encode_unit", "pid": 1, "lines": lines})  # after: not forwarded
    assert got == ["ray worker (encode_unit): RuntimeError: something odd"]


def test_links_open_in_a_browser_presigned_on_s3_and_none_for_local_files(s3_bucket, tmp_path):
    import httpx

    from flows.artifacts import browser_url
    from storage.fs import join, write_bytes_atomic

    url = join(s3_bucket, "report", "report.md")
    write_bytes_atomic(url, b"# report")
    href = browser_url(url)
    assert href.startswith("http://127.0.0.1:") and "Signature=" in href
    assert httpx.get(href).content == b"# report"
    assert browser_url(str(tmp_path / "report.md")) is None
    # signed for the address a browser reaches (the same moto server under another name), served as a page
    write_bytes_atomic(join(s3_bucket, "report", "report.html"), b"<p>report</p>")
    public = os.environ["AWS_ENDPOINT_URL"].replace("127.0.0.1", "localhost")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REALS_PUBLIC_S3_ENDPOINT", public)
        href = browser_url(join(s3_bucket, "report", "report.html"), "text/html; charset=utf-8")
    assert href.startswith(public + "/")
    got = httpx.get(href)
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/html")


def _jsonb(value):
    """``value`` as PostgreSQL's JSONB gives it back: object keys by length, then bytes."""
    if isinstance(value, dict):
        return {k: _jsonb(value[k]) for k in sorted(value, key=lambda k: (len(k.encode()), k.encode()))}
    return [_jsonb(v) for v in value] if isinstance(value, list) else value


def _form_order(properties: dict) -> list[str]:
    """The field order of Prefect's UI form: by ``position`` (none: last), ties in stored order."""
    return [k for k, _ in sorted(properties.items(), key=lambda kv: kv[1].get("position", float("inf")))]


def test_pipeline_form_keeps_the_declared_order_through_jsonb_and_takes_former_names():
    from prefect.utilities.schema_tools import validate

    from flows.deployments import build_deployments

    pipeline = next(d for d in build_deployments(load_pipeline_config()) if d.name == "reals-pipeline")
    declared = pipeline._parameter_openapi_schema.model_dump()
    schema = _jsonb(declared)
    defs = schema["definitions"]
    assert list(defs["PipelineConfig"]["properties"])[:3] == ["shard", "assess", "encode"]  # what JSONB does to it
    assert _form_order(defs["PipelineConfig"]["properties"]) == list(PipelineConfig.model_fields)
    for name, definition in defs.items():
        assert _form_order(definition["properties"]) == list(declared["definitions"][name]["properties"]), name

    params = copy.deepcopy(pipeline.parameters)
    params["config"]["train_vae"]["dino_model"] = params["config"]["train_vae"].pop("teacher")
    params["config"]["shard"]["data_path"] = "/data/imagenet"
    params["config"]["data_path"] = params["config"].pop("images")
    assert validate(params, schema) == []
    config = PipelineConfig.model_validate({**params["config"], "images": None})
    assert (config.train_vae.teacher, config.shard.images) == (pipeline.parameters["config"]["train_vae"]["teacher"],
                                                               "/data/imagenet")  # beside an empty new name
    params["config"]["train_vae"]["dino_modle"] = "tiny-dinov2"
    assert validate(params, schema)


def test_experiment_form_has_typed_optional_sections_that_give_back_the_config():
    from prefect.utilities.schema_tools import validate

    from flows.deployments import build_deployments
    from flows.experiment import ExperimentForm, from_form
    from pipelines.experiment import load_experiment_config

    experiment = next(d for d in build_deployments(load_pipeline_config()) if d.name == "experiment")
    schema = experiment._parameter_openapi_schema.model_dump()
    form = schema["definitions"]["ExperimentForm"]["properties"]
    train_vae = schema["definitions"][form["train_vae"]["$ref"].rsplit("/", 1)[1]]
    assert {"teacher", "max_steps", "perceptual"} <= set(train_vae["properties"]) and not train_vae.get("required")
    assert validate(experiment.parameters, schema) == []
    bad = copy.deepcopy(experiment.parameters)
    bad["config"]["encode"]["batch_sise"] = 8
    assert validate(bad, schema)

    quick = load_experiment_config(None, quick=True)
    assert from_form(ExperimentForm.model_validate(quick.model_dump(mode="json"))) == quick
    given = from_form(ExperimentForm.model_validate({"train_vae": {"dino_model": "tiny-dinov2"}}))
    assert given.train_vae == {"teacher": "tiny-dinov2"} and given.pretrain_vae is None


# ---------------------------------------------------------------------------------------------------
# Retries on transient storage errors
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("error, attempts, ok", [
    (ConnectionResetError(errno.ECONNRESET, "connection reset by peer"), 2, True),
    (FileNotFoundError(errno.ENOENT, "no such shard"), 1, False),
    (StageError("bad input"), 1, False),
])
def test_batch_tasks_retry_transient_storage_errors_only(prefect_api, monkeypatch, error, attempts, ok):
    from prefect import flow

    import flows.stages as stages

    calls = []

    def flaky(config):
        calls.append(config)
        if len(calls) == 1:
            raise error
        return "done"

    monkeypatch.setattr(stages, "stage_function", lambda stage: flaky)
    monkeypatch.setattr(stages, "progress_probe", lambda stage, config: None)

    @flow
    def one_task():
        return stages.batch_stage.with_options(retry_delay_seconds=0)("shard", "config")

    state = one_task(return_state=True)
    assert len(calls) == attempts and state.is_completed() == ok


def test_transient_errors_are_found_through_causes():
    from botocore.exceptions import ClientError, EndpointConnectionError

    from flows.runtime import is_transient

    def client_error(code):
        return ClientError({"Error": {"Code": code, "Message": code}}, "PutObject")

    try:
        try:
            raise EndpointConnectionError(endpoint_url="http://minio:9000")
        except EndpointConnectionError as e:
            raise StageError("encode failed") from e
    except StageError as wrapped:
        assert is_transient(wrapped)
    assert is_transient(client_error("SlowDown")) and not is_transient(client_error("NoSuchBucket"))
    assert not is_transient(PermissionError(errno.EACCES, "denied")) and not is_transient(ValueError("x"))


# ---------------------------------------------------------------------------------------------------
# Training under torchrun
# ---------------------------------------------------------------------------------------------------

def test_training_flow_launches_torchrun_with_several_processes(prefect_api, tiny_shards, tmp_path):
    from flows.stages import train_vae_flow
    from pipelines.stages.train_vae import TrainVAEConfig

    config = TrainVAEConfig(data_path=tiny_shards, output=str(tmp_path / "vae"), **{
        **MICRO["train_vae"], "max_steps": 2, "batch_size": 4, "sample_every": 100})
    summary = train_vae_flow(config, nproc_per_node=2)
    assert summary.world_size == 2 and summary.steps == 2
    assert read_json(str(tmp_path / "vae" / "latest.json"))["step"] == 2


# ---------------------------------------------------------------------------------------------------
# Deployments, configs, CLI
# ---------------------------------------------------------------------------------------------------

def test_pipeline_form_has_typed_stage_sections():
    """The reals-pipeline Run form: every stage section is a typed object of its stage's fields (described, enums
    as choices), the server's schema check refuses a bad value, and no description holds text a browser eats."""
    from prefect.utilities.schema_tools import validate

    from flows.deployments import build_deployments
    from pipelines.sections import section_models

    config = load_pipeline_config()
    pipeline = next(d for d in build_deployments(config) if d.name == "reals-pipeline")
    assert pipeline.enforce_parameter_schema
    schema = pipeline._parameter_openapi_schema.model_dump()
    defs = schema["definitions"]

    def resolve(prop: dict) -> dict:
        ref = prop.get("$ref") or next((a["$ref"] for a in prop.get("anyOf", []) if "$ref" in a), None)
        return defs[ref.rsplit("/", 1)[1]] if ref else prop

    sections = resolve(schema["properties"]["config"])["properties"]
    for section, (record, _) in section_models().items():
        fields = resolve(sections[section])["properties"]
        own = set(record.config.model_fields) - ({"split"} if record.chain.splits else set())
        assert set(fields) == own, section
        assert all(f.get("description") for f in fields.values()), section
    assert resolve(sections["train_vae"])["properties"]["perceptual"]["enum"] == ["lpips", "random", "none"]
    assert "empty: {output}/shards" in resolve(sections["encode"])["properties"]["shards"]["description"]
    assert not re.search(r"<[A-Za-z/]", json.dumps(schema))

    assert validate(pipeline.parameters, schema) == []
    bad = copy.deepcopy(pipeline.parameters)
    bad["config"]["train_vae"]["perceptual"] = "vgg"
    assert validate(bad, schema)
    bad = copy.deepcopy(pipeline.parameters)
    bad["config"]["encode"]["batch_size"] = "many"
    assert validate(bad, schema)


def test_deployments_cover_every_flow_and_reencode_runs_nightly():
    from flows.deployments import build_deployments

    config = load_pipeline_config()
    deployments = {d.name: d for d in build_deployments(config)}
    assert set(deployments) == {"reals-pipeline", "reencode", "experiment", *stages()}  # every registered stage
    planned = {s.stage for s in plan_steps(config)}
    assert {n for n, d in deployments.items() if d.parameters.get("config")} == planned | {"reals-pipeline",
                                                                                         "reencode", "experiment"}
    assert deployments["experiment"].parameters["config"]["seeds"] >= 3
    assert {"reals", "stage:train-vae"} <= set(deployments["train-vae"].tags)
    assert len({tuple(d.tags) for d in deployments.values()}) == len(deployments)
    assert [s.schedule.cron for s in deployments["reencode"].schedules] == ["0 3 * * *"]
    assert not deployments["reals-pipeline"].schedules
    assert deployments["reals-pipeline"].parameters["config"]["output"] == config.output
    assert deployments["train-vae"].parameters["config"]["max_steps"] == config.train_vae.max_steps
    custom = {d.name: d for d in build_deployments(config, reencode_cron="30 1 * * 0")}
    assert custom["reencode"].schedules[0].schedule.cron == "30 1 * * 0"
    with pytest.raises(StageError, match="invalid reencode cron"):
        build_deployments(config, reencode_cron="every night")


def test_deployment_entrypoints_are_module_paths_a_worker_imports():
    """A file-path entrypoint loads as a top-level module (``stages``) that Ray workers cannot unpickle from."""
    from prefect.flows import load_flow_from_entrypoint

    from flows.deployments import build_deployments

    for d in build_deployments(load_pipeline_config()):
        assert d.entrypoint.startswith("flows.") and ".py" not in d.entrypoint, d.entrypoint
        loaded = load_flow_from_entrypoint(d.entrypoint)
        assert loaded.fn.__module__.startswith("flows.") and loaded.name == d.flow_name


def test_shipped_configs_build_every_stage(tmp_path):
    demo = {s.name: s.config for s in plan_steps(load_pipeline_config(output="/tmp/reals-demo"))}
    assert list(demo) == STAGES + ["downstream"]
    assert demo["sample"].save_latents and demo["downstream"].samples == demo["sample"].output
    assert demo["train-vae"].teacher == "efficientnet_lite0" and demo["train-vae"].perceptual == "none"
    (tmp_path / "imagenet" / "train").mkdir(parents=True)  # the config's /data/imagenet, here
    paper = {s.name: s.config for s in plan_steps(load_pipeline_config(CONFIGS / "imagenet256-reals.yaml",
                                                                       images=str(tmp_path / "imagenet")))}
    assert "synthetic" not in paper and "make-reference" not in paper
    assert (paper["train-vae"].teacher, paper["train-vae"].teacher_input_size) == ("dinov2_vitb14", 448)
    assert (paper["train-sit"].model, paper["train-sit"].global_batch_size) == ("SiT-XL/2", 256)
    s = paper["sample"]
    assert (s.mode, s.num_sampling_steps, s.cfg_scale, s.guidance_interval, s.num_fid_samples) == (
        "SDE", 250, 1.8, (0.0, 0.75), 50000)


def test_bad_pipeline_configs_are_one_line_errors(tmp_path, capsys):
    from flows.cli import main

    assert main(["pipeline", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "pipeline config not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: x\nsynthetic: {}\ntrain_vae: {lr: -1}\n")
    assert main(["pipeline", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: invalid pipeline config {bad} train_vae.lr") and err.count("\n") == 1
    with pytest.raises(StageError, match="is not local: give local_dir"):
        plan_steps(PipelineConfig(output="s3://bucket/run", synthetic={}))
    with pytest.raises(StageError, match=f"data folder {tmp_path / 'nowhere'} not found"):
        plan_steps(PipelineConfig(output=str(tmp_path / "run"), data_path=str(tmp_path / "nowhere")))
    (tmp_path / "data" / "train").mkdir(parents=True)
    with pytest.raises(StageError, match="no val/ folder in .*: add one, or set evaluate.ref_batch"):
        plan_steps(PipelineConfig(output=str(tmp_path / "run"), data_path=str(tmp_path / "data")))


def test_serve_needs_a_prefect_api(capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["serve"]) == 2
    assert "set PREFECT_API_URL or pass --with-server" in capsys.readouterr().err


def test_serve_waits_a_bounded_time_for_the_api_then_says_so_in_one_line(capsys, monkeypatch):
    import socket

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        api = f"http://127.0.0.1:{s.getsockname()[1]}/api"  # nothing listens there
    monkeypatch.setenv("REALS_API_WAIT_SECONDS", "2")
    with temporary_settings({PREFECT_API_URL: api}):
        assert main(["serve"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"error: the Prefect API at {api} did not answer within 2 s: start the server (or check "
                   "PREFECT_API_URL), or wait longer with REALS_API_WAIT_SECONDS"]


def test_a_local_api_that_does_not_start_in_time_is_one_line(monkeypatch):
    """Prefect's ephemeral API gets 180 s by default (its own 20 s fails on a busy machine); a timeout is one line."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.runtime import ephemeral_startup_timeout, prefect_api

    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    assert ephemeral_startup_timeout() == 180
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "7")
    seen = []

    def start(self, timeout=None):
        seen.append(timeout)
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    monkeypatch.setattr(SubprocessASGIServer, "start", start)
    monkeypatch.setattr(SubprocessASGIServer, "stop", lambda self: None)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(StageError, match=r"did not start within 7 s .*raise PREFECT_SERVER_EPHEMERAL_STARTUP"):
            with prefect_api():
                pass
    assert seen == [7.0]


def test_the_generator_family_is_a_form_choice():
    schema = PipelineConfig.model_json_schema()["properties"]["family"]
    assert {"SiT", "DiT"} <= {v for option in schema["anyOf"] for v in option.get("enum", [])}
    dit = {s.name: s for s in plan_steps(load_pipeline_config(output="/tmp/reals-demo", family="DiT"))}
    train, sample = dit["train-dit"], dit["sample"].config
    assert (train.stage, train.config.model) == ("train-dit", "DiT-T/2")  # the demo's size in the other family
    assert (sample.mode, sample.num_sampling_steps, sample.sampling_method) == ("DDPM", 250, None)
    assert (sample.cfg_scale, sample.guidance_interval) == (1.8, (0.0, 0.75))  # shared with the SiT run
    sit = {s.name: s for s in plan_steps(load_pipeline_config(output="/tmp/reals-demo"))}
    assert (sit["train-sit"].stage, sit["sample"].config.mode) == ("train-sit", "ODE")


def test_server_port_uses_a_running_prefect_server_and_avoids_a_taken_port(monkeypatch):
    import http.server
    import socket
    import threading

    from flows import runtime

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    prefect_like = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=prefect_like.serve_forever, daemon=True).start()
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()
    taken = other.getsockname()[1]
    try:
        monkeypatch.setattr(runtime, "DEFAULT_SERVER_PORT", prefect_like.server_port)
        assert runtime.server_port() == (prefect_like.server_port, True)
        monkeypatch.setattr(runtime, "DEFAULT_SERVER_PORT", taken)
        port, running = runtime.server_port()
        assert port != taken and not running and not runtime._port_taken("127.0.0.1", port)
        with pytest.raises(StageError, match=f"port {taken} on 127.0.0.1 is taken"):
            runtime.server_port(port=taken)
    finally:
        prefect_like.shutdown()
        other.close()


def test_a_server_on_another_port_serves_a_ui_that_calls_that_port(tmp_path, monkeypatch):
    """`reals serve --with-server --port N`: the UI served on N must call the API on N, not Prefect's 4200."""
    import urllib.request

    from flows import runtime
    from flows.cluster import free_port

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    port = free_port()
    with runtime.local_server(port=port, timeout=180) as api:
        settings = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=30).read())
    assert api == f"http://127.0.0.1:{port}/api" and settings["api_url"] == api


def test_the_generator_section_reads_its_former_name_train_sit(tmp_path):
    from pipelines.cli import build_parser, config_from_args

    old = tmp_path / "old.yaml"
    old.write_text("output: x\nsynthetic: {}\ntrain_sit: {model: SiT-S/2, max_steps: 7}\n")
    config = load_pipeline_config(old)
    assert (config.generator.model, config.generator.max_steps) == ("SiT-S/2", 7)
    steps = {s.stage: s.config for s in plan_steps(config)}
    assert steps["train-sit"].max_steps == 7 and steps["train-sit"].store == steps["encode"].output
    parser = build_parser()
    command = parser._subparsers._group_actions[0].choices["train-sit"]
    args = parser.parse_args(["train-sit", "--config", str(old), "--data-path", "s", "--output", "o"])
    assert config_from_args(steps["train-sit"].__class__, args, command, ("generator", "train_sit")).max_steps == 7
