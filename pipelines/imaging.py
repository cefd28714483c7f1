"""Image helpers for the shard stage: decode any source image to 8-bit RGB, the ADM center crop, encoders.

Conventions (applied to every source image, in this order):
- the image is fully decoded (a truncated or corrupt file raises here, so the caller can skip it);
- only the first frame of a multi-frame file is used; EXIF orientation is NOT applied (as in ADM/DiT);
- alpha (RGBA, LA, PA, palette with transparency) is composited over white, never dropped, so
  transparent regions become white instead of whatever colour the invisible pixels happened to hold;
- 16-bit and 32-bit integer greyscale (I;16*, I) are scaled to 8 bits (value / 257, clipped), float
  greyscale (F) is clipped to [0, 255]; CMYK, greyscale, palette and YCbCr go through Pillow's ``convert``;
- images smaller than the target are upsampled by the crop (BICUBIC), exactly as ADM does.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

JPEG_QUALITY = 95
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def open_image(data: bytes) -> Image.Image:
    """Decode encoded bytes completely; raises on corrupt, truncated or non-image input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im = Image.open(io.BytesIO(data))
        im.load()
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (alpha over white, high bit depths scaled; see module docstring)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.float64)
        if im.mode != "F":
            arr = arr / 257.0
        grey = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    if (im.mode == "P" and "transparency" in im.info) or im.mode in ("PA", "LA", "La", "RGBa", "RGBA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def center_crop(im: Image.Image, size: int) -> Image.Image:
    """ADM/DiT center crop: BOX-halve while the short side >= 2*size, BICUBIC to short side = size, crop."""
    while min(im.size) >= 2 * size:
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.Resampling.BOX)
    scale = size / min(im.size)
    im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.Resampling.BICUBIC)
    left = (im.size[0] - size) // 2
    top = (im.size[1] - size) // 2
    return im.crop((left, top, left + size, top + size))


def encode(im: Image.Image, image_format: str) -> bytes:
    """Deterministic encoding: PNG (lossless, no metadata) or JPEG (quality 95, no metadata)."""
    buf = io.BytesIO()
    if image_format == "png":
        im.save(buf, format="PNG", compress_level=6)
    elif image_format == "jpg":
        im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        raise ValueError(f"unknown image format {image_format!r}")
    return buf.getvalue()


def prepare(data: bytes, resolution: int, image_format: str) -> tuple[str, bytes, dict]:
    """Source bytes -> ``(ext, encoded bytes, info)``; ``resolution`` 0 keeps 8-bit RGB JPEG/PNG/WebP bytes.

    ``info`` holds the original ``size`` [w, h], ``mode``, ``format`` and whether it was ``upsampled``.
    """
    im = open_image(data)
    info = {"size": list(im.size), "mode": im.mode, "format": im.format,
            "upsampled": bool(resolution) and min(im.size) < resolution}
    if resolution == 0 and im.mode == "RGB" and im.format in FORMAT_EXT:
        return FORMAT_EXT[im.format], data, info
    rgb = to_rgb(im)
    if resolution:
        rgb = center_crop(rgb, resolution)
    return image_format, encode(rgb, image_format), info
