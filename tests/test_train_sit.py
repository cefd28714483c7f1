"""reals train-sit on tiny hand-built latent stores: learning, exact resume, shape checks, DDP, on-the-fly shards."""
from __future__ import annotations

import hashlib
import json
import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import StageError
from pipelines.checkpoints import load_checkpoint, read_log
from pipelines.cli import main
from pipelines.stages.train_sit import TrainDiTConfig, TrainSiTConfig, load_vae, run
from storage.latent_store import LatentStore

K = 4  # classes


def make_store(url, latents: np.ndarray, labels: np.ndarray, shard_size: int = 8, done=None, std: float = 0.1,
               vae_path: str | None = None, fingerprint: str = "tinyvae") -> str:
    """A latent store written through the LatentStore API: one source shard per ``shard_size`` rows, no flips.

    ``done`` lists the shards that get a done-marker (default: all); every row's posterior std is ``std``.
    """
    n, c, h, w = latents.shape
    provenance = {"num_classes": K, "classes": [f"n{k:08d}" for k in range(K)], "mean": [0.0] * c,
                  "std": [1.0] * c, "resolution": 32, **({"vae_path": vae_path} if vae_path else {})}
    store = LatentStore.create(url, fingerprint=fingerprint, latent_shape=(c, h, w), teacher_width=2,
                               chunk_rows=shard_size, flip=False, provenance=provenance)
    starts = list(range(0, n, shard_size))
    entries = store.plan_shards([(f"train-{i:06d}.tar", min(shard_size, n - s)) for i, s in enumerate(starts)])
    for i, (s, e) in enumerate(zip(starts, entries)):
        count, cap = e["count"], e["capacity"]

        def pad(a, fill=0):
            out = np.full((cap, *a.shape[1:]), fill, a.dtype)
            out[:count] = a
            return out

        z = latents[s:s + count].astype(np.float16)
        store.write_rows(e["row_start"], {
            "mean": pad(z), "std": pad(np.full_like(z, std)), "labels": pad(labels[s:s + count].astype(np.int32), -1),
            "keys": pad(np.array([f"k{s + j}" for j in range(count)], dtype=object), ""),
            "teacher_global": pad(np.zeros((count, 2), np.float16))})
        if done is None or i in done:
            store.write_marker({"shard": e["name"], "vae_fingerprint": fingerprint, "row_start": e["row_start"],
                                "count": count, "arrays": store.array_names})
    return url


def class_latents(n: int, shape=(4, 8, 8), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One fixed pattern per class plus a little noise: something a tiny model can learn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % K
    patterns = rng.standard_normal((K, *shape))
    return (patterns[labels] + 0.1 * rng.standard_normal((n, *shape))).astype(np.float32), labels


def config(data_path, output, **kw) -> TrainSiTConfig:
    base = dict(model="SiT-T/4", global_batch_size=8, log_every=1, ckpt_every=1000, sample_every=0,
                show_progress=False)
    cls = TrainDiTConfig if kw.get("model", "").startswith("DiT") else TrainSiTConfig
    return cls(data_path=str(data_path), output=str(output), **{**base, **kw})


@pytest.fixture(scope="module")
def store40(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("store40") / "store"), *class_latents(40))


# ---------------------------------------------------------------------------------------------------
# Learning and resuming
# ---------------------------------------------------------------------------------------------------

def test_tiny_sit_overfits_a_few_dozen_latents(tmp_path):
    store = make_store(str(tmp_path / "store"), *class_latents(32))
    summary = run(config(store, tmp_path / "run", global_batch_size=16, max_steps=150, lr=3e-3, log_every=10))
    losses = [e["loss"] for e in read_log(str(tmp_path / "run" / "log.jsonl"))]
    assert summary.steps == 150 and summary.epoch == 75 and len(losses) == 15
    assert losses[-1] < 0.4 * losses[0], losses
    assert summary.latent_shape == [4, 8, 8] and summary.num_classes == K and summary.source == "store"


