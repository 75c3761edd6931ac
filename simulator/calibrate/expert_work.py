"""One GPU's local expert work after dispatch, runnable on any torch device: the thing calibration times.

Given the (token, local expert, weight) assignments a GPU received, a backend sorts them by expert, gathers
the hidden states, runs the two expert GEMMs with the activation between them, weights the outputs and adds
them back per token. Backends:
- torch-grouped-mm: torch's grouped GEMM (torch.nn.functional.grouped_mm, else torch._grouped_mm), the kernel
  transformers' grouped_mm experts run;
- transformers: the transformers experts module itself (OlmoeExperts, the same layout as Mixtral's and
  Qwen-MoE's), with its experts implementation (grouped_mm by default);
- vllm-fused-moe / sglang-fused-moe: the engines' fused MoE Triton kernel, where the package imports.
Nothing here waits on the GPU, so a timer can queue many items back to back.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from traces.errors import InputError


@dataclass(frozen=True)
class ExpertShape:
    name: str
    hidden_size: int
    ffn_size: int
    activation: str  # swiglu or mlp


@dataclass
class Assignments:
    """A GPU's received work on the device: expert [a], token [a], weight [a], hidden states [tokens, h]."""

    expert: torch.Tensor
    token: torch.Tensor
    weight: torch.Tensor
    hidden: torch.Tensor
    counts: np.ndarray  # [local experts] on the host, for the model's features


