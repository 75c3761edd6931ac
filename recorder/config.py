"""RecordConfig: everything `moe-rec record` needs, as one plain dataclass (no torch import here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "olmoe-tiny"
DEFAULT_OUTPUT = "trace.h5"


@dataclass
class RecordConfig:
    prompts: Path
    model: str = DEFAULT_MODEL
    output: Path = Path(DEFAULT_OUTPUT)
    batch_size: int = 8
    max_length: int = 512  # prompt tokens kept per prompt; longer prompts are truncated
    max_new_tokens: int = 0  # greedy decode steps recorded after the prefill
    device: str = "auto"  # auto, cuda, cpu (or cuda:N)
    dtype: str = "auto"  # auto, bf16, fp16, fp32
    save_logits: bool = False
    token_ids: bool = True
    revision: str | None = None
    trust_remote_code: bool = False
    resume: bool = False
    force: bool = False
    seed: int = 0
    prompt_field: str = "text"
    progress: bool = True
    command_line: str = ""
    rank: int = 0  # torchrun: this process records the prompts i with i mod world_size == rank (see ranks.py)
    world_size: int = 1
    local_rank: int = 0  # the device index on the node (cuda:local_rank with --device auto)
