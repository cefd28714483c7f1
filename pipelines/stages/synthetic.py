"""A deterministic synthetic ImageNet-layout dataset with per-pixel ground truth (``reals synthetic``).

Layout under ``--output`` (every image is a pure function of seed, split, class and index):

    train/<class-id>/<class-id>_<i>.JPEG          val/<class-id>/ILSVRC2012_val_<n:08d>.JPEG
    masks/<split>/<class-id>/<stem>.png            depth/<split>/<class-id>/<stem>.png
    LOC_synset_mapping.txt                         ("<class-id> <colour> <texture> <shape>" per line)

Class ``k`` (id ``n{k:08d}``) fixes a shape, a hue, a texture and a layout (one large shape, a pair,
or a crowd of small ones); instances vary in position, scale, rotation, colour jitter and a textured
background (a gradient in a random low-saturation colour with grain).

Ground truth (8-bit greyscale PNG, same size as the image, sampled at pixel centres):
- ``masks``: ``class index + 1`` where a shape covers the pixel, ``0`` for background;
- ``depth``: drawing order, ``0`` for background and ``j`` for the j-th shape drawn (1-based); shapes
  drawn later overlap earlier ones, so a larger value means nearer to the viewer.
"""
from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, Field

from pipelines.config import StageConfig
from pipelines.registry import Chain, Output, Stage

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")
TEXTURES = ("solid", "stripes", "dots", "noise")
LAYOUTS = ("single", "pair", "crowd")
HUE_NAMES = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet",
             "magenta", "rose")
SPLIT_CODES = {"train": 0, "val": 1}
JPEG_QUALITY = 90


class SyntheticConfig(StageConfig):
    """Settings of ``reals synthetic``."""

    output: str = Field(description="folder to write the ImageNet-layout dataset into")
    classes: int = Field(10, ge=1, le=254, description="number of classes")
    per_class: int = Field(64, ge=1, description="training images per class")
    val_per_class: int = Field(0, ge=0, description="validation images per class (0: no val split)")
    size: int = Field(64, ge=16, le=1024, description="image side in pixels")
    seed: int = Field(0, ge=0, description="random seed; the same seed gives byte-identical files")


class SyntheticSummary(BaseModel):
    """What ``reals synthetic`` wrote."""

    output: str
    classes: int
    images: dict[str, int]
    size: int
    seed: int


# ---------------------------------------------------------------------------------------------------
# Classes
# ---------------------------------------------------------------------------------------------------

def class_id(k: int) -> str:
    """WordNet-like class folder name."""
    return f"n{k:08d}"


def class_spec(k: int) -> dict:
    """The fixed look of class ``k``: shape, texture, layout and base hue."""
    hue = (k * 0.618033988749895) % 1.0
    shape = SHAPES[k % len(SHAPES)]
    kind = TEXTURES[(k + k // len(SHAPES)) % len(TEXTURES)]
    return {
        "shape": shape,
        "texture": kind,
        "layout": LAYOUTS[(k + k // len(LAYOUTS)) % len(LAYOUTS)],
        "hue": hue,
        "name": f"{HUE_NAMES[int(hue * len(HUE_NAMES))]} {kind} {shape}",
    }


# ---------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------

def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def _polygon(cx: float, cy: float, radii: list[float], rot: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [(cx + r * math.cos(rot + 2 * math.pi * i / n), cy + r * math.sin(rot + 2 * math.pi * i / n))
            for i, r in enumerate(radii)]


def shape_mask(shape: str, side: int, cx: float, cy: float, r: float, rot: float) -> np.ndarray:
    """Boolean ``side x side`` coverage of one shape centred at (cx, cy) with radius ``r``."""
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=1)
    elif shape == "ring":
        draw.ellipse(box, fill=1)
        draw.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=0)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, [r] * 4, rot + math.pi / 4), fill=1)
    elif shape == "diamond":
        pts = _polygon(cx, cy, [r, 0.6 * r] * 2, rot)
        draw.polygon(pts, fill=1)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, [r] * 3, rot - math.pi / 2), fill=1)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, [r] * 6, rot), fill=1)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r, 0.45 * r] * 5, rot - math.pi / 2), fill=1)
    elif shape == "cross":
        w = 0.35 * r
        arm = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w),
               (-w, -w)]
        c, s = math.cos(rot), math.sin(rot)
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in arm], fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(canvas, dtype=bool)


def texture(kind: str, xx: np.ndarray, yy: np.ndarray, side: int, rng: np.random.Generator,
            primary: np.ndarray, secondary: np.ndarray, period: float) -> np.ndarray:
    """Colours ``[N, 3]`` of one texture kind in two colours at pixel coordinates ``xx``, ``yy`` ``[N]``."""
    if kind == "solid":
        weight = np.zeros(xx.shape, np.float32)
    elif kind == "stripes":
        angle = rng.uniform(0, math.pi)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        weight = (np.sin(2 * math.pi * phase) > 0).astype(np.float32)
    elif kind == "dots":
        step = max(period, 3.0)
        dx = (xx + rng.uniform(0, step)) % step - step / 2
        dy = (yy + rng.uniform(0, step)) % step - step / 2
        weight = (dx * dx + dy * dy < (0.3 * step) ** 2).astype(np.float32)
    elif kind == "noise":
        cells = max(2, int(side / max(period / 2, 1.0)))
        coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        field = np.asarray(coarse.resize((side, side), Image.Resampling.BILINEAR), np.float32) / 255.0
        weight = field[yy, xx]
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return primary * (1 - weight[:, None]) + secondary * weight[:, None]


