"""An ImageNet-layout folder, ``<split>/<class-id>/<image>``, listed and read by URL (local, ``s3://``, ...)."""
from __future__ import annotations

import posixpath

from storage.fs import filesystem, join

IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".webp")


def _entries(url: str, kind: str) -> list[str]:
    """Sorted names of the visible entries of ``kind`` (``directory`` or ``file``) directly under ``url``."""
    fs, path = filesystem(url)
    if not fs.isdir(path):
        return []
    names = (posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True) if e["type"] == kind)
    return sorted(n for n in names if not n.startswith("."))


def subfolders(url: str) -> list[str]:
    """Sorted names of the folders directly under ``url`` (hidden ones left out); [] when it is no folder."""
    return _entries(url, "directory")


def split_images(url: str, split: str) -> list[tuple[str, str]] | None:
    """``(class-id, path relative to url)`` of every image of ``split``, sorted by class, then name; None when
    the split has no folder."""
    split_url = join(url, split)
    fs, path = filesystem(split_url)
    if not fs.isdir(path):
        return None
    return [(c, f"{split}/{c}/{f}") for c in subfolders(split_url)
            for f in _entries(join(split_url, c), "file") if f.lower().endswith(IMAGE_EXTS)]


def file_states(url: str) -> list[list]:
    """``[path, size, modification time]`` of every file below ``url``, sorted: a cheap change detector."""
    fs, path = filesystem(url)
    if not fs.isdir(path):
        return []
    found = fs.find(path, detail=True)
    return [[name, info.get("size"), str(info.get("mtime", info.get("LastModified")))]
            for name, info in sorted(found.items())]
