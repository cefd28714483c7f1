"""Ray Train launching without a cluster: when a training stage goes to Ray Train, what its workers run, its flags and
form fields, and the one line a failed run ends with (the runs themselves: tests/integration/test_ray_train.py)."""
from __future__ import annotations

import pytest

from pipelines import ray_train
from pipelines.stages.train_sit import TrainSiTConfig
from pipelines.stages.train_vae import TrainVAEConfig


def sit(**kw) -> TrainSiTConfig:
    return TrainSiTConfig(store="/data/store", output="/runs/sit", max_steps=2, **kw)


@pytest.mark.parametrize("launcher, under_flow, address, world, expected", [
    ("auto", False, None, None, False),       # a plain command: this process
    ("auto", False, "head:6379", None, True),  # RAY_ADDRESS set
    ("auto", True, None, None, True),          # under a flow
    ("ray", False, None, None, True),          # asked for (a local Ray)
    ("local", True, "head:6379", None, False),  # asked not to
    ("ray", True, "head:6379", "2", False),    # a torchrun rank never launches again
])
def test_a_training_stage_goes_to_ray_train_when_asked_under_a_flow_or_with_ray_address(
        monkeypatch, launcher, under_flow, address, world, expected):
    for name, value in (("RAY_ADDRESS", address), ("WORLD_SIZE", world)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert ray_train.wanted(sit(launcher=launcher), under_flow=under_flow) is expected


def test_workers_resume_what_an_earlier_attempt_left_without_a_bar_on_the_cpu_unless_given_gpus():
    config = sit(resume=False, show_progress=True, device="auto")
    on_cpu = ray_train.worker_config(config, gpu=False)
    assert (on_cpu.resume, on_cpu.show_progress, on_cpu.device) == (True, False, "cpu")
    assert ray_train.worker_config(config, gpu=True).device == "auto"
    assert (config.resume, config.device) == (False, "auto")  # the user's config is left as it was


def test_flags_and_form_fields_of_every_training_stage():
    from pipelines.cli import build_parser
    from pipelines.sections import section_models

    help_text = build_parser()._subparsers._group_actions[0].choices["train-sit"].format_help()
    for flag in ("--launcher", "--num-workers", "--use-gpu", "--cpus-per-worker", "--gpus-per-worker",
                 "--placement-strategy", "--max-failures"):
        assert flag in help_text
    for section in (section_models()[name][1] for name in ("generator", "train_vae")):
        fields = section.model_json_schema()["properties"]
        assert fields["placement_strategy"]["enum"] == ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
        assert fields["num_workers"]["default"] == 1 and fields["launcher"]["enum"] == ["auto", "ray", "local"]
    config = TrainVAEConfig(shards="/s", output="/o", max_steps=1, num_workers=2, use_gpu="false",
                            placement_strategy="STRICT_SPREAD")
    assert (config.num_workers, config.use_gpu, config.placement_strategy) == (2, False, "STRICT_SPREAD")


def test_a_run_that_keeps_failing_is_one_line_naming_the_first_failed_rank():
    class WorkerGroupError(Exception):
        worker_failures = {1: ConnectionError("Connection closed by peer\n  traceback ...")}

    config = sit(num_workers=2, placement_strategy="STRICT_SPREAD", max_failures=3)
    line = ray_train.failure_line("train-sit", config, WorkerGroupError("2 workers failed"))
    assert "\n" not in line and "after 3 restart(s) of 2 worker(s) (STRICT_SPREAD" in line
    assert "rank 1: ConnectionError: Connection closed by peer;" in line

    class ControllerError(Exception):
        controller_failure = TimeoutError("placement group not ready within 60 s")

    line = ray_train.failure_line("train-sit", config, ControllerError("start failed"))
    assert "could not start 2 worker(s)" in line and "TimeoutError: placement group not ready" in line


def test_a_folder_with_checkpoints_still_needs_resume_before_anything_starts(tmp_path):
    from pipelines import StageError
    from pipelines.checkpoints import save_checkpoint

    save_checkpoint(str(tmp_path), 2, {"step": 2})
    with pytest.raises(StageError, match="pass --resume"):
        ray_train.fit("train-sit", sit().model_copy(update={"output": str(tmp_path)}))


def test_measurement_stages_declare_ray_task_resources_and_summaries_say_where_they_ran():
    from pipelines.placement import where_this_runs
    from pipelines.registry import stage
    from pipelines.stages.train_sit import TrainSiTSummary

    assert {stage(n).runs_on for n in ("make-reference", "evaluate", "assess", "downstream")} == {"task"}
    assert all(stage(n).resources is not None for n in ("make-reference", "evaluate", "assess", "downstream"))
    assert {stage(n).runs_on for n in ("train-vae", "train-sit", "train-dit", "train-evaluator")} == {"train"}
    here = where_this_runs()
    assert TrainSiTSummary.model_fields["ran_on"].default_factory() == here and here["pid"] > 0
