"""A lease kept beside what it guards (a latent store, a shards folder), so two runs never write it at once;
exclusive creates.

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
from storage.fs import filesystem, is_local_fs, protocols, storage_options


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


def _backend(url: str, timeout: float | None = None):
    """The compare-and-swap backend for ``url``; with ``timeout``, S3 calls give up after that many seconds
    (on a client of their own) instead of hanging on a dead connection."""
    fs, path = filesystem(url)
    if is_local_fs(fs):
        return _LocalBackend(path)
    if "s3" in protocols(fs) and timeout is not None:
        config = {"connect_timeout": timeout, "read_timeout": timeout, "retries": {"max_attempts": 1}}
        return _S3Backend(type(fs)(**storage_options(url), config_kwargs=config, skip_instance_cache=True), path)
    if "s3" in protocols(fs):
        return _S3Backend(fs, path)
    return _GenericBackend(fs, path)


def create_exclusive(url: str, data: bytes) -> bool:
    """Write ``data`` at ``url`` only if nothing is there; False when the object exists.

    The store's commit log claims its slots with this (``storage.latent_store``): on S3 a conditional PUT,
    locally a hard link of a written temporary file, so two writers never both create one slot, however late
    a PUT lands.
    """
    fs, path = filesystem(url)
    if not is_local_fs(fs):
        return _backend(url).swap(None, data)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)
    return True


# ---------------------------------------------------------------------------------------------------
# The lease
# ---------------------------------------------------------------------------------------------------

class LeaseLost(StorageError):
    """The run's lease ran out or was taken over: the run must stop writing."""


def holder_is_gone(owner: str) -> bool:
    """Whether ``owner`` (``host:pid:token``) names a process on this host that no longer exists."""
    host, _, rest = str(owner).partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # the process exists (another user's): alive
        return False
    return False


def fence(url: str, owner: str, margin: float = 0.0) -> None:
    """Raise ``LeaseLost`` unless ``owner`` holds the lease at ``url`` for at least ``margin`` more seconds.

    A writer in another process (a Ray actor) calls this before each write: a run whose lease ran out
    during an outage never writes once storage answers again.
    """
    doc = _backend(url).read()[0]
    if doc is None or doc.get("owner") != owner or float(doc.get("expires_at", 0)) - time.time() < margin:
        holder = (doc or {}).get("owner", "nobody")
        raise LeaseLost(f"lease on {url} is no longer held by this run (held by {holder}); stopped writing")


class Lease:
    """An expiring, renewable claim on a store; ``with Lease(url).hold(wait=60): ...``.

    While held, a background thread renews it every ``ttl / 3`` seconds and retries any storage error
    with backoff; a watchdog declares it lost ``margin`` seconds before it would expire unrenewed, calls
    ``on_lost`` (which stops the run's writers) and makes ``check()`` raise ``LeaseLost`` from then on.
    A lease whose holder is a process of this host that no longer exists is taken at once.
    """

    def __init__(self, url: str, owner: str | None = None, ttl: float = 120.0):
        self.url = url
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ttl = float(ttl)
        self.margin = self.ttl / 6
        self.lost: str | None = None
        self.last_error: str | None = None
        self._valid_until = 0.0  # monotonic time at which our last written document expires (or earlier)
        self._backend = _backend(url, timeout=max(2.0, self.ttl / 6))
        self._lock = threading.Lock()

    def _swap(self, tag) -> bool:
        start = time.monotonic()
        expires_at = time.time() + self.ttl
        doc = {"owner": self.owner, "expires_at": expires_at, "expires": _iso(expires_at)}
        if not self._backend.swap(tag, json.dumps(doc, sort_keys=True).encode()):
            return False
        self._valid_until = start + self.ttl
        return True

    def holder(self) -> dict | None:
        """The current lease document, or None when nobody holds one."""
        return self._backend.read()[0]

    def acquire(self, wait: float = 0.0, poll: float = 0.5) -> "Lease":
        """Take the lease, waiting up to ``wait`` seconds for a live one held by someone else to end."""
        deadline = time.monotonic() + wait
        while True:
            doc, tag = self._backend.read()
            free = (doc is None or doc.get("owner") == self.owner or float(doc.get("expires_at", 0)) <= time.time()
                    or holder_is_gone(doc.get("owner", "")))
            if free and self._swap(tag) and self._confirm():
                self.lost = None
                return self
            if not free and time.monotonic() >= deadline:
                raise StorageError(
                    f"{self.url} is leased by {doc.get('owner')} until {_iso(float(doc.get('expires_at', 0)))}: "
                    f"another run is writing there; wait for it (--lease-wait S), or for the lease to expire if it "
                    "crashed")
            if not free:
                time.sleep(max(0.0, min(poll, deadline - time.monotonic())))

    def _confirm(self) -> bool:
        doc = self._backend.read()[0]
        return doc is not None and doc.get("owner") == self.owner

    def renew(self) -> None:
        """Push the expiry forward; records and raises ``LeaseLost`` if another owner has taken the lease."""
        with self._lock:
            if self.lost:
                raise LeaseLost(self.lost)
            doc, tag = self._backend.read()
            if doc is None or doc.get("owner") != self.owner or not self._swap(tag):
                holder = (doc or {}).get("owner", "nobody")
                self.lost = f"lease on {self.url} was lost (now held by {holder}); stopped writing"
                raise LeaseLost(self.lost)

    def remaining(self) -> float:
        """Seconds until the lease expires unless renewed (as this process last wrote it)."""
        return self._valid_until - time.monotonic()

    def check(self) -> None:
        """Raise ``LeaseLost`` if the lease was lost, or is about to expire unrenewed."""
        if self.lost is None and self.remaining() < self.margin:
            self.lost = (f"lease on {self.url} could not be renewed before it expired "
                         f"({self.last_error or 'no renewal in time'}); stopped writing: re-run the same command")
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        """Give the lease up (only if it is still ours)."""
        with self._lock:
            if self._confirm():
                self._backend.delete()

    def _renew_loop(self, stop: threading.Event) -> None:
        delay, backoff = self.ttl / 3, 0.0
        while not stop.wait(delay):
            try:
                self.renew()
                delay, backoff, self.last_error = self.ttl / 3, 0.0, None
            except LeaseLost:
                return
            except Exception as e:  # noqa: BLE001 - any storage error (botocore's too): retry while the lease lasts
                self.last_error = f"{type(e).__name__}: {e}"
                backoff = min(2 * backoff or self.ttl / 30, self.ttl / 6)
                delay = max(0.01, min(backoff, self.remaining() - self.margin))

    def _watch(self, stop: threading.Event, on_lost) -> None:
        while not stop.wait(min(self.margin / 2, 1.0)):
            try:
                self.check()
            except LeaseLost:
                if on_lost is not None:
                    on_lost()
                return

    @contextlib.contextmanager
    def hold(self, wait: float = 0.0, on_lost=None):
        """Acquire, renew in the background, watch the expiry (calling ``on_lost`` once it is lost); release."""
        self.acquire(wait=wait)
        stop = threading.Event()
        threads = [threading.Thread(target=self._renew_loop, args=(stop,), name="lease-renewal", daemon=True),
                   threading.Thread(target=self._watch, args=(stop, on_lost), name="lease-watchdog", daemon=True)]
        for t in threads:
            t.start()
        try:
            yield self
        finally:
            stop.set()
            threads[1].join()
            if not self.lost:
                threads[0].join()
                self.release()
