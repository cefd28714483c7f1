"""Stops a driver's local Ray helpers when the driver dies, even by ``kill -9``.

Ray's node processes die with the driver that started them, but the raylet's helpers (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) and idle workers linger for a minute or more. ``watch_driver()`` starts a small
watcher process that follows the raylet's descendants while the driver lives and, once it is gone, stops
exactly those processes (by PID and start time, never by name). Linux only (it reads ``/proc``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5
SCAN_EVERY = 10  # polls between scans for new helpers and workers
GRACE_S = 3.0


def _stat(pid: int) -> tuple[int, str] | None:
    """``(parent pid, start time)`` of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (None if fields[0] == "Z" else (int(fields[1]), fields[19]))


def descendants(roots: dict[int, str]) -> dict[int, str]:
    """Every live process below (and including) ``roots`` (pid -> start time)."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))):
            table[int(name)] = st
    found = {pid: start for pid, start in roots.items() if table.get(pid, (0, None))[1] == start}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, start) in table.items():
            if ppid in found and pid not in found:
                found[pid] = start
                grew = True
    return found


def _alive(procs: dict[int, str]) -> dict[int, str]:
    return {pid: start for pid, start in procs.items() if (st := _stat(pid)) and st[1] == start}


def _signal(procs: dict[int, str], sig: int) -> None:
    for pid in _alive(procs):
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def watch(driver: int, driver_start: str, roots: dict[int, str]) -> None:
    """Follow ``roots``' descendants while ``driver`` lives; then stop them (TERM, then KILL)."""
    procs, polls = dict(roots), 0
    while (st := _stat(driver)) and st[1] == driver_start:
        if polls % SCAN_EVERY == 0:  # a /proc scan costs more than a look at the driver
            procs = _alive({**procs, **descendants(procs)})
            if not procs:
                return
        polls += 1
        time.sleep(POLL_S)
    _signal(procs, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal(procs, signal.SIGKILL)


def watch_driver() -> None:
    """Start the watcher for this driver's local Ray (a no-op without ``/proc`` or a local node)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    me = _stat(os.getpid()) if os.path.isdir("/proc") else None
    if node is None or me is None:
        return
    roots = {}
    for infos in node.all_processes.values():
        for info in infos:
            if (st := _stat(info.process.pid)):
                roots[info.process.pid] = st[1]
    args = [str(os.getpid()), me[1], *(f"{pid}:{start}" for pid, start in roots.items())]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # `-m` imports from the cwd
    subprocess.Popen([sys.executable, "-m", "pipelines.ray_reaper", *args], cwd=root, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


if __name__ == "__main__":
    driver, driver_start, *pairs = sys.argv[1:]
    watch(int(driver), driver_start, {int(p): s for p, s in (x.split(":", 1) for x in pairs)})
