"""One save pattern for the heads, the domain evaluator, the discriminator, SiT and DiT (diffusers' ConfigMixin
for the constructor arguments, safetensors for the weights, per-class file names)."""
from __future__ import annotations

import json

import pytest
import torch

from reals import ReaLSError
from reals.align import AlignNet
from reals.discriminator import NLayerDiscriminator
from reals.dit import DiT
from reals.evaluator import DomainClassifier
from reals.sit import SiT

TINY_TRANSFORMER = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=5)
MODELS = {
    "heads": lambda: AlignNet(4, 32, hidden_dim=16, num_layers=2),
    "evaluator": lambda: DomainClassifier(3, resolution=16, width=8, stages=2),
    "discriminator": lambda: NLayerDiscriminator(3, 8, 2),
    "sit": lambda: SiT(**TINY_TRANSFORMER),
    "dit": lambda: DiT(**TINY_TRANSFORMER),
}


@pytest.mark.parametrize("name", MODELS)
def test_save_and_load_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = MODELS[name]()
    model.save_pretrained(tmp_path, note="kept")
    saved = json.loads((tmp_path / model.config_name).read_text())
    assert saved["_class_name"] == type(model).__name__ and saved["note"] == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([model.config_name, model.weights_name])
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.init_config == model.init_config and loaded.saved_extra == {"note": "kept"}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"config": model.init_config}, ckpt)
    assert type(model)(**torch.load(ckpt, weights_only=True)["config"]).init_config == model.init_config


def test_dit_keeps_its_learned_sigma_and_sit_its_velocity():
    assert DiT(**TINY_TRANSFORMER).init_config["learn_sigma"] is True
    assert SiT(**TINY_TRANSFORMER).init_config["learn_sigma"] is False


def test_former_evaluator_layout_still_loads(tmp_path):
    model = DomainClassifier(3, resolution=16, width=8, stages=2)
    model.save_pretrained(tmp_path)
    (tmp_path / "evaluator.json").write_text(json.dumps({"config": model.init_config, "val_accuracy": 0.9}))
    loaded = DomainClassifier.from_pretrained(tmp_path)
    assert loaded.init_config == model.init_config and loaded.saved_extra == {"val_accuracy": 0.9}
    assert not loaded.training


def test_weights_of_another_shape_are_refused_by_name(tmp_path):
    SiT(**TINY_TRANSFORMER).save_pretrained(tmp_path)
    (tmp_path / "sit.json").write_text(json.dumps({**TINY_TRANSFORMER, "hidden_size": 64}))
    with pytest.raises(ReaLSError, match="SiT: weights .*sit.safetensors do not match"):
        SiT.from_pretrained(tmp_path)
