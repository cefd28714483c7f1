"""LatentLoader: exact-once epochs across ranks, flips and posterior sampling, determinism, done rows only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from storage.latent_loader import LatentDataset, LatentLoader
from storage.latent_store import LatentStore, MissingRowsWarning, rows_checksum

SHAPE = (2, 2, 2)


def build_store(root, shards=(("s-0.tar", 20), ("s-1.tar", 13), ("s-2.tar", 11)), marked=(0, 1, 2),
                std=0.0, chunk_rows=8):
    """Rows hold their own row number: mean = +row, mean_flip = -row, label = row; shards not in
    ``marked`` get rows but no marker."""
    store = LatentStore.create(root, fingerprint="vae", latent_shape=SHAPE, teacher_width=2, chunk_rows=chunk_rows,
                               provenance={"num_classes": 1000, "split": "train"})
    for i, e in enumerate(store.plan_shards(list(shards))):
        ids = np.arange(e["row_start"], e["row_start"] + e["count"])
        full = np.broadcast_to(ids[:, None, None, None], (len(ids), *SHAPE)).astype(np.float16)
        rows = {"mean": full, "mean_flip": -full, "std": np.full_like(full, std), "std_flip": np.full_like(full, std),
                "labels": ids.astype(np.int32), "keys": np.array([str(x) for x in ids], dtype=object),
                "teacher_global": np.zeros((len(ids), 2), np.float16)}
        store.write_rows(e["row_start"], rows)
        if i in marked:
            store.write_marker({"shard": e["name"], "row_start": e["row_start"], "count": e["count"],
                                "vae_fingerprint": "vae", "arrays": store.array_names,
                                "checksum": rows_checksum(rows)})
    return store


def served(loader, epoch=0):
    loader.set_epoch(epoch)
    labels, latents = [], []
    for z, y in loader:
        labels.append(y)
        latents.append(z)
    return torch.cat(labels).numpy(), torch.cat(latents)


@pytest.fixture
def store_url(tmp_path):
    build_store(str(tmp_path / "store"))
    return str(tmp_path / "store")


def test_every_done_row_once_per_epoch_across_ranks(store_url):
    done = LatentStore.open(store_url).done_rows()
    expected = np.flatnonzero(done)
    for epoch in (0, 1):
        ranks = [LatentLoader(store_url, batch_size=5, rank=r, world_size=2, drop_last=False, shuffle_buffer=8,
                              flip=False, sample_posterior=False) for r in range(2)]
        got = [served(loader, epoch)[0] for loader in ranks]
        assert sorted(np.concatenate(got).tolist()) == expected.tolist()
        assert len(set(got[0]) & set(got[1])) == 0
    # drop_last: equal batch counts on both ranks (DDP needs it), no row twice, only full batches
    ranks = [LatentLoader(store_url, batch_size=5, rank=r, world_size=2, shuffle_buffer=8) for r in range(2)]
    got = [served(loader, 3)[0] for loader in ranks]
    assert len(ranks[0]) == len(ranks[1]) == (len(expected) // 2) // 5
    assert [len(g) for g in got] == [len(ranks[0]) * 5] * 2
    assert len(set(got[0]) | set(got[1])) == 2 * len(ranks[0]) * 5


def test_shapes_dtypes_and_metadata(store_url):
    loader = LatentLoader(store_url, batch_size=4)
    z, y = next(iter(loader))
    assert z.shape == (4, *SHAPE) and z.dtype == torch.float32 and y.dtype == torch.int64
    assert loader.latent_shape == SHAPE and loader.num_classes == 1000
    assert loader.rows_done == loader.rows_total == 44 and loader.attrs["vae_fingerprint"] == "vae"


def test_rows_without_marker_are_never_served(tmp_path):
    url = str(tmp_path / "store")
    build_store(url, marked=(0, 2))
    with pytest.warns(MissingRowsWarning, match="13 of 44 rows"):
        loader = LatentLoader(url, batch_size=3, drop_last=False)
    labels, _ = served(loader)
    unmarked = set(range(24, 24 + 13))  # s-1 holds rows 24..36
    assert not unmarked & set(labels.tolist())
    assert sorted(labels.tolist()) == list(range(20)) + list(range(40, 51))
    assert loader.rows_done == 31 and loader.rows_total == 44


def test_flips_and_posterior_sampling(tmp_path):
    url = str(tmp_path / "store")
    build_store(url, std=1.0)
    plain = LatentLoader(url, batch_size=4, drop_last=False, flip=False, sample_posterior=False)
    labels, z = served(plain)
    assert torch.equal(z[:, 0, 0, 0], torch.from_numpy(labels).float())  # z == mean exactly
    flipping = LatentLoader(url, batch_size=4, drop_last=False, flip=True, sample_posterior=False)
    labels, z = served(flipping)
    sign = torch.sign(z[:, 0, 0, 0])[labels > 0]
    assert (sign > 0).any() and (sign < 0).any()  # both the image and its flip get served
    assert torch.equal(z[:, 0, 0, 0].abs(), torch.from_numpy(labels).float())
    sampling = LatentLoader(url, batch_size=4, drop_last=False, flip=False, sample_posterior=True)
    by_epoch = []
    for epoch in (0, 1):
        labels, z = served(sampling, epoch)
        by_epoch.append(z[np.argsort(labels)])
        noise = z - torch.from_numpy(labels).float()[:, None, None, None]
        assert 0.7 < noise.std().item() < 1.3  # std 1 posterior
    assert not torch.allclose(by_epoch[0], by_epoch[1])


def test_deterministic_given_seed_epoch_rank(store_url):
    def run(seed, epoch, in_memory):
        loader = LatentLoader(store_url, batch_size=4, rank=1, world_size=2, seed=seed, shuffle_buffer=8,
                              in_memory=in_memory)
        return served(loader, epoch)

    a, b = run(0, 2, True), run(0, 2, False)
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1])  # RAM and chunk reads agree
    c = run(0, 3, True)
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[0], run(1, 2, True)[0])


def test_in_memory_auto_follows_the_limit(store_url):
    assert LatentLoader(store_url, batch_size=4).in_memory
    assert not LatentLoader(store_url, batch_size=4, memory_limit=100).in_memory


def test_reads_from_s3_and_stops_early(s3_bucket):
    url = f"{s3_bucket}/latents"
    build_store(url)
    loader = LatentLoader(url, batch_size=4, in_memory=False, drop_last=False, prefetch=1)
    labels, _ = served(loader)
    assert sorted(labels.tolist()) == list(range(20)) + list(range(24, 37)) + list(range(40, 51))
    for i, _ in enumerate(loader):  # leaving early stops the prefetch thread
        if i == 1:
            break
    assert len(list(loader)) == len(loader)


# ----------------------------------------------------------------- LatentDataset (torch DataLoader)


def dataset_epoch(url, rank, world_size, num_workers, epoch=0, **kw):
    """Labels and first latent values one rank's DataLoader serves in ``epoch``."""
    from torch.utils.data import DataLoader

    data = LatentDataset(url, rank=rank, world_size=world_size, flip=False, sample_posterior=False, **kw)
    data.set_epoch(epoch)
    labels, values = [], []
    for z, y in DataLoader(data, batch_size=4, num_workers=num_workers):
        assert z.shape[1:] == SHAPE and z.dtype == torch.float32 and y.dtype == torch.int64
        labels.append(y)
        values.append(z[:, 0, 0, 0])
    return torch.cat(labels).numpy(), torch.cat(values), len(data)


