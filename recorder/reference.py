"""Plain NumPy routing, written from the model papers' definitions, to check recorded routing against.

It shares no code with the models or the recorder: tests feed it the hidden states that reached each router
and the router's weights, and compare its top-k ids and weights with what the recorder wrote.
"""

from __future__ import annotations

import numpy as np


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries per row, largest first. [T, E] -> [T, K]"""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def reference_routing(
    hidden: np.ndarray,
    weight: np.ndarray,
    top_k: int,
    *,
    scoring: str = "softmax",
    norm_topk_prob: bool = False,
    bias: np.ndarray | None = None,
    correction_bias: np.ndarray | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    scaling: float = 1.0,
    softmax_over_top_k: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k expert ids and the weights the experts are scaled by. hidden [T, H], weight [E, H] -> [T, K]
    each.

    softmax: probabilities over all experts, the k largest, optionally renormalised (OLMoE, Mixtral,
    Qwen-MoE). sigmoid: DeepSeek-V3: choose with sigmoid + correction bias inside the best `topk_group` of
    `n_group` groups
             (group score = sum of its two best), weigh with the plain sigmoid, optionally renormalise, then
             scale.
    softmax_over_top_k: GPT-OSS: the k largest logits, then a softmax over those k.
    """
    logits = hidden.astype(np.float64) @ weight.astype(np.float64).T
    if bias is not None:
        logits = logits + bias
    if softmax_over_top_k:
        ids = _top_k(logits, top_k)
        return ids, _softmax(np.take_along_axis(logits, ids, -1))
    if scoring == "softmax":
        probs = _softmax(logits)
        ids = _top_k(probs, top_k)
        weights = np.take_along_axis(probs, ids, -1)
    else:
        scores = 1.0 / (1.0 + np.exp(-logits))
        choice = scores + (correction_bias if correction_bias is not None else 0.0)
        t, e = choice.shape
        grouped = choice.reshape(t, n_group, e // n_group)
        group_score = np.sort(grouped, axis=-1)[:, :, -2:].sum(-1)
        keep = _top_k(group_score, topk_group)
        mask = np.zeros((t, n_group), dtype=bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        choice = np.where(np.repeat(mask, e // n_group, axis=1), choice, -np.inf)
        ids = _top_k(choice, top_k)
        weights = np.take_along_axis(scores, ids, -1)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return ids, weights * scaling
