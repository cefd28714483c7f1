"""A SiT or DiT generator from any checkpoint the field hands around, recognised by content and brought into this
project's layout (what ``reals import-checkpoint`` writes and ``reals sample --ckpt`` reads).

Recognised:
- this project's train-sit checkpoints: used as they are;
- SiT / DiT ``train.py`` checkpoints (``model``, ``ema``, ``opt``, ``args``: a pickled ``argparse.Namespace``,
  loaded ``weights_only`` with that class allow-listed): the family is ``args.model``'s;
- REPA ``train.py`` checkpoints and REPA's bare state dicts (``projectors.*`` tensors): the projectors are
  dropped and REPA's time (1 = noise, 0 = data) and velocity sign are converted into SiT's, exactly, in the
  weights: the sinusoidal time features of ``1 - t`` are a fixed rotation of those of ``t``, folded into the
  first time-MLP layer, and the final layer is negated;
- bare SiT or DiT state dicts (``SiT-XL-2-256x256.pt``, ``DiT-XL-2-256x256.pt``): the two families share keys and
  shapes, so the family must be named, by ``--model`` or by the official file name ``SiT-*`` / ``DiT-*``; it is
  never guessed.

The result is ``{"model", "ema", "args": {"model", "path_type", "prediction"}, "imported": {...}}``; ``imported``
records the source format, so a REPA checkpoint keeps REPA's SDE diffusion when sampled (``sde_diffusion_form``).
Then ``model_spec`` names the model and its constructor arguments, ``check_weights_fit`` checks the tensors against
it and ``load_model`` builds it.
"""
from __future__ import annotations

import argparse
import math
import posixpath
import re
from dataclasses import dataclass

import torch

from pipelines import StageError
from pipelines.checkpoints import load_checkpoint
from reals import ReaLSError
from reals.models import create_model, model_family
from reals.sit import ARCHITECTURES, architecture_of

FAMILIES = ("SiT", "DiT")
OFFICIAL_NAME = re.compile(r"^(SiT|DiT)-(XL|L|B|S|T)-(\d)(?:-|\.|$)")
REPA_PATHS = {"linear": "Linear", "cosine": "GVP"}  # REPA's cosine path in SiT's time is SiT's GVP
REPA_ARGS = ("enc_type", "proj_coeff", "encoder_depth")


@dataclass(frozen=True)
class Recognised:
    """A checkpoint in this project's layout, with what it was and what was done to it."""

    format: str
    family: str
    checkpoint: dict
    notes: tuple[str, ...] = ()


def _args(ckpt: dict) -> dict:
    args = ckpt.get("args")
    return vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else {})


def _name_from_file(url: str) -> tuple[str | None, str | None]:
    """(family, model name) from an official file name such as ``DiT-XL-2-256x256.pt``."""
    m = OFFICIAL_NAME.match(posixpath.basename(url or ""))
    return (m.group(1), f"{m.group(1)}-{m.group(2)}/{m.group(3)}") if m else (None, None)


def _family(name: str) -> str:
    family = name.split("-", 1)[0]
    if family not in FAMILIES:
        raise StageError(f"model {name!r} names no known family; use a SiT-* or DiT-* name")
    return family


def _bare_name(state: dict, url: str, model: str | None, what: str) -> str:
    """The model name of a bare state dict: ``--model``, else the official file name; they must agree."""
    file_family, file_name = _name_from_file(url)
    if model and file_family and _family(model) != file_family:
        raise StageError(f"--model {model} is a {_family(model)}, but {posixpath.basename(url)} is named as a "
                         f"{file_family} checkpoint")
    name = model or file_name
    if name is None:
        arch = architecture_of(state)
        shape = f" (its shapes are those of {arch})" if arch else ""
        raise StageError(f"{posixpath.basename(url)} is a bare {what} state dict{shape}: SiT and DiT share its "
                         "layout, so name the family and model with --model (e.g. SiT-XL/2 or DiT-XL/2) or keep "
                         "the official file name SiT-*/DiT-*")
    return name


def _rotate_time(state: dict) -> dict:
    """Weights that see time ``1 - t`` where the given ones saw ``t``, and return the negated prediction."""
    w = state["t_embedder.mlp.0.weight"]
    half = w.shape[1] // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half).double()
    c, s = torch.diag(torch.cos(freqs)), torch.diag(torch.sin(freqs))
    # [cos f(1-t); sin f(1-t)] = [[C, S], [S, -C]] [cos ft; sin ft]
    rotation = torch.cat([torch.cat([c, s], 1), torch.cat([s, -c], 1)], 0)
    out = dict(state)
    out["t_embedder.mlp.0.weight"] = (w.double() @ rotation).to(w.dtype)
    for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
        out[key] = -state[key]
    return out