@pytest.mark.parametrize("where, num_workers", [("local", 0), ("local", 2), ("s3", 2)])
def test_dataset_ranks_and_workers_cover_the_done_rows_once(where, num_workers, tmp_path, request):
    url = str(tmp_path / "latents") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/latents"
    with pytest.warns(MissingRowsWarning):
        build_store(url, marked=(0, 2))
        expected = np.flatnonzero(LatentStore.open(url).done_rows())
    orders = []
    for epoch in (0, 1) if where == "local" else (0,):  # S3 (workers open their own clients): one epoch
        with pytest.warns(MissingRowsWarning):
            served = [dataset_epoch(url, r, 2, num_workers, epoch, shuffle_buffer=8) for r in range(2)]
        labels = [s[0] for s in served]
        assert sorted(np.concatenate(labels).tolist()) == expected.tolist()  # each done row once, no other
        assert not set(labels[0]) & set(labels[1])
        assert [len(x) for x in labels] == [s[2] for s in served]  # len() is the rank's share
        for lab, values, _ in served:  # rows hold their own number: the latent is the row's
            assert torch.equal(values, torch.from_numpy(lab).float())
        orders.append(np.concatenate(labels))
    if where == "s3":
        return
    assert not np.array_equal(orders[0], orders[1])  # set_epoch reshuffles
    with pytest.warns(MissingRowsWarning):
        again = np.concatenate([dataset_epoch(url, r, 2, num_workers, 1, shuffle_buffer=8)[0] for r in range(2)])
    assert np.array_equal(again, orders[1])  # ... deterministically


def test_dataset_per_sample_defaults_and_pickling(store_url):
    import pickle

    from torch.utils.data import DataLoader

    data = LatentDataset(store_url, seed=3)
    assert (data.latent_shape, data.num_classes, len(data)) == (SHAPE, 1000, 44)
    samples = list(DataLoader(data, batch_size=None))  # per-sample, as the DataLoader(..., batch_size=None)
    z = torch.stack([s[0] for s in samples])
    labels = torch.tensor([s[1] for s in samples])
    assert sorted(labels.tolist()) == list(range(20)) + list(range(24, 37)) + list(range(40, 51))
    signs = torch.sign(z.mean(dim=(1, 2, 3)))[labels > 2]
    assert (signs > 0).any() and (signs < 0).any()  # flips by default (mean_flip = -row here)
    again = pickle.loads(pickle.dumps(data))  # a spawned worker gets a pickled copy
    assert sorted(int(y) for _, y in again) == sorted(labels.tolist())