@pytest.mark.parametrize("model", ["SiT-T/4", "DiT-T/4"])
def test_resume_reproduces_an_uninterrupted_run_exactly(store40, tmp_path, model):
    # 40 rows / 8 per step = 5 steps per epoch: the break falls mid-epoch and the run crosses an epoch.
    whole = run(config(store40, tmp_path / "whole", max_steps=8, ema_decay=0.5, model=model))
    first = run(config(store40, tmp_path / "split", max_steps=3, ema_decay=0.5, model=model))
    with pytest.raises(StageError, match="--resume"):
        run(config(store40, tmp_path / "split", max_steps=8, ema_decay=0.5, model=model))
    second = run(config(store40, tmp_path / "split", max_steps=8, ema_decay=0.5, resume=True, model=model))
    assert (first.steps, second.resumed_from, second.steps, second.epoch) == (3, 3, 8, 1)
    log_whole = read_log(str(tmp_path / "whole" / "log.jsonl"))
    log_split = read_log(str(tmp_path / "split" / "log.jsonl"))
    assert [e["step"] for e in log_split] == list(range(1, 9))
    assert [e["loss"] for e in log_split] == [e["loss"] for e in log_whole]
    assert [e["grad_norm"] for e in log_split] == [e["grad_norm"] for e in log_whole]
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(second.checkpoint)
    assert (a["epoch"], a["batch_in_epoch"]) == (b["epoch"], b["batch_in_epoch"]) == (1, 3)
    for name in ("model", "ema"):
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name])


def test_resume_with_the_sample_grid_on_is_exact(tiny_vae_dir, tmp_path):
    # The grid's VAE is loaded at start-up; loading must not move the RNG stream a resumed run continues.
    store = make_store(str(tmp_path / "store"), *class_latents(24), vae_path=tiny_vae_dir)
    kw = dict(max_steps=4, ema_decay=0.5, sample_every=2, ckpt_every=2)
    whole = run(config(store, tmp_path / "whole", **kw))
    run(config(store, tmp_path / "split", **{**kw, "max_steps": 2}))
    second = run(config(store, tmp_path / "split", resume=True, **kw))
    assert second.resumed_from == 2 and whole.grids.endswith("samples")
    log_whole, log_split = (read_log(str(tmp_path / r / "log.jsonl")) for r in ("whole", "split"))
    assert [e["loss"] for e in log_split] == [e["loss"] for e in log_whole]
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(second.checkpoint)
    for name in ("model", "ema"):
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name])
    grids = [(tmp_path / r / "samples" / "0000004.png").read_bytes() for r in ("whole", "split")]
    assert grids[0] == grids[1]


def test_checkpoints_and_log_on_s3(store40, s3_bucket):
    out = f"{s3_bucket}/runs/sit"
    run(config(store40, out, max_steps=2))
    again = run(config(store40, out, max_steps=3, resume=True))
    assert again.resumed_from == 2 and again.checkpoint == f"{out}/0000003.pt"
    assert [e["step"] for e in read_log(f"{out}/log.jsonl")] == [1, 2, 3]
    ckpt = load_checkpoint(again.checkpoint)
    assert ckpt["step"] == 3 and ckpt["args"]["model"] == "SiT-T/4" and ckpt["store"]["vae_fingerprint"] == "tinyvae"


# ---------------------------------------------------------------------------------------------------
# Refusals and partial stores
# ---------------------------------------------------------------------------------------------------

def test_model_that_does_not_fit_the_store_is_refused_with_both_shapes(store40, tmp_path):
    store6 = make_store(str(tmp_path / "s6"), *class_latents(16, shape=(4, 6, 6)))
    with pytest.raises(StageError, match=r"SiT-T/4 cannot take the store's latents 4x6x6.*patch_size 4"):
        run(config(store6, tmp_path / "a", max_steps=1))
    run(config(store40, tmp_path / "b", max_steps=1))
    store4 = make_store(str(tmp_path / "s4"), *class_latents(16, shape=(4, 4, 4)))
    with pytest.raises(StageError, match=r"takes latents 4x8x8, the store holds 4x4x4"):
        run(config(store4, tmp_path / "b", max_steps=2, resume=True))


