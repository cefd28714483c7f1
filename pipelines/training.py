"""The loop the training stages share: run state, resume, checkpoints, EMA, the log and the epoch loop.

A trainer subclasses ``TrainingLoop`` and supplies only its model-specific part, the step protocol:

- ``batches(epoch, skip)``: the epoch's batches for this rank after the first ``skip`` (the same batches on
  every run: a pure function of seed, epoch and rank, so that a resumed run skips what its checkpoint consumed);
- ``train_batch(batch) -> dict[str, float]``: one optimiser step on a batch (EMA update included); the values
  are averaged over each logging interval and over ranks into ``log.jsonl``;
- ``checkpoint_state() -> dict``: what a checkpoint holds besides the run state (models, EMA, optimisers, config);
- ``restore(ckpt)``: refuse a checkpoint that does not fit this run (a StageError naming both sides), else load it;
- optionally ``sample_grid() -> bytes | None`` (a PNG written every ``sample_every`` steps by rank 0),
  ``log_extras(steps, seconds) -> dict`` (more fields per log entry; by default steps/s, samples/s and the
  learning rate of ``self.opt``) and ``empty_epoch() -> str`` (the error
  when an epoch yields no batch).

The subclass builds its models, calls ``begin(seed, resume)`` once they exist (before wrapping them for DDP),
and runs ``train(label)``::

    class Trainer(TrainingLoop):
        def __init__(self, cfg, d):
            super().__init__(cfg.output, d, Schedule(cfg.max_steps, cfg.epochs, steps_per_epoch, cfg.log_every,
                                                     cfg.ckpt_every))
            self.model = ...; self.ema = ema_copy(self.model); self.opt = ...
            self.begin(cfg.seed * 1_000_003 + d.rank + 1, cfg.resume)

        def batches(self, epoch, skip): ...                  # e.g. LatentLoader.set_epoch + skip
        def train_batch(self, batch): ...; return {"loss": loss.item()}
        def checkpoint_state(self): return {"model": ..., "ema": ..., "opt": ..., "args": self.cfg.model_dump()}
        def restore(self, ckpt): check_resumable(self.output, ckpt["args"], self.cfg, KEYS); ...load_state_dict

The loop then owns the data position (step, epoch, batches consumed), the
``{step:07d}.pt`` checkpoints (plus ``step``, ``epoch``, ``batch_in_epoch``, every rank's RNG states and
``world_size``), the final checkpoint and the log. Resume is exact: the RNG states a checkpoint holds are restored
when the loop starts, after everything that draws from the global RNG at start-up (a sample-grid VAE, say)
is built.
"""
from __future__ import annotations

import copy
import datetime
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from pipelines import StageError
from pipelines import checkpoints
from pipelines.checkpoints import LOG, RunLog, checkpoint_name, checkpoint_to_resume, load_checkpoint, rng_state
from pipelines.distributed import Dist, all_gather, all_mean, all_true, barrier
from pipelines.parallel import progress_bar
from reals.ema import requires_grad
from storage.fs import join, to_url, write_bytes_atomic


LOGGER = logging.getLogger(__name__)  # a Prefect flow attaches its run log to ``pipelines``


