"""Router output conventions: 5.x 3-tuple (logits or probabilities first), older 2-tuple, 4.x nn.Linear
gates."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recorder import MoEProfiler
from recorder.builtin_models import build_builtin_model


class ProbabilitiesFirst(nn.Module):
    """transformers 5.0: (softmax probabilities [T, E], top-k weights, ids)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        logits, weights, ids = self.inner(x)
        return F.softmax(logits.float(), -1), weights, ids


class TwoTuple(nn.Module):
    """(dense scores [T, E], ids [T, K]); `scattered`: only the chosen weights are non-zero."""

    def __init__(self, inner: nn.Module, scattered: bool):
        super().__init__()
        self.inner, self.scattered = inner, scattered

    def forward(self, x):
        logits, weights, ids = self.inner(x)
        if self.scattered:
            return torch.zeros_like(logits).scatter(1, ids, weights), ids
        return F.softmax(logits.float(), -1), ids


def _two_tuple_block(self, hidden_states):
    b, s, h = hidden_states.shape
    flat = hidden_states.view(-1, h)
    scores, ids = self.gate(flat)
    weights = scores.gather(1, ids).to(flat.dtype)
    return self.experts(flat, ids, weights).reshape(b, s, h)


def _linear_gate_block(self, hidden_states):
    """transformers 4.x OLMoE: the gate is nn.Linear and the block does softmax + top-k."""
    b, s, h = hidden_states.shape
    flat = hidden_states.view(-1, h)
    probs = F.softmax(self.gate(flat), dim=1, dtype=torch.float)
    weights, ids = torch.topk(probs, 4, dim=-1)
    return self.experts(flat, ids, weights.to(flat.dtype)).reshape(b, s, h)


def _convert(model, kind: str) -> None:
    for layer in model.model.layers:
        block = layer.mlp
        if kind == "probabilities-first":
            block.gate = ProbabilitiesFirst(block.gate)
        elif kind in ("2-tuple-scattered", "2-tuple-probabilities"):
            block.gate = TwoTuple(block.gate, scattered=kind.endswith("scattered"))
            block.forward = types.MethodType(_two_tuple_block, block)
        elif kind == "linear":
            linear = nn.Linear(64, 16, bias=False)
            linear.weight = block.gate.weight
            block.gate = linear
            block.forward = types.MethodType(_linear_gate_block, block)


def _record(kind: str | None):
    model = build_builtin_model("olmoe-tiny", torch.device("cpu"), torch.float32)
    if kind:
        _convert(model, kind)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    prof = MoEProfiler(model, save_logits=True)
    with prof, torch.no_grad():
        logits = model(input_ids=ids).logits
    return prof, prof.trace(), logits


@pytest.mark.parametrize("kind,convention,first", [
    ("probabilities-first", "3-tuple", "probabilities"),
    ("2-tuple-scattered", "2-tuple", "probabilities"),
    ("2-tuple-probabilities", "2-tuple", "probabilities"),
    ("linear", "logits", "logits"),
])
def test_every_convention_records_the_same_routing(kind: str, convention: str, first: str) -> None:
    base_prof, base, base_logits = _record(None)
    prof, got, logits = _record(kind)
    assert base_prof.layout.convention == "3-tuple" and base_prof.layout.first_output == "logits"
    assert (prof.layout.convention, prof.layout.first_output) == (convention, first)
    assert prof.metadata().router_first_output == first
    torch.testing.assert_close(logits, base_logits)  # the conversion kept the model's arithmetic
    assert got.expert_ids is not None and base.expert_ids is not None
    np.testing.assert_array_equal(got.expert_ids, base.expert_ids)
    np.testing.assert_allclose(got.expert_weights, base.expert_weights, atol=1e-3)
