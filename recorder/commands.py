"""`moe-rec record`: thin click wrapper around recorder.record.record()."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from recorder.config import DEFAULT_MODEL, DEFAULT_OUTPUT, RecordConfig


@click.command("record")
@click.option("--prompts", "prompts", type=click.Path(path_type=Path), required=True,
              help="Prompts file: .txt (one prompt per line, blank lines skipped) or .jsonl (a text field or "
                   "chat 'messages').")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Hugging Face model id or local path, or a built-in random model: olmoe-tiny, "
                   "olmoe-1b-7b-random, mixtral-tiny, qwen-moe-tiny, deepseek-tiny.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=DEFAULT_OUTPUT, show_default=True,
              help="Trace file to write: .h5 (HDF5) or .arrow (Arrow IPC).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts per forward pass (halved automatically on CUDA out-of-memory).")
@click.option("--max-length", type=click.IntRange(min=1), default=512, show_default=True,
              help="Prompt tokens kept per prompt; longer prompts are truncated (with one warning counting "
                   "them).")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="Greedy decode steps recorded after the prefill (0: prefill only).")
@click.option("--device", default="auto", show_default=True, help="auto, cuda, cuda:N or cpu.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto",
              show_default=True, help="Model dtype (auto: bf16 on a GPU, fp32 on CPU).")
@click.option("--save-logits", is_flag=True,
              help="Also store the full router logits [E] per layer (float16).")
@click.option("--no-token-ids", "no_token_ids", is_flag=True,
              help="Store no token ids (no prompt text can be recovered from the trace).")
@click.option("--revision", default=None, help="Model revision (branch, tag or commit) for hub models.")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow the model repository's own Python code to run.")
@click.option("--resume", is_flag=True, help="Continue an interrupted trace (<output>.partial) with the next "
                                              "unrecorded prompt.")
@click.option("--force", is_flag=True,
              help="Overwrite an existing trace (or leftover .partial) at the output name.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed for torch and numpy (built-in weights always use their own fixed seed).")
@click.option("--prompt-field", default="text", show_default=True, help="JSONL key holding the prompt text.")
@click.option("--no-progress", is_flag=True, hidden=True, help="Hide the progress bar.")
def record(prompts: Path, model: str, output: Path, batch_size: int, max_length: int, max_new_tokens: int,
           device: str, dtype: str, save_logits: bool, no_token_ids: bool, revision: str | None,
           trust_remote_code: bool, resume: bool, force: bool, seed: int, prompt_field: str,
           no_progress: bool) -> None:
    """Run a transformers MoE model over PROMPTS and record every token's expert routing.

    Prefill is always recorded; --max-new-tokens adds greedy decoding. Padding is never recorded. The trace is
    written crash-safely: an interrupted run leaves <output>.partial, which --resume continues. Under torchrun
    (`torchrun --nproc-per-node N moe-rec record ...`) each rank records every N-th prompt into
    <output stem>-rank<r><ext>; moe-sim opens the shards as one trace.

    \b
    Example:
      moe-rec record --prompts prompts.txt -o trace.h5
    """
    from rich.console import Console

    from recorder.ranks import gather_results, rank_from_env
    from recorder.record import print_summary
    from recorder.record import record as run_record

    ranks = rank_from_env()

    cfg = RecordConfig(
        prompts=prompts, model=model, output=output, batch_size=batch_size, max_length=max_length,
        max_new_tokens=max_new_tokens, device=device, dtype=dtype, save_logits=save_logits,
        token_ids=not no_token_ids, revision=revision, trust_remote_code=trust_remote_code, resume=resume,
        force=force, seed=seed, prompt_field=prompt_field, progress=not no_progress and ranks.rank == 0,
        command_line=shlex.join(["moe-rec", *sys.argv[1:]]), rank=ranks.rank, world_size=ranks.world_size,
        local_rank=ranks.local_rank,
    )
    result = run_record(cfg, Console(stderr=True))
    print_summary(result, max_length, Console())
    everyone = gather_results(ranks, (result.tokens, result.sequences, str(result.path)))
    if ranks.distributed and ranks.rank == 0:
        pattern = str(output.with_name(f"{output.stem}-rank*{output.suffix}"))
        click.echo(f"all {ranks.world_size} ranks: {sum(r[0] for r in everyone):,} tokens from "
                   f"{sum(r[1] for r in everyone):,} prompts in {len(everyone)} shards; moe-sim reads them "
                   f"as one trace: moe-sim info '{pattern}'")
