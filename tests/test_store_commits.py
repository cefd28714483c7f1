"""Store commits are fenced: bytes of a run that lost its lease, landing after another run finished, change nothing.

Run A reaches S3 (moto) through a proxy that turns into a black hole at A's first upload of rows, or at A's
first shard commit: A's requests hang, unanswered, past A's lease. Run B takes the store over and finishes.
Then the proxy delivers A's held requests. The store must verify OK, and its rows equal an undisturbed run's.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.stages.encode import EncodeConfig, run as encode
from pipelines.stages.verify_store import VerifyStoreConfig, run as verify
from storage.fs import join
from storage.latent_store import LatentStore, commit_log

from helpers import HoldingProxy
from test_faults import poll


@pytest.mark.parametrize("hold_on", [b"/segments/train-000000-", b"/commits/000000000001.json"],
                         ids=["rows-upload", "commit"])
def test_late_bytes_of_a_run_that_lost_its_lease_change_nothing(hold_on, tiny_shards, tiny_vae_dir, tiny_store,
                                                                s3_server, s3_bucket):
    proxy = HoldingProxy(int(s3_server.rsplit(":", 1)[1]), hold_on=hold_on)
    store = f"{s3_bucket}/store"
    # A 10 s TTL: short, yet beyond the stalls a loaded 2-core machine gives a renewal thread before the hold.
    cmd = [sys.executable, "-m", "pipelines.cli", "encode", "--data-path", tiny_shards, "--vae-path", tiny_vae_dir,
           "--output", store, "--workers", "0", "--chunk-rows", "16", "--lease-ttl", "10", "--retries", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "AWS_ENDPOINT_URL": proxy.url}
    a = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        poll(lambda: proxy.held_at or a.poll() is not None, "run A's upload to hang")
        assert a.poll() is None, f"run A ended before its upload hung: {a.communicate()[1][-3000:]}"
        b = encode(EncodeConfig(data_path=tiny_shards, vae_path=tiny_vae_dir, output=store, chunk_rows=16,
                                workers=0, lease_wait=120, show_progress=False))
        assert a.poll() is None and proxy.delivered_late == 0  # A is still hanging when B has finished
        proxy.release()
        _, a_err = a.communicate(timeout=180)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 2 and "lease on" in a_err, a_err[-3000:]
    assert proxy.delivered_late > 0 and b.rows_done == 48

    version = join(store, b.version)
    log = commit_log(version)
    a_owner, b_owner = log[0]["takeover"], log[1]["takeover"]  # A took the store first, then B took it over
    assert [e.get("writer") for e in log if "shard" in e] == [b_owner, b_owner]
    assert a_owner != b_owner
    checked = verify(VerifyStoreConfig(store=store, data_path=tiny_shards, vae_path=tiny_vae_dir, num_samples=48))
    assert checked.ok, checked.problems
    got, want = LatentStore.open(store), LatentStore.open(tiny_store.url)
    assert got.shard_map == want.shard_map
    for name, values in want.read_rows(0, want.num_rows).items():
        assert np.array_equal(got.read_rows(0, got.num_rows, [name])[name], values), name