def test_cli_prints_one_line_errors_and_a_summary(store40, tmp_path, capsys):
    assert main(["train-sit", "--data-path", store40, "--output", str(tmp_path / "r"), "--model", "SiT-T/4",
                 "--global-batch-size", "6", "--max-steps", "1", "--no-progress"]) == 0
    assert "train-sit: SiT-T/4" in capsys.readouterr().out
    assert main(["train-sit", "--data-path", store40, "--output", str(tmp_path / "r2"), "--model", "SiT-T/4",
                 "--global-batch-size", "64", "--max-steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fewer than one global batch of 64" in err
    assert main(["train-sit", "--data-path", str(tmp_path / "nothing"), "--output", str(tmp_path / "r3"),
                 "--max-steps", "1"]) == 2
    assert "no latent store" in capsys.readouterr().err


def test_store_still_being_written_trains_on_done_rows(tmp_path, capsys):
    store = make_store(str(tmp_path / "store"), *class_latents(24), done=(0, 2))
    summary = run(config(store, tmp_path / "run", max_steps=3))
    assert (summary.rows_done, summary.rows_total, summary.steps, summary.epoch) == (16, 24, 3, 1)
    assert "training on the 16 done rows of 24" in capsys.readouterr().out


def test_nan_loss_checkpoints_and_stops_naming_the_step(tmp_path):
    latents, labels = class_latents(16)
    latents[:] = np.nan
    store = make_store(str(tmp_path / "store"), latents, labels)
    with pytest.raises(StageError, match=r"non-finite loss at step 1 .*0000000\.pt"):
        run(config(store, tmp_path / "run", max_steps=4))
    assert sorted(p.name for p in (tmp_path / "run").glob("*.pt")) == ["0000000.pt"]
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 0


# ---------------------------------------------------------------------------------------------------
# Sample grids and the on-the-fly baseline
# ---------------------------------------------------------------------------------------------------

def test_sample_grid_decoded_by_the_stores_vae(tiny_store, tmp_path):
    summary = run(config(tiny_store.url, tmp_path / "run", max_steps=2, sample_every=2))
    with Image.open(tmp_path / "run" / "samples" / "0000002.png") as im:
        assert im.size == (8 * 32, 32)
    assert summary.grids.endswith("samples")
    missing = make_store(str(tmp_path / "store2"), *class_latents(16), vae_path=str(tmp_path / "gone"))
    assert run(config(missing, tmp_path / "run2", max_steps=1, sample_every=1)).grids.startswith("off")


def test_shards_encoded_on_the_fly(tiny_shards, tiny_vae_dir, tmp_path):
    with pytest.raises(StageError, match="--vae-path"):
        run(config(tiny_shards, tmp_path / "a", max_steps=1))
    summary = run(config(tiny_shards, tmp_path / "run", max_steps=3, vae_path=tiny_vae_dir, shuffle_buffer=8))
    assert (summary.source, summary.latent_shape, summary.num_classes) == ("shards", [4, 8, 8], 4)
    assert summary.rows_total == 48
    assert summary.steps == 3 and np.isfinite(summary.final_loss)
    assert load_checkpoint(summary.checkpoint)["store"]["vae_fingerprint"] == load_vae(tiny_vae_dir).fingerprint


# ---------------------------------------------------------------------------------------------------
# DDP: two CPU processes (gloo) launched as torchrun would, through environment variables
# ---------------------------------------------------------------------------------------------------

def _ddp_rank(rank: int, world: int, port: int, store: str, output: str, dump: str) -> None:
    """One rank: train as torchrun would start it, recording the rows it was fed and its final weights."""
    import pipelines.stages.train_sit as ts

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    seen: list[float] = []
    trainers: list = []
    batches, fit = ts.StoreSource.batches, ts.Trainer.fit

    def recording(self, epoch, skip=0):
        for z, y in batches(self, epoch, skip):
            seen.extend(z[:, 0, 0, 0].tolist())
            yield z, y

    def keeping(self):
        trainers.append(self)
        return fit(self)

    ts.StoreSource.batches, ts.Trainer.fit = recording, keeping
    summary = ts.run(config(store, output, max_steps=4, ckpt_every=2))
    weights = hashlib.sha256(b"".join(v.numpy().tobytes() for v in trainers[0].model.state_dict().values()))
    with open(f"{dump}.{rank}.json", "w") as f:
        json.dump({"rows": seen, "world": summary.world_size, "steps": summary.steps,
                   "weights": weights.hexdigest()}, f)


def test_ddp_two_cpu_processes_see_disjoint_rows(tmp_path):
    import torch.multiprocessing as mp

    ids = np.arange(32, dtype=np.float32) / 32  # row i's latent is the constant i / 32 (std 0: exact)
    latents = np.broadcast_to(ids[:, None, None, None], (32, 4, 8, 8)).copy()
    store = make_store(str(tmp_path / "store"), latents, np.arange(32) % K, std=0.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dump = str(tmp_path / "seen")
    mp.spawn(_ddp_rank, args=(2, port, store, str(tmp_path / "run"), dump), nprocs=2, join=True)
    r0, r1 = (json.load(open(f"{dump}.{r}.json")) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == 4
    assert r0["weights"] == r1["weights"]  # gradients were averaged across the ranks
    rows0, rows1 = {round(v * 32) for v in r0["rows"]}, {round(v * 32) for v in r1["rows"]}
    assert len(r0["rows"]) == len(r1["rows"]) == 16  # 4 steps x 4 rows per rank: one epoch
    assert rows0.isdisjoint(rows1) and rows0 | rows1 == set(range(32))
    ckpt = load_checkpoint(str(tmp_path / "run" / "0000004.pt"))
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert [e["step"] for e in read_log(str(tmp_path / "run" / "log.jsonl"))] == [1, 2, 3, 4]
