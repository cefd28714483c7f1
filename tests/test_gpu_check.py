"""``make gpu-check`` (bench/gpu.py) runs its whole code path at tiny sizes on the CPU and prints one JSON document."""
from __future__ import annotations

import json
import time

import pytest
import torch

from bench import gpu


def test_tiny_run_prints_one_document_with_every_part(capsys):
    assert gpu.main(["--tiny"]) == 0
    doc = json.loads(capsys.readouterr().out)  # the whole of stdout is one JSON document
    parts = doc["parts"]
    assert list(parts) == [f"train {c['model']}" for c in gpu.TINY["train"]] + ["encode", "sample"]
    for case in gpu.TINY["train"]:
        train = parts[f"train {case['model']}"]
        assert "error" not in train and train["batch"] == case["batch"]
        rates = train["steps_per_s"]
        assert set(rates) == {"in_memory_tensors", "store_ram", "store_stream"} and min(rates.values()) > 0
        assert train["ratios"]["store_stream_vs_in_memory"] == pytest.approx(
            rates["store_stream"] / rates["in_memory_tensors"], abs=2e-3)
        assert all(n >= 1 for n in train["steps_timed"].values())
    encode, sizes = parts["encode"], gpu.TINY["encode"]
    assert "error" not in encode and encode["images"] == sizes["shards"] * sizes["per_shard"]
    assert encode["images_per_s"]["bare_forward"] > 0 and encode["images_per_s"]["store_in_process"] > 0
    sample = parts["sample"]
    assert "error" not in sample and sample["samples"] == gpu.TINY["sample"]["batches"] * sample["batch"]
    assert 0 < sample["ratios"]["worker_vs_bare_forward"] <= 1  # the worker's time includes the model's
    assert sample["samples_per_s"]["worker"] <= sample["samples_per_s"]["bare_forward"]
    cuda = torch.cuda.is_available()
    assert all((p["peak_gpu_gib"] is not None) == cuda for p in parts.values())  # no GPU figure without a GPU


def test_a_part_past_the_budget_is_skipped_and_a_failing_part_is_recorded():
    results: dict = {}
    with gpu.part(results, "late", deadline=time.perf_counter() - 1) as out:
        assert out is None
    with gpu.part(results, "broken", deadline=time.perf_counter() + 60) as out:
        raise RuntimeError("no kernel image")
    assert results["late"] == {"skipped": "time budget spent"}
    assert results["broken"]["error"] == "RuntimeError: no kernel image" and "seconds" in results["broken"]


def test_out_of_memory_halves_the_batch_until_it_fits():
    tried = []

    def measure(batch):
        tried.append(batch)
        if batch > 16:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"batch": batch}

    assert gpu.halving_batch(measure, 64) == ({"batch": 16}, 16)
    assert tried == [64, 32, 16]
    with pytest.raises(torch.OutOfMemoryError):
        gpu.halving_batch(lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")), 2)
