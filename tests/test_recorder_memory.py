"""Memory is checked before loading: the estimate from the config, the refusal line, and the CPU default
dtype."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recorder import models
from recorder.builtin_models import build_builtin_model, builtin_config
from recorder.config import RecordConfig
from recorder.memory import RUNTIME_OVERHEAD, MemoryEstimate, check_fits, count_parameters, free_bytes
from recorder.models import resolve_dtype
from recorder.record import record
from traces import InputError

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "examples" / "prompts.txt"
GIB = 1 << 30


def test_parameter_count_from_the_config_alone() -> None:
    model = build_builtin_model("olmoe-tiny", torch.device("cpu"), torch.float32)
    built = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert count_parameters(builtin_config("olmoe-tiny")) == built
    # OLMoE-1B-7B by hand: per layer 64 SwiGLU experts (3 x 2048 x 1024), the router (2048 x 64), q/k/v/o
    # (4 x 2048^2), q/k norms and two layer norms (4 x 2048); untied embeddings and LM head (2 x 50304 x 2048)
    # and the final norm. Buffers (rotary frequencies) add a few hundred.
    per_layer = 64 * 3 * 2048 * 1024 + 2048 * 64 + 4 * 2048 * 2048 + 4 * 2048
    by_hand = 16 * per_layer + 2 * 50304 * 2048 + 2048
    assert by_hand == 6_919_161_856
    assert by_hand <= count_parameters(builtin_config("olmoe-1b-7b-random")) <= by_hand + 1024


def test_refusal_is_one_line_with_the_estimate_and_the_ways_out() -> None:
    estimate = MemoryEstimate(6_919_161_856, torch.float32)
    assert estimate.weight_bytes == 4 * 6_919_161_856
    assert estimate.needed_bytes == int(4 * 6_919_161_856 * (1 + RUNTIME_OVERHEAD))
    cpu = torch.device("cpu")
    check_fits("m", estimate, cpu, None)  # free memory unknown: nothing to refuse on
    check_fits("m", estimate, cpu, 29 * GIB)  # 28.4 GiB needed
    with pytest.raises(InputError) as info:
        check_fits("olmoe-1b-7b-random", estimate, cpu, 24 * GIB)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("--model olmoe-1b-7b-random: needs about 28.4 GiB in fp32 (6.92 B parameters")
    assert "but cpu has 24.0 GiB free" in message and "--dtype bf16 (about 14.2 GiB, fits)" in message
    assert message.endswith("or a smaller model (e.g. olmoe-tiny)")
    with pytest.raises(InputError, match=r"--dtype bf16 \(about 14.2 GiB, still too large\)"):
        check_fits("x", estimate, cpu, 8 * GIB)
    with pytest.raises(InputError) as info:
        check_fits("x", estimate.in_dtype(torch.bfloat16), cpu, 8 * GIB)
    assert "--dtype" not in str(info.value)  # already half precision: not offered again


def test_free_memory_of_the_host() -> None:
    free = free_bytes(torch.device("cpu"))
    if Path("/proc/meminfo").exists():
        assert free is not None and free > 0
    assert free_bytes(torch.device("meta")) is None


def test_record_refuses_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "free_bytes", lambda device: 1 << 20)  # a 1 MiB machine
    out = tmp_path / "t.h5"
    with pytest.raises(InputError, match=r"^--model olmoe-tiny: needs about .* but cpu has 1.00 MiB free"):
        record(RecordConfig(prompts=PROMPTS, output=out, device="cpu", progress=False))
    assert not out.exists() and not (tmp_path / "t.h5.partial").exists()


def test_full_size_builtin_defaults_to_bf16_on_a_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, "olmoe-1b-7b-random") == torch.bfloat16
    assert resolve_dtype("auto", cpu, "olmoe-tiny") == torch.float32
    assert resolve_dtype("fp32", cpu, "olmoe-1b-7b-random") == torch.float32  # an explicit choice is kept


def test_cli_refuses_fp32_full_size_model_on_this_host(tmp_path: Path) -> None:
    """The reported failure for real: fp32 olmoe-1b-7b-random on a host with less free memory than it
    needs."""
    need = MemoryEstimate(count_parameters(builtin_config("olmoe-1b-7b-random")), torch.float32).needed_bytes
    free = free_bytes(torch.device("cpu"))
    if free is None or free >= need:
        pytest.skip("this host has room for the fp32 model, so there is nothing to refuse")
    code = "import sys, cli; sys.argv[0] = 'moe-rec'; cli.moe_rec()"
    out = subprocess.run([sys.executable, "-c", code, "record", "--prompts", str(PROMPTS), "--model",
                          "olmoe-1b-7b-random", "--device", "cpu", "--dtype", "fp32",
                          "-o", str(tmp_path / "t.h5")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2
    assert out.stderr.startswith("error: --model olmoe-1b-7b-random: needs about 28.4 GiB in fp32")
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "t.h5").exists()
