"""The numbers each feature space gives: ADM's FID / sFID / IS / Precision / Recall in Inception space,
``FD_<space>`` / ``Precision_<space>`` / ``Recall_<space>`` in a teacher space."""
from __future__ import annotations

import numpy as np

from reals.metrics.frechet import activation_statistics, frechet_distance, frechet_distance_from_activations
from reals.metrics.inception_score import inception_score
from reals.metrics.precision_recall import precision_recall


def _frechet(ref: np.ndarray, sample: np.ndarray, stats: tuple | None) -> tuple[float, str]:
    """FD of the samples to the reference's precomputed ``(mu, sigma)`` if given, else to its activations."""
    if stats is None:
        return frechet_distance_from_activations(sample, ref), "computed"
    return frechet_distance(*activation_statistics(sample), *stats), "precomputed"


def space_metrics(space: str, ref: dict[str, np.ndarray], sample: dict[str, np.ndarray],
                  ref_stats: dict[str, np.ndarray] | None = None, k: int = 3, split_size: int = 5000,
                  device: str = "cpu") -> list[dict]:
    """Metric records ``{metric, value, activations[, reference_statistics]}`` from reference and sample activations.

    ``ref_stats`` (ADM keys ``mu``/``sigma``/``mu_s``/``sigma_s``) replace the reference's own Inception
    statistics when given, as the ADM evaluator does with published reference batches.
    """
    ref_stats = ref_stats or {}
    if space == "inception":
        pool = (ref_stats["mu"], ref_stats["sigma"]) if "mu" in ref_stats else None
        spatial = (ref_stats["mu_s"], ref_stats["sigma_s"]) if "mu_s" in ref_stats else None
        fid, fid_src = _frechet(ref["pool"], sample["pool"], pool)
        sfid, sfid_src = _frechet(ref["spatial"], sample["spatial"], spatial)
        prec, rec = precision_recall(ref["pool"], sample["pool"], k=k, device=device)
        return [
            {"metric": "FID", "value": fid, "activations": "pool_3", "reference_statistics": fid_src},
            {"metric": "sFID", "value": sfid, "activations": "mixed_6/conv[:7]", "reference_statistics": sfid_src},
            {"metric": "IS", "value": inception_score(sample["logits"], split_size, from_logits=True),
             "activations": "logits"},
            {"metric": "Precision", "value": prec, "activations": "pool_3"},
            {"metric": "Recall", "value": rec, "activations": "pool_3"},
        ]
    fd, _ = _frechet(ref["global"], sample["global"], None)
    prec, rec = precision_recall(ref["global"], sample["global"], k=k, device=device)
    return [
        {"metric": f"FD_{space}", "value": fd, "activations": "global"},
        {"metric": f"Precision_{space}", "value": prec, "activations": "global"},
        {"metric": f"Recall_{space}", "value": rec, "activations": "global"},
    ]
