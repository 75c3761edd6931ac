"""Load a model and tokenizer: a built-in random model, or any hub id / local path through transformers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recorder.builtin_models import (
    BUILTIN_MODELS,
    FULL_SIZE_BUILTINS,
    build_builtin_model,
    build_builtin_tokenizer,
    builtin_config,
)
from recorder.memory import MemoryEstimate, check_fits, count_parameters, free_bytes
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


def resolve_dtype(name: str, device: torch.device, model_id: str | None = None) -> torch.dtype:
    """auto: bf16 on a GPU that supports it; on a CPU fp32 (CPU half precision is slow and imprecise), except
    for the full-size built-in models, whose random weights need no precision and whose fp32 copy (28 GB for
    olmoe-1b-7b-random) would not fit most hosts."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and model_id in FULL_SIZE_BUILTINS:
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"--dtype {name}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class ModelSource:
    """Where a non-built-in model loads from: `name` (a folder or a hub id) and whether the hub may be
    asked."""

    name: str
    kind: str  # "folder", "hub cache" (loaded without any network request) or "hub"
    local_files_only: bool


def looks_like_path(model_id: str) -> bool:
    """A hub id is "name" or "org/name"; anything else (./x, /x, ~/x, a/b/c, an existing path) is a folder."""
    return (model_id.startswith((".", "/", "~")) or "\\" in model_id or model_id.count("/") > 1
            or Path(model_id).expanduser().exists())


def resolve_model_source(model_id: str, revision: str | None = None, *,
                         probe_timeout: float = 10.0) -> ModelSource:
    """Decide where `model_id` loads from before transformers tries, so that a bad --model fails at once.

    A folder must exist and hold config.json. A hub id already in the local cache loads from it with no
    network request (transformers would otherwise ask the hub first and, offline, retry for about a minute).
    Otherwise one request with a short timeout and no retries tells "no network" from "no such model" (or
    gated, or no such revision) before any download starts.
    """
    if looks_like_path(model_id):
        folder = Path(model_id).expanduser()
        if not folder.exists():
            raise InputError(f"--model {model_id}: no such directory")
        if not folder.is_dir():
            raise InputError(f"--model {model_id}: not a directory (give the folder that holds config.json)")
        if not (folder / "config.json").is_file():
            raise InputError(f"--model {model_id}: no config.json in this folder (not a transformers model)")
        return ModelSource(str(folder), "folder", local_files_only=True)
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
    except HFValidationError as exc:
        raise InputError(f"--model {model_id}: neither a folder nor a hub model id "
                         f"({_first_line(exc)})") from None
    if isinstance(cached, str):
        return ModelSource(model_id, "hub cache", local_files_only=True)
    not_cached = f"not in the local cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise InputError(f"--model {model_id}: {not_cached} and HF_HUB_OFFLINE is set; download it where "
                         "there is network (huggingface-cli download) or pass a local folder")
    try:
        HfApi().model_info(model_id, revision=revision, timeout=probe_timeout)
    except GatedRepoError:
        raise InputError(f"--model {model_id}: gated on the hub; accept its terms on huggingface.co and log "
                         "in (huggingface-cli login)") from None
    except RepositoryNotFoundError:
        raise InputError(f"--model {model_id}: no such model on the Hugging Face hub (or it is private: log "
                         "in with huggingface-cli login)") from None
    except RevisionNotFoundError:
        raise InputError(f"--model {model_id}: no revision {revision!r} on the hub") from None
    except HfHubHTTPError as exc:
        raise InputError(f"--model {model_id}: the hub answered with an error ({_first_line(exc)})") from None
    except Exception as exc:  # connection refused, DNS failure, timeout: the transport's own exception types
        raise InputError(f"--model {model_id}: cannot reach the Hugging Face hub ({_first_line(exc)}) and "
                         f"the model is {not_cached}; download it where there is network or pass a local "
                         "folder") from None
    return ModelSource(model_id, "hub", local_files_only=False)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
        estimate = MemoryEstimate(count_parameters(builtin_config(model_id)), dtype)
        check_fits(model_id, estimate, device, free_bytes(device))
        return build_builtin_model(model_id, device, dtype), build_builtin_tokenizer()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_source(model_id, revision)
    try:
        config = AutoConfig.from_pretrained(source.name, revision=revision,
                                            trust_remote_code=trust_remote_code,
                                            local_files_only=source.local_files_only)
    except (OSError, ValueError) as exc:
        raise InputError(f"--model {model_id}: cannot read its config ({_first_line(exc)})") from None
    # before any weight is read: a model too large for the device is refused in one line, not killed by the OS
    estimate = MemoryEstimate(count_parameters(config, trust_remote_code=trust_remote_code), dtype)
    check_fits(model_id, estimate, device, free_bytes(device))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.name, revision=revision,
                                                  trust_remote_code=trust_remote_code,
                                                  local_files_only=source.local_files_only)
        model = AutoModelForCausalLM.from_pretrained(
            source.name, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype,
            local_files_only=source.local_files_only,
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