def ema_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``model`` in eval mode: the EMA weights that ``reals.ema.update_ema`` moves."""
    ema = copy.deepcopy(model).eval()
    requires_grad(ema, False)
    return ema


@dataclass
class Schedule:
    """When a run stops, logs, checkpoints and draws grids."""

    max_steps: int | None
    max_epochs: int | None
    steps_per_epoch: int  # for the progress bar, and the epoch's length when ``exact_epochs``
    log_every: int
    ckpt_every: int
    sample_every: int = 0  # 0: never
    batch_size: int = 0  # samples per step over all ranks, for samples/s (0: not logged)
    exact_epochs: bool = False  # an epoch ends after steps_per_epoch batches (else when the data runs out)
    show_progress: bool = True


class TrainingLoop:
    """Run state and the epoch loop of one training run; subclasses supply the step protocol (module docstring)."""

    def __init__(self, output: str, d: Dist, schedule: Schedule):
        self.output, self.d, self.schedule = to_url(output), d, schedule
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.resumed_from: int | None = None
        self.last_checkpoint: str | None = None
        self.log: RunLog | None = None
        self.label, self.total_steps = "train", None
        self.final: dict[str, float] = {}
        self._rng: dict | None = None
        self._reset_interval()

    # -- the step protocol ----------------------------------------------------------------------------

    def batches(self, epoch: int, skip: int) -> Iterable:
        raise NotImplementedError

    def train_batch(self, batch) -> dict[str, float]:
        raise NotImplementedError

    def checkpoint_state(self) -> dict:
        raise NotImplementedError

    def restore(self, ckpt: dict) -> None:
        raise NotImplementedError

    def sample_grid(self) -> bytes | None:
        return None

    def log_extras(self, steps: int, seconds: float) -> dict:
        """Rates and the learning rate (of ``self.opt`` when the subclass has one) logged with the losses."""
        extras = {"steps_per_sec": steps / seconds}
        if self.schedule.batch_size:
            extras["samples_per_sec"] = steps * self.schedule.batch_size / seconds
        if getattr(self, "opt", None) is not None:
            extras["lr"] = self.opt.param_groups[0]["lr"]
        return extras

    def empty_epoch(self) -> str:
        return f"epoch {self.epoch} of {self.output} yields no batch"

    # -- start and resume -----------------------------------------------------------------------------

    def begin(self, seed: int, resume: bool) -> None:
        """Seed the RNGs, continue from the run folder's latest checkpoint (``resume`` required) and open the log."""
        checkpoints.seed_rngs(seed)
        latest = checkpoint_to_resume(self.output, resume, owner=self.d.main)
        barrier(self.d)  # rank 0 has removed stale temporary files before anyone writes
        if latest is not None:
            ckpt = load_checkpoint(latest)
            self.restore(ckpt)
            self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
            states = ckpt["rng"]
            self._rng = states[self.d.rank % len(states)]
            self.resumed_from, self.last_checkpoint = self.step, latest
        self.log = RunLog(join(self.output, LOG), self.step) if self.d.main else None

    def save_checkpoint(self) -> str:
        """``{step:07d}.pt`` (written by rank 0, with every rank's RNG state) and ``latest.json``; returns its URL."""
        states = all_gather(rng_state(), self.d)
        if self.d.main:
            checkpoints.save_checkpoint(self.output, self.step, {
                **self.checkpoint_state(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "rng": states, "world_size": self.d.world})
        barrier(self.d)
        self.last_checkpoint = join(self.output, checkpoint_name(self.step))
        return self.last_checkpoint

    def stop_unless_finite(self, finite: bool, detail: Callable[[], str], hint: str) -> None:
        """Unless ``finite`` on every rank: save the state before this step and stop, naming the step."""
        if not all_true(finite, self.d):
            where = self.save_checkpoint()
            raise StageError(f"non-finite loss at step {self.step + 1} ({detail()}); saved the state before it to "
                             f"{where}; {hint}")

    # -- the log --------------------------------------------------------------------------------------

    def _reset_interval(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.interval_steps = 0
        self.interval_start = time.perf_counter()

    def flush_log(self) -> None:
        """Append the interval means (averaged over ranks) to log.jsonl and start a new interval."""
        keys = sorted(self.sums)
        t = torch.tensor([self.sums[k] / self.counts[k] for k in keys], dtype=torch.float64, device=self.d.device)
        self.final = dict(zip(keys, all_mean(t, self.d).tolist()))
        seconds = time.perf_counter() - self.interval_start
        if self.d.main:
            extras = self.log_extras(self.interval_steps, seconds)
            self.log.append({"step": self.step, "epoch": self.epoch, "time": time.time(), **self.final, **extras})
            LOGGER.info(self.log_line(extras))
        self._reset_interval()

    def log_line(self, extras: dict) -> str:
        """``train-sit step 200/2000 | loss 0.412 | lr 0.0001 | 512 samples/s | ETA 0:03:10``: the interval for people."""
        parts = [f"{self.label} step {self.step}" + (f"/{self.total_steps}" if self.total_steps else ""),
                 " ".join(f"{k} {v:.4g}" for k, v in self.final.items())]
        if "lr" in extras:
            parts.append(f"lr {extras['lr']:.3g}")
        rate = extras["steps_per_sec"]
        parts.append(f"{extras['samples_per_sec']:.1f} samples/s" if "samples_per_sec" in extras
                     else f"{rate:.2f} steps/s")
        if self.total_steps and rate > 0:
            parts.append(f"ETA {datetime.timedelta(seconds=round((self.total_steps - self.step) / rate))}")
        return " | ".join(parts)

    # -- the loop -------------------------------------------------------------------------------------

    def done(self) -> bool:
        s = self.schedule
        return ((s.max_steps is not None and self.step >= s.max_steps)
                or (s.max_epochs is not None and self.epoch >= s.max_epochs))

    def _next_epoch(self) -> None:
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _after_step(self, stats: dict[str, float]) -> None:
        """Advance the data position; log, draw a grid and checkpoint when their intervals come."""
        s = self.schedule
        self.step += 1
        self.batch_in_epoch += 1
        if s.exact_epochs and self.batch_in_epoch == s.steps_per_epoch:
            self._next_epoch()
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.interval_steps += 1
        if self.step % s.log_every == 0:
            self.flush_log()
        if self.d.main and s.sample_every and self.step % s.sample_every == 0:
            grid = self.sample_grid()
            if grid is not None:
                write_bytes_atomic(join(self.output, "samples", f"{self.step:07d}.png"), grid)
        if self.step % s.ckpt_every == 0:
            self.save_checkpoint()

    def run_epoch(self, on_step: Callable[[], None]) -> None:
        """Train from the current data position until the epoch's data ends (next epoch) or the run is done."""
        skip = self.batch_in_epoch
        batches = iter(self.batches(self.epoch, skip))
        try:
            while not self.done():
                batch = next(batches, None)
                if not all_true(batch is not None, self.d):
                    if skip == 0 and self.batch_in_epoch == 0:
                        raise StageError(self.empty_epoch())
                    self._next_epoch()
                    return
                self._after_step(self.train_batch(batch))
                on_step()
                if self.batch_in_epoch == 0:
                    return
        finally:
            getattr(batches, "close", lambda: None)()  # a generator's files and workers

    def train(self, label: str) -> None:
        """Run epochs until done, then log the last interval and checkpoint the final step."""
        s = self.schedule
        if self._rng is not None:  # restored only now: building the run may have drawn from the global RNG
            checkpoints.set_rng_state(self._rng)
            self._rng = None
        self._reset_interval()
        totals = [t for t in (s.max_steps, s.max_epochs and s.max_epochs * s.steps_per_epoch) if t]
        self.label, self.total_steps = label, min(totals)
        with progress_bar(disable=not (s.show_progress and self.d.main)) as bar:
            task = bar.add_task(label, total=self.total_steps, completed=self.step)
            while not self.done():
                self.run_epoch(lambda: bar.advance(task))
        if self.interval_steps:
            self.flush_log()
        if self.last_checkpoint is None or not self.last_checkpoint.endswith(checkpoint_name(self.step)):
            self.save_checkpoint()