def _from_repa(state: dict) -> dict:
    if any(k.startswith("decoder_blocks.") for k in state):
        raise StageError("REPA legacy layout (decoder_blocks.*) is not supported: convert it with REPA's "
                         "load_legacy_checkpoints first")
    return _rotate_time({k: v for k, v in state.items() if not k.startswith("projectors.")})


def _is_repa(ckpt: dict, state: dict) -> bool:
    return any(k.startswith("projectors.") for k in state) or any(k in _args(ckpt) for k in REPA_ARGS)


def _our_layout(model: dict, ema: dict | None, name: str, fmt: str, url: str, **transport) -> dict:
    """Bare and official files hold EMA weights only, so ``ema`` defaults to ``model``."""
    return {"model": model, "ema": ema if ema is not None else model, "args": {"model": name, **transport},
            "imported": {"format": fmt, "source": posixpath.basename(url or "")}}


def _sit_transport(path_type: str, prediction: str, url: str) -> dict:
    if path_type not in ("Linear", "GVP"):
        raise StageError(f"{url}: SiT path {path_type!r} is not supported (Linear or GVP)")
    return {"path_type": path_type, "prediction": prediction}


def recognise(ckpt: dict, url: str = "", model: str | None = None) -> Recognised:
    """What ``ckpt`` (loaded from ``url``) is, in this project's layout; ``model`` is the ``--model`` flag."""
    if not isinstance(ckpt, dict):
        raise StageError(f"{url}: not a checkpoint (a {type(ckpt).__name__}, not a dict)")
    args = _args(ckpt)
    if isinstance(ckpt.get("model"), dict) and isinstance(ckpt.get("args"), dict):
        return Recognised("ReaLS checkpoint", _family(args["model"]) if args.get("model") else "SiT", ckpt)
    if isinstance(ckpt.get("model"), dict):  # an official train.py: model, ema, opt, args (Namespace)
        name = args.get("model")
        if not name:
            raise StageError(f"{url}: a training checkpoint whose args do not name the model")
        if model and model != name:
            raise StageError(f"--model {model} disagrees with the checkpoint, which holds a {name}")
        state, ema = ckpt["model"], ckpt.get("ema")
        if _is_repa(ckpt, state):
            path = REPA_PATHS.get(str(args.get("path_type", "linear")).lower())
            if path is None or str(args.get("prediction", "v")) != "v":
                raise StageError(f"{url}: REPA path {args.get('path_type')!r} / prediction {args.get('prediction')!r} "
                                 "is not supported (linear or cosine, v)")
            converted = _our_layout(_from_repa(state), _from_repa(ema) if ema else None, name, "REPA train.py", url,
                                    path_type=path, prediction="velocity")
            return Recognised("REPA train.py", "SiT", converted, _REPA_NOTES)
        family = _family(name)
        if family == "DiT":
            return Recognised("DiT train.py", "DiT", _our_layout(state, ema, name, "DiT train.py", url))
        transport = _sit_transport(args.get("path_type", "Linear"), args.get("prediction", "velocity"), url)
        return Recognised("SiT train.py", "SiT", _our_layout(state, ema, name, "SiT train.py", url, **transport))
    if "x_embedder.proj.weight" not in ckpt:
        raise StageError(f"{url}: neither a training checkpoint nor a SiT/DiT/REPA state dict "
                         f"(keys: {', '.join(list(ckpt)[:5])}...)")
    if _is_repa(ckpt, ckpt):
        name = model or f"SiT-{architecture_of(ckpt)}"
        if _family(name) != "SiT" or name.split("-", 1)[1] not in ARCHITECTURES:
            raise StageError(f"{url}: a REPA state dict is a SiT; --model {model} does not fit it")
        converted = _our_layout(_from_repa(ckpt), None, name, "REPA state dict", url, path_type="Linear",
                                prediction="velocity")
        return Recognised("REPA state dict", "SiT", converted, _REPA_NOTES + ("path assumed linear (REPA's default)",))
    name = _bare_name(ckpt, url, model, "SiT/DiT")
    family = _family(name)
    fmt = f"{family} state dict"
    transport = {"path_type": "Linear", "prediction": "velocity"} if family == "SiT" else {}
    return Recognised(fmt, family, _our_layout(ckpt, None, name, fmt, url, **transport))


