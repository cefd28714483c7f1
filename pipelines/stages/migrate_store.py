"""Convert a latent store written before commits (layout 1) to the committed layout (``reals migrate-store``).

Under the store's lease (the one ``reals encode`` takes), each version of layout 1 gets its marked shards'
rows copied into segments and committed; a shard whose rows no longer match its marker's checksum is left
out (``reals encode`` then redoes it). The old arrays and markers are removed last. Interrupted, a re-run
goes on where it stopped; a store already in layout 2 is left as it is.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from pipelines.config import Cli, StageConfig
from pipelines.registry import Stage
from storage.fs import join, to_url
from storage.latent_store import LEASE_FILE, migrate_layout
from storage.lease import Lease


class MigrateStoreConfig(StageConfig):
    """Settings of ``reals migrate-store``."""

    store: Annotated[str, Cli(positional=True)] = Field(description="latent store root URL (holds versions.json)")
    lease_wait: float = Field(0.0, ge=0, description="seconds to wait for another run's lease on the store")


class MigrateStoreSummary(BaseModel):
    """What ``reals migrate-store`` did."""

    store: str
    versions: list[str]
    shards: int
    left: list[str]


def run(config: MigrateStoreConfig) -> MigrateStoreSummary:
    """Migrate every layout-1 version of the store, holding its lease."""
    root = to_url(config.store).rstrip("/")
    with Lease(join(root, LEASE_FILE)).hold(wait=config.lease_wait) as lease:
        done = migrate_layout(root, lease.owner, fence=lease.check)
    return MigrateStoreSummary(store=root, **done)


def show(summary: MigrateStoreSummary) -> None:
    if not summary.versions:
        print(f"migrate-store {summary.store}: already in the committed layout")
        return
    print(f"migrate-store {summary.store}: {len(summary.versions)} version(s) converted "
          f"({', '.join(summary.versions)}), {summary.shards} shards committed")
    if summary.left:
        print(f"  {len(summary.left)} shards whose rows did not match their marker were left out "
              f"(first: {summary.left[0]}): `reals encode` redoes them")


STAGES = [Stage("migrate-store", MigrateStoreConfig, MigrateStoreSummary, run, show=show,
                help="convert a latent store written before commits to the committed layout",
                description=__doc__.splitlines()[0])]
