"""Recording across ranks: `torchrun --nproc-per-node N moe-rec record ...` splits the prompts over N
processes.

Each rank records the prompts i with i mod N == rank into its own shard `<name>-rank<r><ext>` (crash-safe and
resumable like any trace). Sequence ids stay the global prompt indices, and step r + N x (the rank's own pass
count) numbers every forward pass of every rank uniquely, so `moe-sim` opens the shards (a glob such as
`trace-rank*.h5`) as one trace whose per-token routing is what one process records. The ranks meet once, at
the end (gloo, CPU tensors only), so that rank 0 can print the whole run's summary.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RankInfo:
    """This process's place among torchrun's: rank in [0, world_size), and its device index on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def rank_from_env(env: Mapping[str, str] = os.environ) -> RankInfo:
    """RankInfo from torchrun's RANK, WORLD_SIZE and LOCAL_RANK (one plain process without them)."""
    world = int(env.get("WORLD_SIZE", "1"))
    return RankInfo(int(env.get("RANK", "0")), world,
                    int(env.get("LOCAL_RANK", "0"))) if world > 1 else RankInfo()


def shard_path(output: Path, rank: int) -> Path:
    """trace.h5 -> trace-rank0.h5."""
    return output.with_name(f"{output.stem}-rank{rank}{output.suffix}")


def rank_prompts(num_prompts: int, info: RankInfo) -> list[int]:
    """The prompt indices this rank records: every world_size-th, so lengths in a sorted file spread
    evenly."""
    return list(range(info.rank, num_prompts, info.world_size))


def gather_results(info: RankInfo, mine: tuple[int, int, str]) -> list[tuple[int, int, str]]:
    """Every rank's (tokens, sequences, shard path), on every rank; [mine] without torchrun."""
    if not info.distributed:
        return [mine]
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", rank=info.rank, world_size=info.world_size)
    try:
        out: list[tuple[int, int, str] | None] = [None] * info.world_size
        dist.all_gather_object(out, mine)
        return [o for o in out if o is not None]
    finally:
        if started:
            dist.destroy_process_group()
