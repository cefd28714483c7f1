"""The domain evaluator: it learns the classes, its FD is 0 for identical sets, its accuracy is held-out."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file

from pipelines.stages.train_evaluator import TrainEvaluatorConfig, load_split, run
from reals import ReaLSError
from reals.evaluator import DomainClassifier, DomainFeatures, conditional_accuracy, domain_metrics, extract


@pytest.fixture(scope="module")
def evaluator(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluator")
    config = TrainEvaluatorConfig(data_path=tiny_shards, output=str(out), steps=60, batch_size=16, width=16,
                                  show_progress=False)
    return config, run(config)


def test_evaluator_learns_the_classes(evaluator):
    _, s = evaluator
    assert not s.skipped and s.num_classes == 4 and s.val_images == 12
    assert s.val_accuracy >= s.chance + 0.5  # 4 classes: chance 0.25


def test_saved_evaluator_reproduces_its_val_accuracy(evaluator, tiny_shards):
    config, s = evaluator
    features = DomainFeatures(config.output)
    images, labels = load_split(tiny_shards, "val")
    acts = extract(features, images)
    assert acts["global"].shape == (len(images), features.model.feature_dim)
    assert conditional_accuracy(acts["logits"], labels) == pytest.approx(s.val_accuracy)


def test_fd_is_zero_for_identical_sets_and_positive_otherwise(evaluator, tiny_shards):
    config, _ = evaluator
    features = DomainFeatures(config.output)
    train, _ = load_split(tiny_shards, "train")
    val, labels = load_split(tiny_shards, "val")
    same = domain_metrics(features, train, train)
    assert abs(same["FD_domain"]) < 1e-6
    assert same["Precision_domain"] == 1.0 and same["Recall_domain"] == 1.0
    noise = np.random.default_rng(0).integers(0, 256, train.shape, dtype=np.uint8)
    far = domain_metrics(features, train, noise)
    near = domain_metrics(features, train, val, labels=labels)
    assert far["FD_domain"] > near["FD_domain"] > 0


def test_rerun_with_same_settings_is_skipped(evaluator):
    config, s = evaluator
    again = run(config)
    assert again.skipped and again.val_accuracy == s.val_accuracy


def test_interrupted_run_resumes_exactly_and_other_settings_start_afresh(tiny_shards, tmp_path):
    config = TrainEvaluatorConfig(data_path=tiny_shards, output=str(tmp_path), steps=20, batch_size=16, width=8,
                                  stages=2, ckpt_every=10, show_progress=False)
    whole = run(config)
    weights = load_file(tmp_path / "evaluator.safetensors")
    for name in ("evaluator.json", "evaluator.safetensors", "0000020.pt", "latest.json"):
        (tmp_path / name).unlink()  # killed after its checkpoint at step 10
    resumed = run(config)
    assert resumed.resumed_from == 10 and resumed.final_loss == whole.final_loss
    assert all((load_file(tmp_path / "evaluator.safetensors")[k] == v).all() for k, v in weights.items())
    other = run(config.model_copy(update={"seed": 1}))
    assert not other.skipped and other.resumed_from is None
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["0000010.pt", "0000020.pt"]


def test_evaluator_needs_two_classes_and_its_files():
    with pytest.raises(ReaLSError, match="at least 2 classes"):
        DomainClassifier(1)
    with pytest.raises(ReaLSError, match="not a domain evaluator"):
        DomainClassifier.from_pretrained("/nonexistent/evaluator")
