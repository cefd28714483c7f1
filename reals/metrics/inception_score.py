"""Inception Score as the ADM evaluator computes it: ``exp(E_x KL(p(y|x) || p(y)))`` per split, averaged."""
from __future__ import annotations

import numpy as np
from scipy.special import rel_entr, softmax

from reals import ReaLSError


def class_probabilities(logits_or_probs: np.ndarray, from_logits: bool | None = None) -> np.ndarray:
    """Rows of class probabilities; logits go through a softmax (``from_logits=None`` decides by the values)."""
    x = np.asarray(logits_or_probs, dtype=np.float64)
    if x.ndim != 2:
        raise ReaLSError(f"Inception Score: expected [N, classes] logits or probabilities, got shape {x.shape}")
    if from_logits is None:
        from_logits = not (x.min() >= 0 and np.allclose(x.sum(axis=1), 1.0, atol=1e-3))
    return softmax(x, axis=1) if from_logits else x


def inception_score(logits_or_probs: np.ndarray, split_size: int = 5000, from_logits: bool | None = None) -> float:
    """Mean over consecutive splits of ``split_size`` rows of ``exp(mean KL(p(y|x) || mean p(y)))``."""
    probs = class_probabilities(logits_or_probs, from_logits)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        scores.append(np.exp(rel_entr(part, marginal).sum(axis=1).mean()))
    return float(np.mean(scores))
