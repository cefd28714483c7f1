"""A lease kept in the store, so two runs never write one store at the same time.

The lease is a JSON object ``{"owner", "expires_at", "expires"}``. It is taken or renewed only by a
compare-and-swap: on S3 a conditional PUT (``If-None-Match: *`` to create, ``If-Match: <etag>`` to replace),
on local disk a file lock around read-compare-replace, elsewhere a write followed by a read-back check.
A crashed holder stops renewing, so its lease expires and the next run takes it over.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import posixpath
import socket
import threading
import time
import uuid

from storage import StorageError
from storage.fs import filesystem, is_local_fs, protocols


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------
# Compare-and-swap backends: read() -> (doc | None, tag); swap(tag, data) -> bool; delete()
# ---------------------------------------------------------------------------------------------------

class _LocalBackend:
    """A local file replaced atomically under an exclusive ``flock`` on a sibling lock file."""

    def __init__(self, path: str):
        self.path = path

    def read(self):
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return _parse(data), hashlib.sha256(data).hexdigest()

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def swap(self, tag, data: bytes) -> bool:
        with self._locked():
            if self.read()[1] != tag:
                return False
            tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            return True

    def delete(self) -> None:
        with self._locked(), contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


class _S3Backend:
    """An S3 object written with conditional PUTs (the ETag is the tag)."""

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self):
        from fsspec.asyn import sync

        async def _get():
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with resp["Body"] as stream:
                return await stream.read(), resp["ETag"]

        try:
            data, etag = sync(self.fs.loop, _get)
        except FileNotFoundError:
            return None, None
        return _parse(data), etag

    def swap(self, tag, data: bytes) -> bool:
        cond = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
        try:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **cond)
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise
        return True

    def delete(self) -> None:
        self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)


class _GenericBackend:
    """Any other fsspec backend: compare, write, then read back (best effort, no atomic swap)."""

    def __init__(self, fs, path: str):
        self.fs = fs
        self.path = path

    def read(self):
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        return _parse(data), hashlib.sha256(data).hexdigest()

    def swap(self, tag, data: bytes) -> bool:
        if self.read()[1] != tag:
            return False
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        self.fs.pipe_file(self.path, data)
        return True

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)


def _parse(data: bytes) -> dict:
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        doc = None
    return doc if isinstance(doc, dict) else {"owner": "?", "expires_at": 0.0}


def _precondition_failed(e: BaseException) -> bool:
    if isinstance(e, FileExistsError):
        return True
    cause = e.__cause__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def _backend(url: str):
    fs, path = filesystem(url)
    if is_local_fs(fs):
        return _LocalBackend(path)
    if "s3" in protocols(fs):
        return _S3Backend(fs, path)
    return _GenericBackend(fs, path)


# ---------------------------------------------------------------------------------------------------
# The lease
# ---------------------------------------------------------------------------------------------------

class Lease:
    """An expiring, renewable claim on a store; ``with Lease(url).hold(wait=60): ...``."""

    def __init__(self, url: str, owner: str | None = None, ttl: float = 120.0):
        self.url = url
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ttl = float(ttl)
        self.lost: str | None = None
        self._backend = _backend(url)
        self._lock = threading.Lock()

    def _doc(self) -> bytes:
        expires_at = time.time() + self.ttl
        doc = {"owner": self.owner, "expires_at": expires_at, "expires": _iso(expires_at)}
        return json.dumps(doc, sort_keys=True).encode()

    def holder(self) -> dict | None:
        """The current lease document, or None when nobody holds one."""
        return self._backend.read()[0]

    def acquire(self, wait: float = 0.0, poll: float = 0.5) -> "Lease":
        """Take the lease, waiting up to ``wait`` seconds for a live one held by someone else to end."""
        deadline = time.monotonic() + wait
        while True:
            doc, tag = self._backend.read()
            free = doc is None or doc.get("owner") == self.owner or float(doc.get("expires_at", 0)) <= time.time()
            if free and self._backend.swap(tag, self._doc()) and self._confirm():
                self.lost = None
                return self
            if not free and time.monotonic() >= deadline:
                raise StorageError(
                    f"{self.url} is leased by {doc.get('owner')} until {_iso(float(doc.get('expires_at', 0)))}: "
                    f"another run is writing this store; wait for it, or for the lease to expire if it crashed")
            if not free:
                time.sleep(max(0.0, min(poll, deadline - time.monotonic())))

    def _confirm(self) -> bool:
        doc = self._backend.read()[0]
        return doc is not None and doc.get("owner") == self.owner

    def renew(self) -> None:
        """Push the expiry forward; records and raises if another owner has taken the lease."""
        with self._lock:
            doc, tag = self._backend.read()
            if doc is None or doc.get("owner") != self.owner or not self._backend.swap(tag, self._doc()):
                holder = (doc or {}).get("owner", "nobody")
                self.lost = f"lease on {self.url} was lost (now held by {holder})"
                raise StorageError(self.lost)

    def check(self) -> None:
        """Raise if the lease was lost while working."""
        if self.lost:
            raise StorageError(self.lost)

    def release(self) -> None:
        """Give the lease up (only if it is still ours)."""
        with self._lock:
            if self._confirm():
                self._backend.delete()

    @contextlib.contextmanager
    def hold(self, wait: float = 0.0):
        """Acquire, renew in the background every ``ttl / 3`` seconds, release on exit."""
        self.acquire(wait=wait)
        stop = threading.Event()

        def _renew_loop():
            while not stop.wait(self.ttl / 3):
                try:
                    self.renew()
                except (StorageError, OSError):
                    if self.lost:
                        return

        thread = threading.Thread(target=_renew_loop, name="lease-renewal", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            if not self.lost:
                self.release()
