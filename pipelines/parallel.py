"""Ray plumbing shared by the batch stages: start or join Ray, run units with a progress bar."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster at ``RAY_ADDRESS`` or start a local Ray once; reuse one that is running."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)


def progress_bar(disable: bool = False) -> Progress:
    """The rich progress bar every long stage shows on the driver."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=disable, transient=False,
    )


def map_units(remote_fn, units: Sequence, description: str, on_result: Callable | None = None,
              max_in_flight: int | None = None, show_progress: bool = True) -> list:
    """Run ``remote_fn.remote(unit)`` for every unit on Ray; results come back in unit order.

    ``max_in_flight`` bounds the queue so the driver never floods the cluster's object store.
    """
    import ray

    results: list = [None] * len(units)
    pending: dict = {}
    todo = list(enumerate(units))
    limit = max_in_flight or max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    with progress_bar(disable=not show_progress) as bar:
        task = bar.add_task(description, total=len(units))
        while todo or pending:
            while todo and len(pending) < limit:
                i, unit = todo.pop(0)
                pending[remote_fn.remote(unit)] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                results[i] = ray.get(ref)
                if on_result:
                    on_result(results[i])
                bar.advance(task)
    return results


def map_actors(actors: Sequence, method: str, units: Iterable, description: str,
               show_progress: bool = True) -> list:
    """Feed units to a pool of Ray actors (each loads its model once); results in unit order."""
    from ray.util import ActorPool

    units = list(units)
    pool = ActorPool(list(actors))
    results = []
    with progress_bar(disable=not show_progress) as bar:
        task = bar.add_task(description, total=len(units))
        for r in pool.map(lambda a, u: getattr(a, method).remote(u), units):
            results.append(r)
            bar.advance(task)
    return results
