"""`moe-sim info | validate | convert | synth`: thin click commands over traces/ (stats, validate, convert,
synthetic). Each parses options, calls one library function and prints a summary."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from traces.presets import PRESETS
from traces.reader import DEFAULT_CHUNK_TOKENS
from traces.units import nbytes

TRACES = click.argument("traces", nargs=-1, required=True, metavar="TRACE...")
CHUNK = click.option(
    "--chunk-tokens", type=click.IntRange(min=1), default=DEFAULT_CHUNK_TOKENS, show_default=True,
    help="Tokens read per chunk (memory use grows with this, not with the trace).",
)


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr counting tokens; yields the advance callback."""
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
        TimeRemainingColumn(), console=console, transient=True,
        disable=not enabled or not console.is_terminal,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


@click.command()
@TRACES
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of tables.")
@CHUNK
def info(traces: tuple[str, ...], as_json: bool, chunk_tokens: int) -> None:
    """Summarise a trace: tokens, sequences, phases, layers, size on disk and per-layer expert load.

    TRACE... are files or glob patterns, read together as the shards of one trace. Only ids, sequence ids,
    phases and steps are read (never weights or logits). Load: the share of a layer's assignments that went to
    its most-used expert (1/experts when perfectly even) and the entropy of the expert shares divided by
    log(experts) (1 = perfectly even).
    """
    from traces.reader import open_trace
    from traces.stats import summarize

    with open_trace(list(traces)) as trace, progress_bar(trace.num_tokens, "reading", not as_json) as advance:
        summary = summarize(trace, chunk_tokens, on_chunk=advance)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
        return
    console = Console()
    n = max(1, summary.num_tokens)
    overview = Table(show_header=False, box=None, padding=(0, 2))
    rows = [
        ("trace", ", ".join(summary.paths)),
        ("encoding", f"{', '.join(summary.encodings)} ({summary.status})"),
        ("model", f"{summary.model_id} ({summary.source})"),
        ("tokens", f"{summary.num_tokens:,}"),
        ("sequences", f"{summary.num_sequences:,}"),
        ("prefill / decode", f"{summary.prefill_tokens:,} / {summary.decode_tokens:,} "
                             f"({summary.decode_tokens / n:.1%} decode)"),
        ("forward passes", f"{summary.num_steps:,}"),
        ("MoE layers x experts, top-k", f"{summary.num_layers} x {summary.num_experts}, top-{summary.top_k}"),
        ("columns", ", ".join(["ids"] + ([f"weights ({summary.weights_dtype})"] if summary.weights_dtype
                                         else [])
                              + (["token ids"] if summary.has_token_ids else [])
                              + (["router logits"] if summary.has_logits else []))),
        ("size on disk", f"{nbytes(summary.size_bytes)} ({summary.bytes_per_token:.1f} bytes/token)"),
    ]
    for key, value in rows:
        overview.add_row(f"[bold]{key}[/]", value)
    console.print(overview)
    table = Table(title="Per-layer expert load", title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("most-used expert", justify="right")
    table.add_column("its share", justify="right")
    table.add_column(f"x even (1/{summary.num_experts})", justify="right")
    table.add_column("entropy", justify="right")
    for load in summary.layers:
        table.add_row(str(load.layer), str(load.top_expert), f"{load.top_share:.1%}",
                      f"{load.top_share * summary.num_experts:.2f}", f"{load.entropy:.3f}")
    console.print(table)


@click.command()
@TRACES
@click.option("--allow-partial", is_flag=True,
              help="Accept a trace whose writer did not finish (a .partial file).")
@CHUNK
def validate(traces: tuple[str, ...], allow_partial: bool, chunk_tokens: int) -> None:
    """Check a trace fully and stop at the first problem (exit code 2 and one line naming it).

    Checks: files open and are traces of a known schema version, shards agree, metadata is complete, column
    dtypes match it, expert ids are in range with no expert twice in a row's top-k, weights and logits are
    finite, phases/positions/steps/token ids are valid, every declared row is there, and every block matches
    its checksum (format 1.1; files written before carry none and are reported as unchecked). TRACE... are
    files or glob patterns, read together as the shards of one trace.
    """
    from traces.reader import open_trace
    from traces.validate import validate as validate_trace

    with open_trace(list(traces)) as trace:
        total = trace.num_tokens
    with progress_bar(total, "validating") as advance:
        result = validate_trace(list(traces), allow_partial=allow_partial, chunk_tokens=chunk_tokens,
                                on_chunk=advance)
    state = "complete" if result.complete else "partial"
    click.echo(f"ok: {result.num_tokens:,} tokens in {result.num_shards} file(s), {state}, no problem found; "
               f"{result.integrity}")


@click.command()
@click.argument("src", metavar="IN")
@click.argument("dst", metavar="OUT", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--compression", type=click.Choice(["lz4", "zstd", "gzip", "lzf", "none"]), default=None,
              help="Compression of OUT. HDF5: lz4 (default), zstd, gzip (readable by any HDF5 tool, slower), "
                   "lzf, none. Arrow: zstd (default), lz4, none.")
@CHUNK
def convert(src: str, dst: str, force: bool, compression: str | None, chunk_tokens: int) -> None:
    """Convert a trace between HDF5 (.h5/.hdf5) and Arrow IPC (.arrow/.feather/.ipc), losslessly.

    The encoding follows OUT's extension. IN may be a glob (quoted) of shards, merged into one file. OUT is
    written under a temporary name and renamed when complete; an existing OUT is kept unless --force.
    """
    from traces.convert import convert as convert_trace
    from traces.reader import open_trace

    with open_trace(src) as trace:
        total = trace.num_tokens
    with progress_bar(total, "converting") as advance:
        out = convert_trace(src, dst, force=force, compression=compression, chunk_tokens=chunk_tokens,
                            on_chunk=advance)
    click.echo(f"wrote {out}: {total:,} tokens, {nbytes(out.stat().st_size)}")


@click.command()
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Trace to write (.h5/.hdf5 or .arrow/.feather/.ipc).")
@click.option("--model", default="olmoe-1b-7b", show_default=True,
              help=f"Model preset: {', '.join(PRESETS)} (hub ids accepted; DeepSeek-V3 with its "
                   "group-limited routing).")
@click.option("--tokens", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Tokens to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same trace).")
@click.option("--skew", type=click.FloatRange(min=0), default=0.8, show_default=True,
              help="Zipf exponent of expert popularity per layer (0 = uniform; 0.8 is OLMoE-like).")
@click.option("--counts-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON of real per-expert counts (e.g. olmoe_expert_counts.json) to take popularity from; "
                   "layers it lacks reuse the nearest counted layer's skew with shuffled experts.")
@click.option("--counts-domain", default=None, help="Domain of the counts file to use (default: all summed).")
@click.option("--sequences", type=click.IntRange(min=1), default=None,
              help="Number of sequences (prompts) [default: tokens / 1024].")
@click.option("--decode-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.25,
              show_default=True, help="Share of each sequence's tokens that are generated (decode phase).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences per forward pass (prefill once per batch, then one decode step per token).")
@click.option("--clusters", type=click.IntRange(min=1), default=None,
              help="Co-selection clusters per layer [default: experts / top-k].")
@click.option("--cluster-weight", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Share of each draw taken from the sequence's current cluster (co-selection strength).")
@click.option("--stickiness", type=click.FloatRange(0, 1), default=0.2, show_default=True,
              help="Share of each draw re-using the previous token's experts (temporal locality).")
@click.option("--topic-switch", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Per-token probability that a sequence moves to another cluster.")
@click.option("--weights-dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True)
@click.option("--no-token-ids", is_flag=True, help="Store no token ids.")
@click.option("--compression", type=click.Choice(["lz4", "zstd", "gzip", "lzf", "none"]), default=None,
              help="HDF5: lz4 (default), zstd, gzip, lzf, none. Arrow: zstd (default), lz4, none.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def synth(output: str, model: str, tokens: int, seed: int, skew: float, counts_file: str | None,
          counts_domain: str | None, sequences: int | None, decode_fraction: float, batch_size: int,
          clusters: int | None, cluster_weight: float, stickiness: float, topic_switch: float,
          weights_dtype: str, no_token_ids: bool, compression: str | None, force: bool) -> None:
    """Write a synthetic trace with a real model's shapes, skewed expert popularity, co-selected experts,
    temporal locality, and prefill/decode phases of several sequences, deterministic for a seed.

    Example: moe-sim synth -o demo.h5 --model olmoe-1b-7b --tokens 1000000 --seed 1
    """
    from traces.synthetic import SynthConfig, load_counts, write_synthetic

    config = SynthConfig(
        model=model, tokens=tokens, seed=seed, skew=skew,
        counts=load_counts(counts_file, counts_domain) if counts_file else None,
        sequences=sequences, decode_fraction=decode_fraction, batch_size=batch_size, num_clusters=clusters,
        cluster_weight=cluster_weight, stickiness=stickiness, topic_switch=topic_switch,
        weights_dtype=weights_dtype, token_ids=not no_token_ids,
    )
    with progress_bar(tokens, "synthesising") as advance:
        out = write_synthetic(output, config, force=force, compression=compression, on_chunk=advance,
                              command_line=" ".join(["moe-sim", *sys.argv[1:]]))
    size = Path(out).stat().st_size
    click.echo(f"wrote {out}: {tokens:,} tokens of {config.model}, {config.num_sequences:,} sequences, "
               f"{nbytes(size)} ({size / tokens:.1f} bytes/token)")
