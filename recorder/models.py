"""Load a model and tokenizer: a built-in random model, or any hub id / local path through transformers."""

from __future__ import annotations

from typing import Any

import torch

from recorder.builtin_models import BUILTIN_MODELS, build_builtin_model, build_builtin_tokenizer
from traces.errors import InputError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a device (use auto, cuda or cpu)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that supports it, else fp32 (CPU half precision is slow and imprecise)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"--dtype {name}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(
    model_id: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer with left padding and a pad token)."""
    if model_id in BUILTIN_MODELS:
        return build_builtin_model(model_id, device, dtype), build_builtin_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            model_id, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        builtin = ", ".join(BUILTIN_MODELS)
        raise InputError(f"--model {model_id}: cannot load ({first}); built-in models: {builtin}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    loaded: Any = model
    return loaded.to(device).eval(), tokenizer
