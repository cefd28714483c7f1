"""Done-markers and manifests: small JSON documents written atomically, last, after their payload."""
from __future__ import annotations

import hashlib
import json

from storage import StorageError
from storage.fs import filesystem, read_bytes, write_bytes_atomic


def write_json(url: str, obj) -> None:
    """Atomically write ``obj`` as pretty, key-sorted JSON."""
    write_bytes_atomic(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class DamagedRecord(StorageError):
    """A JSON record that exists but does not parse: never taken as absent, since redoing its work from
    scratch could change what it records (a shard assignment, a manifest, a done-marker)."""


def read_json(url: str, remedy: str = "delete it to redo what it records, or restore it from a copy"):
    """The JSON document at ``url``, or ``None`` when it is absent; ``DamagedRecord`` (saying ``remedy``) when it
    exists but does not parse (our writes are atomic, so something else damaged it)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return None
    data = read_bytes(url)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedRecord(f"{url} is damaged ({len(data)} bytes, not valid JSON: "
                            f"{getattr(e, 'msg', None) or e.reason}): {remedy}") from e


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
