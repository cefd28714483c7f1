"""Pictures the stages write: image grids, per-class grids and loss curves, each as PNG bytes.

Images are uint8 ``[N, H, W, 3]`` arrays; curves come from ``log.jsonl`` entries. Nothing here reads or writes
storage: callers put the bytes where they belong.
"""
from __future__ import annotations

import io
import math

import numpy as np

NON_CURVES = {"step", "epoch", "time", "lr", "seconds", "steps_per_sec", "samples_per_sec", "images_per_sec"}
PANELS = ("losses", "cosine alignment with the teacher", "gradient norm")


def png(image: np.ndarray) -> bytes:
    """uint8 ``[H, W, 3]`` -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def figure_png(fig) -> bytes:
    """A matplotlib figure -> PNG bytes (110 dpi, tight)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def image_grid(images: np.ndarray, cols: int) -> bytes:
    """uint8 [N, H, W, 3] -> a PNG of ``cols`` images per row (the last row padded with black)."""
    n, h, w, c = images.shape
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * cols, h, w, c), np.uint8)
    canvas[:n] = images
    return png(canvas.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c))


def class_grid(images: np.ndarray, labels: np.ndarray, classes: int, per_class: int) -> bytes:
    """One row per class (the lowest class ids present), small images enlarged; every row as long as the fewest
    samples a shown class has (at most ``per_class``), so the grid holds samples only."""
    scale = max(1, 64 // images.shape[1])  # nearest neighbour
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    shown = sorted(set(labels.tolist()))[:classes]
    cols = min([per_class, *(int((labels == k).sum()) for k in shown)])
    return image_grid(np.concatenate([images[labels == k][:cols] for k in shown]), cols)


def loss_curves(entries: list[dict], title: str) -> bytes | None:
    """Curves of a ``log.jsonl``: losses, cosine alignment and gradient norms in separate panels; None if empty."""
    from matplotlib.figure import Figure

    series: dict[str, list[tuple[float, float]]] = {}
    for e in entries:
        for k, v in e.items():
            if isinstance(v, int | float) and k not in NON_CURVES:
                series.setdefault(k, []).append((e["step"], float(v)))
    series = {k: pts for k, pts in sorted(series.items()) if any(v != 0 for _, v in pts)}
    if not series:
        return None
    panels: dict[str, list[str]] = {name: [] for name in PANELS}
    for k in series:
        panels[PANELS[1] if k.endswith("_cos") else PANELS[2] if k.endswith("_norm") else PANELS[0]].append(k)
    panels = {name: keys for name, keys in panels.items() if keys}
    fig = Figure(figsize=(5.5 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, keys) in zip(axes, panels.items()):
        for k in keys:
            ax.plot([p[0] for p in series[k]], [p[1] for p in series[k]], label=k, linewidth=1.2)
        values = [v for k in keys for _, v in series[k]]
        if name != PANELS[1] and min(values) > 0 and max(values) > 10 * min(values):
            ax.set_yscale("log")
        ax.set(xlabel="step", title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return figure_png(fig)


# ---------------------------------------------------------------------------------------------------
# Overlays of dense predictions
# ---------------------------------------------------------------------------------------------------

def _palette(n: int = 256) -> np.ndarray:
    import colorsys

    colours = [(0.0, 0.0, 0.0)] + [colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.85, 1.0) for k in range(n - 1)]
    return (np.array(colours) * 255).astype(np.float32)


PALETTE = _palette()


def seg_panel(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Class colours blended over the dimmed image (background stays dim)."""
    labels = np.asarray(labels).astype(np.int64)
    colour = PALETTE[labels % len(PALETTE)]
    fg = (labels > 0)[..., None]
    return np.clip(0.4 * image + 0.6 * colour * fg, 0, 255).astype(np.uint8)


def depth_panel(depth: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Nearness as a dark-blue -> yellow ramp over the range ``[lo, hi]``."""
    near = np.clip((hi - depth) / max(hi - lo, 1e-6), 0, 1)[..., None]
    far_c, near_c = np.array([20, 24, 80], np.float32), np.array([250, 220, 40], np.float32)
    return (far_c * (1 - near) + near_c * near).astype(np.uint8)


def compose(rows: list[list[np.ndarray]], labels: list[str], panel: int) -> bytes:
    """PNG of rows of equal-size panels under a header of labels."""
    from PIL import Image, ImageDraw

    header = 14
    canvas = Image.new("RGB", (panel * len(labels), header + panel * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(labels):
        draw.text((j * panel + 3, 2), text, fill=(0, 0, 0))
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            tile = Image.fromarray(cell).resize((panel, panel), Image.Resampling.NEAREST)
            canvas.paste(tile, (j * panel, header + i * panel))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def overlay_rows(images: np.ndarray, columns: list[tuple[str, str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Rows ``[image, task panels...]``; depth panels of a row share one range."""
    rows = []
    for i, image in enumerate(images):
        depths = [c[2][i] for c in columns if c[0] == "depth"]
        lo = min((float(d.min()) for d in depths), default=0.0)
        hi = max((float(d.max()) for d in depths), default=1.0)
        row = [image]
        for task, _, maps in columns:
            row.append(seg_panel(image, maps[i]) if task == "seg" else depth_panel(maps[i], lo, hi))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# The experiment's curves
# ---------------------------------------------------------------------------------------------------

ARM_COLOURS = {"vae": "tab:blue", "reals": "tab:red"}


def experiment_curves(vae_curves: list[tuple[str, str, list[dict], int]],
                      generator_curves: list[tuple[str, str, list[dict]]], family: str) -> bytes:
    """VAE reconstruction loss, VAE patch cosine to the teacher and the generator's loss per step.

    ``vae_curves``: ``(label, colour, log entries, first step)`` per VAE run (a shared pretraining's fine-tuning
    steps counted after it); ``generator_curves``: ``(label, colour, log entries)`` per SiT or DiT run.
    """
    from matplotlib.figure import Figure

    panels = (("rec", "VAE reconstruction loss (L1)"), ("patch_cos", "VAE patch cosine to the teacher"))
    fig = Figure(figsize=(16, 4))
    axes = fig.subplots(1, 3)
    for ax, (key, title) in zip(axes, panels):
        for label, colour, entries, start in vae_curves:
            pts = [(start + e["step"], e[key]) for e in entries if key in e]
            if pts:
                ax.plot(*zip(*pts), color=colour, alpha=0.8, linewidth=1.1, label=label)
        ax.set(xlabel="VAE step", title=title)
    for label, colour, entries in generator_curves:
        pts = [(e["step"], e["loss"]) for e in entries if "loss" in e]
        if pts:
            axes[2].plot(*zip(*pts), color=colour, alpha=0.8, linewidth=1.1, label=label)
    axes[2].set(xlabel=f"{family} step", title="DiT loss (MSE + VLB)" if family == "DiT" else "SiT flow-matching loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return figure_png(fig)


def sweep_plot(knob: str, series: dict[str, list[tuple[object, dict, dict | None]]]) -> bytes:
    """One knob of the sweep: the paired FD_domain change against the baseline and the segmentation mIoU as a
    fraction of the teacher's, per value of the knob (mean ± std over seeds).

    ``series``: label (the point's other overrides, "" for none) -> ``(value, FD_domain change stats, mIoU
    fraction stats or None)`` per point.
    """
    from matplotlib.figure import Figure

    values = list(dict.fromkeys(v for pts in series.values() for v, _, _ in pts))
    try:
        values.sort(key=lambda v: (v is not None, float(v) if v is not None else 0.0))
    except (TypeError, ValueError):
        values.sort(key=str)
    x = {v: i for i, v in enumerate(values)}
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    panels = ((1, "FD_domain vs the VAE baseline (%, lower is better)"), (2, "segmentation mIoU / teacher's"))
    for ax, (i, title) in zip(axes, panels):
        for label, pts in series.items():
            pts = sorted((p for p in pts if p[i] is not None), key=lambda p: x[p[0]])
            if pts:
                ax.errorbar([x[p[0]] for p in pts], [p[i]["mean"] for p in pts], yerr=[p[i]["std"] for p in pts],
                            marker="o", capsize=4, label=label or "this knob alone")
        ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set(xlabel=knob, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].axhline(0, color="grey", linewidth=0.8)
    axes[0].axhline(-15, color="tab:green", linewidth=0.8, linestyle="--")
    return figure_png(fig)
