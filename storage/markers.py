"""Done-markers and manifests: small JSON documents written atomically, last, after their payload."""
from __future__ import annotations

import hashlib
import json

from storage.fs import filesystem, read_bytes, write_bytes_atomic


def write_json(url: str, obj) -> None:
    """Atomically write ``obj`` as pretty, key-sorted JSON."""
    write_bytes_atomic(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(url: str):
    """The JSON document at ``url``, or ``None`` when it is absent or unreadable (a torn write)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return None
    try:
        return json.loads(read_bytes(url))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_url(url: str, block: int = 1 << 20) -> str:
    """Streaming sha256 of the object at ``url``."""
    fs, path = filesystem(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(obj) -> str:
    """Short stable fingerprint of a JSON-serialisable object."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())[:16]
