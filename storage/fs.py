"""One way to reach bytes by URL: local paths, ``file://``, ``s3://`` and ``memory://`` through fsspec.

S3 settings come only from the standard AWS environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``);
botocore reads the credentials itself, so they never pass through this code or its logs.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import re
import uuid
from urllib.parse import urlsplit

import fsspec
from fsspec.core import url_to_fs

from storage import StorageError

TEMP_INFIX = ".tmp-"  # write_bytes_atomic's temporary sibling: <name>.tmp-<32 hex digits>
STALE_TEMP = re.compile(r"\.tmp-[0-9a-f]{32}$")


def storage_options(url: str) -> dict:
    """fsspec options for ``url``: the S3 endpoint from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), and no
    listings cache: other processes (Ray workers, other nodes) write under the folders this one lists, and s3fs
    would answer a later read of their files from the stale listing with FileNotFoundError."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"use_listings_cache": False, **({"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {})}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for a URL or a plain local path."""
    url = os.fspath(url)
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    try:
        return url_to_fs(url, **storage_options(url))
    except (ImportError, ValueError) as e:
        raise StorageError(f"cannot open storage URL {url!r}: {e}") from e


def unreachable(e: BaseException) -> str | None:
    """One line naming the object-store endpoint that ``e`` (or an error behind it) could not reach, or None when
    ``e`` is no such connection error."""
    try:
        from botocore.exceptions import ConnectionClosedError, EndpointConnectionError
    except ImportError:
        return None
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (EndpointConnectionError, ConnectionClosedError)):
            url = urlsplit(e.kwargs.get("endpoint_url") or "")
            endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                        or f"{url.scheme}://{url.netloc}")
            return (f"cannot reach the S3 endpoint {endpoint} ({type(e).__name__}): check that it is up and that "
                    "AWS_ENDPOINT_URL names it")
        e = e.__cause__ or e.__context__
    return None


def protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    """The protocol names of a filesystem (fsspec gives a string or a tuple)."""
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local disk."""
    return bool({"file", "local"} & set(protocols(fs)))


def is_local(url: str) -> bool:
    """Whether ``url`` (a plain path, ``file://``, ``s3://``, ...) names the local disk."""
    return is_local_fs(filesystem(url)[0])


def local_path(url: str) -> str | None:
    """The absolute local path of a plain path or ``file://`` URL; None for an object-store URL."""
    url = os.fspath(url)
    if "://" in url and not url.startswith("file://"):
        return None
    return os.path.abspath(os.path.expanduser(url.removeprefix("file://")))


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL (``/`` separated on every backend)."""
    url = os.fspath(url).rstrip("/")
    return posixpath.join(url, *parts) if parts else url


def check_name(name, what: str = "name") -> str:
    """``name`` if it is one plain path component (no separator, not ``.``/``..``, not absolute), else refuse.

    Names read from documents (manifest shard names, version names, markers) pass through here before
    they are joined onto a root, so a crafted document cannot point a read or a write outside that root.
    """
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0") or ":" in name:
        raise StorageError(f"refusing {what} {name!r}: it must be a plain file name (no '/', '\\', ':' or '..')")
    return name


def child(url: str, name: str, what: str = "name") -> str:
    """``url/name`` for one name read from a document (a manifest, a marker, a version list), for reading or
    writing alike: the name is checked (``check_name``) and the result always lies directly under ``url``."""
    return join(url, check_name(name, what))


def within(root: str, url: str) -> str:
    """``url`` if it lies under ``root`` once ``.`` and ``..`` are resolved (local paths and URLs alike), for a
    path built from a document's value (reads and writes alike). Symbolic links inside ``root`` are followed as
    the user laid them out (a dataset of links is legitimate)."""
    def parts(u: str) -> tuple[str, str]:
        u = to_url(u)
        scheme, sep, rest = u.partition("://")
        return (scheme, posixpath.normpath("/" + rest)) if sep else ("", os.path.normpath(u))

    (rs, rp), (us, up) = parts(root), parts(url)
    if rs != us or (up != rp and not up.startswith(rp.rstrip("/") + "/")):
        raise StorageError(f"refusing {url}: it lies outside {root}")
    return url


def resolved(url: str) -> str:
    """``to_url(url)`` with local symbolic links resolved (what the path really names); URLs unchanged."""
    path = local_path(url)
    return to_url(url) if path is None else os.path.realpath(path)


def to_url(url: str) -> str:
    """Canonical URL string: plain paths become absolute local paths."""
    url = os.fspath(url)
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old object or the new one, never a torn file.

    Local files go through a temporary sibling (``<name>.tmp-<hex>``, removed when the write fails, even on a
    signal) and ``os.replace``; an object-store PUT is atomic.
    """
    fs, path = filesystem(url)
    if is_local_fs(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}{TEMP_INFIX}{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    else:
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)


def remove_stale_temps(url: str) -> list[str]:
    """Remove the temporary files that ``write_bytes_atomic`` left directly under a local folder (a process killed
    mid-write); returns their names. Call it where one run owns the folder, before it writes."""
    path = local_path(url)
    if path is None or not os.path.isdir(path):
        return []
    stale = sorted(n for n in os.listdir(path) if STALE_TEMP.search(n))
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, name))
    return stale


def current_umask() -> int:
    """This process's umask (read from ``/proc`` where it can be, without changing it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(*paths) -> None:
    """Give local files the mode a plain ``open()`` would (0644 under umask 022): files written through a
    temporary file (``mkstemp``, safetensors) come out 0600, which other users of a shared folder cannot read."""
    mode = 0o666 & ~current_umask()
    for path in paths:
        for file in ([os.path.join(d, n) for d, _, names in os.walk(path) for n in names]
                     if os.path.isdir(path) else [path]):
            os.chmod(file, mode)


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_files(url: str, suffix: str = "") -> list[str]:
    """Sorted full URLs of the files directly under ``url`` whose names end with ``suffix``."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    names = sorted(p for p in fs.ls(path, detail=False) if p.endswith(suffix))
    return [join(url, posixpath.basename(p)) for p in names]
