"""One way to save a model: its constructor arguments through diffusers' ``ConfigMixin`` and its weights as
safetensors, as diffusers' models save, but under file names of its own (``<name>.json``, ``<name>.safetensors``)
so that several models share a directory (the alignment heads beside the VAE's ``config.json``).

A model class mixes in ``PretrainedMixin``, decorates ``__init__`` with ``register_to_config`` and names its
files with ``config_name`` and ``weights_name``.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

from diffusers.configuration_utils import ConfigMixin, register_to_config
from safetensors.torch import load_file, save_file

from reals import ReaLSError

__all__ = ["PretrainedMixin", "register_to_config"]


def init_parameters(cls) -> dict[str, inspect.Parameter]:
    """The constructor's named parameters, following ``**kwargs`` to the base classes' (first default wins)."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        more = inspect.signature(klass.__init__).parameters.values()
        for p in more:
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params.setdefault(p.name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in more):
            return params
    return params


def _replace(path: Path, write) -> None:
    """``write(tmp)`` then move it onto ``path``, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class PretrainedMixin(ConfigMixin):
    """``save_pretrained``/``from_pretrained`` for an ``nn.Module`` whose ``__init__`` registers its config."""

    config_name: str
    weights_name: str

    @property
    def init_config(self) -> dict:
        """The constructor arguments, as a plain dict (``cls(**init_config)`` rebuilds the model)."""
        return {k: v for k, v in self.config.items() if not k.startswith("_")}

    @classmethod
    def from_init_config(cls, config: dict):
        """An untrained model from constructor arguments; a missing or unknown argument is refused by name."""
        params = init_parameters(cls)
        given = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        unknown = sorted(set(given) - set(params))
        missing = sorted(n for n, p in params.items() if p.default is p.empty and n not in given)
        if unknown or missing:
            raise ReaLSError(f"{cls.__name__} config: expected keys {sorted(params)}, got {sorted(given)}")
        return cls(**given)

    def save_pretrained(self, directory: str | os.PathLike, **extra) -> None:
        """Write the weights, then the config (its constructor arguments and the ``extra`` entries) last."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        _replace(d / self.weights_name, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        config = {**json.loads(self.to_json_string()), **extra}
        _replace(d / self.config_name, lambda tmp: tmp.write_text(json.dumps(config, indent=2, sort_keys=True)))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike):
        """The model saved in ``directory``, on the CPU; ``saved_extra`` holds its config's other entries."""
        d = Path(directory)
        missing = [n for n in (cls.config_name, cls.weights_name) if not (d / n).is_file()]
        if missing:
            raise ReaLSError(f"{cls.__name__}: {', '.join(str(d / n) for n in missing)} not found "
                             f"(expected {cls.config_name} + {cls.weights_name})")
        try:
            saved = json.loads((d / cls.config_name).read_text())
        except json.JSONDecodeError as e:
            raise ReaLSError(f"{cls.__name__}: {d / cls.config_name} is not valid JSON ({e})") from None
        if isinstance(saved.get("config"), dict):  # the arguments nested under "config" (the evaluator's former layout)
            saved = {**saved.pop("config"), **saved}
        params = set(init_parameters(cls))
        model = cls.from_init_config({k: v for k, v in saved.items() if k in params})
        try:
            model.load_state_dict(load_file(str(d / cls.weights_name)))
        except (RuntimeError, OSError) as e:
            first = str(e).strip().splitlines()[0]
            raise ReaLSError(f"{cls.__name__}: weights {d / cls.weights_name} do not match {model.init_config}: "
                             f"{first}") from None
        model.saved_extra = {k: v for k, v in saved.items() if k not in params and not k.startswith("_")}
        return model