_REPA_NOTES = ("projectors dropped", "time 1 - t and velocity sign folded into the weights",
               "SDE diffusion REPA's 2t (SiT's linear form)")


def sde_diffusion_form(ckpt: dict) -> str:
    """The SDE diffusion a checkpoint was trained to be sampled with: ``linear`` (REPA's 2t in its time, on its
    linear and cosine paths) for an imported REPA checkpoint, else SiT's ``sigma``."""
    imported = ckpt.get("imported") if isinstance(ckpt.get("imported"), dict) else {}
    return "linear" if str(imported.get("format", "")).startswith("REPA") else "sigma"


def load_recognised(url: str, model: str | None = None) -> Recognised:
    """Load ``url`` (``weights_only``) and recognise it."""
    return recognise(load_checkpoint(url), url, model)


def checkpoint_weights(ckpt: dict, use_ema: bool) -> tuple[dict, str]:
    """``(state_dict, which)`` from a training checkpoint (``ema`` or ``model``) or a bare SiT/DiT state_dict."""
    if isinstance(ckpt.get("model"), dict):
        if use_ema and isinstance(ckpt.get("ema"), dict):
            return ckpt["ema"], "ema"
        return ckpt["model"], "model"
    if "x_embedder.proj.weight" not in ckpt:
        raise StageError("the checkpoint holds neither a training state nor a SiT/DiT state_dict")
    return ckpt, "state_dict"


def model_spec(ckpt: dict, model: str | None = None, num_classes: int | None = None,
               ckpt_url: str | None = None) -> tuple[str, dict]:
    """``(model name, constructor keyword arguments)`` of a checkpoint: its recorded config, else inferred from
    shapes. A bare state dict whose file is named after one family ("DiT-XL-2-256x256.pt") is refused as the other."""
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    recorded = args.get("model")
    if model and recorded and model != recorded:
        raise StageError(f"--model {model} disagrees with the checkpoint, which holds a {recorded}")
    name = model or recorded
    if not name:
        raise StageError("the checkpoint does not name its model: pass --model (e.g. SiT-XL/2 or DiT-XL/2)")
    try:
        family = model_family(name)
    except ReaLSError as e:
        raise StageError(str(e)) from None
    named = posixpath.basename(ckpt_url or "").split("-", 1)[0]
    if not recorded and named in FAMILIES and named != family:
        raise StageError(f"--model {name} is a {family}, but {posixpath.basename(ckpt_url)} is named as a {named} "
                         "checkpoint")
    if isinstance(ckpt.get("model_config"), dict):
        kw = {k: ckpt["model_config"][k] for k in ("input_size", "in_channels", "num_classes",
                                                    "class_dropout_prob", "learn_sigma")}
    else:
        state, _ = checkpoint_weights(ckpt, False)
        _, c, p, _ = state["x_embedder.proj.weight"].shape
        side = math.isqrt(state["pos_embed"].shape[1]) * p
        rows = state["y_embedder.embedding_table.weight"].shape[0]
        out = state["final_layer.linear.weight"].shape[0] // (p * p)
        has_null = num_classes is None or rows == num_classes + 1
        kw = {"input_size": side, "in_channels": c, "num_classes": rows - 1 if has_null else rows,
              "class_dropout_prob": 0.1 if has_null else 0.0, "learn_sigma": out == 2 * c}
    if num_classes is not None and num_classes != kw["num_classes"]:
        raise StageError(f"--num-classes {num_classes} disagrees with the checkpoint's {kw['num_classes']} classes")
    return name, kw


def check_weights_fit(name: str, kw: dict, state: dict) -> None:
    """Refuse a state_dict whose tensors do not fit model ``name`` (checked on the meta device, no memory)."""
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in create_model(name, **kw).state_dict().items()}
    except ReaLSError as e:
        raise StageError(str(e)) from None
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    wrong = [k for k in shapes if k in state and tuple(state[k].shape) != shapes[k]]
    if missing or unexpected or wrong:
        first = (missing + unexpected + wrong)[0]
        raise StageError(f"the checkpoint does not fit {name}: {len(missing)} missing, {len(unexpected)} unexpected, "
                         f"{len(wrong)} mis-shaped tensors (e.g. {first}); is --model right?")


def load_model(ckpt: dict, name: str, kw: dict, use_ema: bool, device) -> torch.nn.Module:
    """The SiT or DiT of a checkpoint (EMA weights when asked and present) in eval mode on ``device``."""
    model = create_model(name, **kw)
    model.load_state_dict(checkpoint_weights(ckpt, use_ema)[0])
    return model.to(device).eval()
