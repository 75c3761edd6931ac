"""Will the model fit? Its memory, estimated from its config and dtype before any weight exists, against the
free memory of the device it will load on. A model too large for the host would otherwise be killed by the OS
minutes into loading, with no message at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from traces.errors import InputError
from traces.units import nbytes

# The weights plus this share for what recording adds on top: activations of a batch, the KV cache, allocator
# slack. A margin rather than a model of them, so that a refusal is never wrong by more than a tenth.
RUNTIME_OVERHEAD = 0.10
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class MemoryEstimate:
    """What a model needs in one dtype: parameters (and buffers) x bytes per element, plus
    RUNTIME_OVERHEAD."""

    parameters: int  # parameters and buffers, each shared tensor counted once
    dtype: torch.dtype

    @property
    def weight_bytes(self) -> int:
        return self.parameters * torch.empty((), dtype=self.dtype).element_size()

    @property
    def needed_bytes(self) -> int:
        return int(self.weight_bytes * (1.0 + RUNTIME_OVERHEAD))

    def in_dtype(self, dtype: torch.dtype) -> MemoryEstimate:
        return MemoryEstimate(self.parameters, dtype)


def count_parameters(config: Any, *, trust_remote_code: bool = False) -> int:
    """Parameters and buffers of the model `config` describes, built on the meta device (no memory, no
    weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


def free_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can use on `device`: free GPU memory, or the host's MemAvailable (page cache
    that can be dropped counts as free). None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_fits(model_id: str, estimate: MemoryEstimate, device: torch.device, free: int | None) -> None:
    """Refuse, in one line with the estimate and the ways out, a model that cannot fit in `free` bytes."""
    if free is None or estimate.needed_bytes <= free:
        return
    name = DTYPE_NAMES.get(estimate.dtype, str(estimate.dtype))
    ways = []
    if estimate.dtype.itemsize > 2:
        half = estimate.in_dtype(torch.bfloat16)
        fits = "fits" if half.needed_bytes <= free else "still too large"
        ways.append(f"--dtype bf16 (about {nbytes(half.needed_bytes)}, {fits})")
    if device.type == "cpu" and torch.cuda.is_available():
        ways.append("--device cuda")
    ways += ["a machine with more memory", "a smaller model (e.g. olmoe-tiny)"]
    raise InputError(
        f"--model {model_id}: needs about {nbytes(estimate.needed_bytes)} in {name} "
        f"({estimate.parameters / 1e9:.2f} B parameters, {nbytes(estimate.weight_bytes)} of weights + "
        f"{RUNTIME_OVERHEAD:.0%}) but {device} has {nbytes(free)} free; use {', '.join(ways[:-1])} or "
        f"{ways[-1]}"
    )