def background(side: int, rng: np.random.Generator) -> np.ndarray:
    """A low-saturation gradient in a random direction with fine grain."""
    h = rng.random()
    a = _hsv(h, rng.uniform(0.05, 0.25), rng.uniform(0.3, 0.85))
    b = _hsv(h + rng.uniform(-0.1, 0.1), rng.uniform(0.05, 0.25), rng.uniform(0.3, 0.85))
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    t = np.clip(0.5 + (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle), 0, 1)[..., None]
    grain = rng.normal(0, 6.0, (side, side, 1)).astype(np.float32)
    return a * (1 - t) + b * t + grain


def supersampling(size: int) -> int:
    """Drawing is done at ``size * ss`` and box-filtered down, for anti-aliased edges."""
    return min(4, max(2, 256 // size))


def render(k: int, size: int, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """One instance of class ``k``: (RGB image, mask uint8, depth uint8), all ``size x size``."""
    spec = class_spec(k)
    ss = supersampling(size)
    side = size * ss
    img = background(side, rng)
    mask = np.zeros((side, side), np.uint8)
    depth = np.zeros((side, side), np.uint8)
    layout = spec["layout"]
    count = {"single": 1, "pair": 2, "crowd": int(rng.integers(3, 5))}[layout]
    lo, hi = {"single": (0.24, 0.32), "pair": (0.15, 0.21), "crowd": (0.09, 0.14)}[layout]
    for j in range(count):
        r = rng.uniform(lo, hi)
        if layout == "single":
            cx, cy = 0.5 + rng.uniform(-0.1, 0.1, 2)
        else:
            cx, cy = rng.uniform(r, 1 - r, 2)
        rot = rng.uniform(0, 2 * math.pi)
        cover = shape_mask(spec["shape"], side, cx * side, cy * side, r * side, rot)
        hue = spec["hue"] + rng.normal(0, 0.02)
        primary = _hsv(hue, rng.uniform(0.65, 0.95), rng.uniform(0.75, 1.0))
        secondary = _hsv(hue + 0.5, rng.uniform(0.5, 0.9), rng.uniform(0.2, 0.45))
        yy, xx = np.nonzero(cover)
        img[yy, xx] = texture(spec["texture"], xx, yy, side, rng, primary, secondary, period=r * side / 2.5)
        mask[cover] = k + 1
        depth[cover] = j + 1
    pixels = np.clip(np.round(img), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BOX)
    centre = slice(ss // 2, None, ss)
    return image, mask[centre, centre], depth[centre, centre]


# ---------------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------------

def _write(path: Path, image: Image.Image, **save) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save)


def run(config: SyntheticConfig) -> SyntheticSummary:
    """Write the dataset; every file is overwritten with the same bytes for the same settings."""
    root = Path(config.output)
    root.mkdir(parents=True, exist_ok=True)
    counts = {"train": config.per_class, "val": config.val_per_class}
    written: dict[str, int] = {}
    for split, per_class in counts.items():
        if not per_class:
            continue
        for k in range(config.classes):
            cid = class_id(k)
            for i in range(per_class):
                stem = f"{cid}_{i}" if split == "train" else f"ILSVRC2012_val_{k * per_class + i + 1:08d}"
                rng = np.random.default_rng([config.seed, SPLIT_CODES[split], k, i])
                image, mask, depth = render(k, config.size, rng)
                _write(root / split / cid / f"{stem}.JPEG", image, format="JPEG", quality=JPEG_QUALITY)
                _write(root / "masks" / split / cid / f"{stem}.png", Image.fromarray(mask), format="PNG")
                _write(root / "depth" / split / cid / f"{stem}.png", Image.fromarray(depth), format="PNG")
        written[split] = per_class * config.classes
    mapping = "".join(f"{class_id(k)} {class_spec(k)['name']}\n" for k in range(config.classes))
    (root / "LOC_synset_mapping.txt").write_text(mapping)
    return SyntheticSummary(output=str(root), classes=config.classes, images=written, size=config.size,
                            seed=config.seed)


def missing_outputs(config: SyntheticConfig) -> str | None:
    """What the dataset folder still lacks, or None when every image of the settings is there."""
    root = Path(config.output)
    if not (root / "LOC_synset_mapping.txt").is_file():
        return "no LOC_synset_mapping.txt"
    for split, per_class in (("train", config.per_class), ("val", config.val_per_class)):
        found = sum(1 for _ in (root / split).glob("*/*.JPEG")) if per_class else 0
        if found != per_class * config.classes:
            return f"{found} of {per_class * config.classes} {split} images"
    return None


def show(summary: SyntheticSummary) -> None:
    counts = ", ".join(f"{n} {split}" for split, n in summary.images.items())
    print(f"synthetic: {summary.classes} classes, {counts} images at {summary.size}px -> {summary.output}")


STAGES = [Stage("synthetic", SyntheticConfig, SyntheticSummary, run, missing=missing_outputs, show=show,
                writes={"output": Output("images", "data", local=True)},
                chain=Chain("synthetic", "when set, a synthetic dataset is written to images first", optional=True),
                help="write a synthetic ImageNet-layout dataset with masks and depth",
                description="Write a deterministic ImageNet-layout folder of K shape classes (train/, optional "
                            "val/), with per-pixel masks/ (class index + 1) and depth/ (drawing order, larger = "
                            "nearer).")]
