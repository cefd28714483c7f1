"""Benchmark the controlled experiment (``reals experiment``): wall time per phase and the headline differences.

Runs the same code as the CLI (``flows.experiment.run``) on a preset (``--quick`` by default, ``--default``
for the ~60-minute run, or ``--config FILE``) and prints one JSON document: wall seconds in all and per phase,
the load average around the run (other work on the machine slows every phase), steps run and reused, the
evaluator's held-out accuracy, each arm's metric means and stds, and the paired differences (ReaLS - VAE).
A re-run on the same ``--output`` reuses the finished steps, so time a fresh folder.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from flows.experiment import run
from pipelines.experiment import load_experiment_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--default", action="store_true", help="the default (~60 min) preset instead of --quick")
    which.add_argument("--config", help="experiment YAML")
    p.add_argument("--output", default="runs/bench-experiment", help="experiment folder (default runs/bench-experiment)")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    config = load_experiment_config(args.config, quick=not (args.default or args.config), output=args.output,
                                    show_progress=False)
    load_before = os.getloadavg()
    start = time.perf_counter()
    summary = run(config)
    wall = time.perf_counter() - start
    results = json.loads(open(summary.results).read())
    print(json.dumps({
        "preset": args.config or ("default" if args.default else "quick"),
        "output": summary.output, "cpus": os.cpu_count(), "seeds": summary.seeds,
        "wall_seconds": round(wall, 1), "phase_seconds": summary.phase_seconds,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "steps_run": summary.steps_run, "steps_reused": summary.steps_reused,
        "evaluator_val_accuracy": summary.evaluator_val_accuracy,
        "arms": {arm: {k: {"mean": round(v["mean"], 4), "std": round(v["std"], 4)} for k, v in a["metrics"].items()}
                 for arm, a in results["arms"].items()},
        "paired_reals_minus_vae": {k: {"mean": round(v["mean"], 4), "std": round(v["std"], 4),
                                       "reals_better_in": f"{v['reals_better_in']} of {v['of']}"}
                                   for k, v in summary.paired.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