def assignments_from_counts(counts: np.ndarray, hidden: int, device: torch.device, rng: np.random.Generator,
                            top_k: int = 1) -> Assignments:
    """Assignments with these per-expert counts; tokens drawn so that each token holds up to top_k of them."""
    counts = np.asarray(counts, dtype=np.int64)
    expert = np.repeat(np.arange(counts.size), counts)
    a = int(expert.size)
    tokens = max(1, -(-a // max(top_k, 1)))
    token = rng.permutation(np.arange(a) % tokens)
    return to_device(expert, token, rng.random(a).astype(np.float32), tokens, hidden, device, counts)


def to_device(expert: np.ndarray, token: np.ndarray, weight: np.ndarray, tokens: int, hidden: int,
              device: torch.device, counts: np.ndarray, states: torch.Tensor | None = None) -> Assignments:
    """Assignments on the device; hidden states drawn there (seeded), or the first `tokens` rows of
    `states`."""
    if states is None:
        gen = torch.Generator(device=device).manual_seed(int(expert.size))
        h = (torch.randn(tokens, hidden, generator=gen, device=device) * 0.5).to(torch.bfloat16)
    else:
        h = states[:tokens]
    return Assignments(torch.as_tensor(expert, device=device), torch.as_tensor(token, device=device),
                       torch.as_tensor(weight, device=device, dtype=torch.bfloat16), h, counts)


def _grouped_mm() -> Callable[..., torch.Tensor]:
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        raise InputError(f"torch {torch.__version__} has no grouped GEMM (torch.nn.functional.grouped_mm or "
                         "torch._grouped_mm); use torch 2.8 or newer")
    return fn


class TorchGroupedMM:
    """Sort, gather, grouped GEMM up (gate and up), activation, grouped GEMM down, weight, scatter-add."""

    name = "torch-grouped-mm"

    def __init__(self, shape: ExpertShape, num_experts: int, device: torch.device, seed: int = 0):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        up_rows = 2 * shape.ffn_size if shape.activation == "swiglu" else shape.ffn_size
        std = shape.hidden_size ** -0.5
        # [E, N, K] contiguous, passed transposed: the K-major layout the grouped GEMM wants for its second
        # operand
        self.w_up = (torch.randn(num_experts, up_rows, shape.hidden_size, generator=gen) * std).to(device,
                                                                                                    torch.bfloat16)
        self.w_down = (torch.randn(num_experts, shape.hidden_size, shape.ffn_size, generator=gen)
                       * shape.ffn_size ** -0.5).to(device, torch.bfloat16)
        self.shape = shape
        self.num_experts = num_experts
        self.mm = _grouped_mm()

    def offsets(self, expert_sorted: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=expert_sorted.device)
        counts.scatter_add_(0, expert_sorted.to(torch.int64),
                            torch.ones_like(expert_sorted, dtype=torch.int32))
        return torch.cumsum(counts, 0, dtype=torch.int32)

    def up(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return self.mm(x, self.w_up.transpose(-2, -1), offs=offs)

    def down(self, h: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return self.mm(h, self.w_down.transpose(-2, -1), offs=offs)

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        if self.shape.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h)

    def gemms(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return self.down(self.activation(self.up(x, offs)), offs)

    def run(self, work: Assignments) -> torch.Tensor:
        return self._pipeline(work, self.up, self.down)

    def _pipeline(self, work: Assignments, up: Callable[..., torch.Tensor],
                  down: Callable[..., torch.Tensor]) -> torch.Tensor:
        expert_sorted, order = torch.sort(work.expert, stable=True)
        token = work.token[order]
        offs = self.offsets(expert_sorted)
        y = down(self.activation(up(work.hidden[token], offs)), offs)
        out = torch.zeros_like(work.hidden)
        out.index_add_(0, token, y * work.weight[order, None])
        return out

    def gemms_only(self, work: Assignments) -> Callable[[], object]:
        """The two GEMMs alone on pre-sorted rows (what the table measures)."""
        expert_sorted, order = torch.sort(work.expert, stable=True)
        x = work.hidden[work.token[order]].contiguous()
        offs = self.offsets(expert_sorted)
        return lambda: self.gemms(x, offs)

    def with_experts(self, n: int) -> TorchGroupedMM:
        """This backend holding only its first n experts (views of the same weights). A GPU with n local
        experts runs a grouped GEMM of n groups, and empty groups are not free for its scheduler: timed with 8
        groups of which 7 are empty, one Mixtral expert's GEMMs ran from 22% faster to 53% slower than as one
        group (16 to 1,024 rows on the H200, bench_gemm_rows)."""
        if n >= self.num_experts:
            return self
        other = copy.copy(self)
        other.w_up, other.w_down, other.num_experts = self.w_up[:n], self.w_down[:n], n
        return other


class TransformersExperts(TorchGroupedMM):
    """transformers' own experts module; each assignment is one row with top-k 1 (the EP receive side)."""

    name = "transformers"

    def __init__(self, shape: ExpertShape, num_experts: int, device: torch.device, seed: int = 0,
                 implementation: str = "grouped_mm"):
        super().__init__(shape, num_experts, device, seed)
        if shape.activation != "swiglu":
            raise InputError("backend transformers: only gated (SwiGLU) experts have a transformers module "
                             "here")
        try:
            from transformers import OlmoeConfig
            from transformers.models.olmoe.modeling_olmoe import OlmoeExperts
        except ImportError as exc:
            raise InputError(f"backend transformers: cannot import OlmoeExperts ({exc})") from exc
        config = OlmoeConfig(hidden_size=shape.hidden_size, intermediate_size=shape.ffn_size,
                             num_experts=num_experts, num_experts_per_tok=1)
        config._experts_implementation = implementation
        self.module = OlmoeExperts(config).to(device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            self.module.gate_up_proj.copy_(self.w_up)
            self.module.down_proj.copy_(self.w_down)
        self.implementation = implementation

    def with_experts(self, n: int) -> TorchGroupedMM:
        return self  # transformers' module always holds (and loops over) all of a layer's experts

    @torch.no_grad()
    def run(self, work: Assignments) -> torch.Tensor:
        y = self.module(work.hidden[work.token], work.expert[:, None], work.weight[:, None])
        out = torch.zeros_like(work.hidden)
        return out.index_add_(0, work.token, y)


class FusedMoE(TorchGroupedMM):
    """vLLM's or SGLang's fused_experts Triton kernel (per-token top-k layout: one row per assignment)."""

    def __init__(self, shape: ExpertShape, num_experts: int, device: torch.device, seed: int = 0,
                 engine: str = "vllm"):
        super().__init__(shape, num_experts, device, seed)
        self.name = f"{engine}-fused-moe"
        try:
            if engine == "vllm":
                from vllm.model_executor.layers.fused_moe import fused_experts
            else:
                from sglang.srt.layers.moe.fused_moe_triton import fused_experts
        except Exception as exc:  # an engine that is absent or fails to import for its own reasons
            raise InputError(f"backend {self.name}: {engine} is not importable here "
                             f"({str(exc).splitlines()[0]})") \
                from exc
        self.fused = fused_experts

    @torch.no_grad()
    def run(self, work: Assignments) -> torch.Tensor:
        ids = work.expert[:, None].to(torch.int32)
        y = self.fused(work.hidden[work.token], self.w_up, self.w_down, work.weight[:, None].float(), ids)
        out = torch.zeros_like(work.hidden)
        return out.index_add_(0, work.token, y)


def make_backend(name: str, shape: ExpertShape, num_experts: int, device: torch.device) -> TorchGroupedMM:
    if name == "torch-grouped-mm":
        return TorchGroupedMM(shape, num_experts, device)
    if name == "transformers":
        return TransformersExperts(shape, num_experts, device)
    if name in ("vllm-fused-moe", "sglang-fused-moe"):
        return FusedMoE(shape, num_experts, device, engine=name.split("-")[0])
    raise InputError(f"--backend: unknown backend {name!r}")


def reference_output(backend: TorchGroupedMM, work: Assignments) -> torch.Tensor:
    """A plain per-expert loop in float32: what every backend must compute (tests compare against it)."""
    out = torch.zeros(work.hidden.shape, dtype=torch.float32, device=work.hidden.device)
    for e in range(backend.num_experts):
        sel = torch.nonzero(work.expert == e).flatten()
        if sel.numel() == 0:
            continue
        x = work.hidden[work.token[sel]].float()
        h = x @ backend.w_up[e].float().T
        if backend.shape.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        y = h @ backend.w_down[e].float().T
        out.index_add_(0, work.token[sel], y * work.weight[sel, None].float())
    return out
