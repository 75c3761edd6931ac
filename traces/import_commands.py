"""`moe-sim import`: a thin click command over traces.importers.import_dump."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

from traces.importers import FORMATS


@contextmanager
def _counter(enabled: bool) -> Iterator[Callable[[int], None]]:
    """A live count of imported tokens on stderr (the total is unknown until the dumps are read)."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("importing {task.completed:,.0f} tokens"), TimeElapsedColumn(),
                  console=console, transient=True,
                  disable=not enabled or not console.is_terminal) as progress:
        task = progress.add_task("import", total=None)
        yield lambda n: progress.advance(task, n)


@click.command("import")
@click.argument("sources", nargs=-1, required=True, metavar="SRC...")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Trace to write (.h5/.hdf5 or .arrow); a load file (.json) for count-only formats.")
@click.option("--from", "fmt", required=True, type=click.Choice(list(FORMATS)),
              help="Format of SRC: " + "; ".join(f"{k}: {v[2]}" for k, v in FORMATS.items()) + ".")
@click.option("--model", default=None, help="Model preset giving the shapes (olmoe-1b-7b, mixtral-8x7b, "
                                            "qwen1.5-moe-a2.7b, deepseek-v3).")
@click.option("--config", "config", default=None, type=click.Path(dir_okay=False),
              help="The served model's Hugging Face config.json, instead of --model.")
@click.option("--phase", type=click.Choice(["prefill", "decode"]), default="prefill", show_default=True,
              help="megatron: the phase of every token (the tracer does not record it).")
@click.option("--seq-col", default="request_id", show_default=True,
              help="tabular: sequence (request) column.")
@click.option("--layer-col", default="layer", show_default=True,
              help="tabular: layer column; \"\" for one row per token with [layers][top-k] expert lists.")
@click.option("--position-col", default="token_idx", show_default=True, help="tabular: position column.")
@click.option("--experts-col", default="topk_ids", show_default=True, help="tabular: chosen experts column.")
@click.option("--weights-col", default="", help="tabular: gating probabilities of the chosen experts.")
@click.option("--token-col", default="", help="tabular: token id column.")
@click.option("--phase-col", default="", help="tabular: phase column (prefill/decode or 0/1).")
@click.option("--step-col", default="", help="tabular: forward-pass column.")
@click.option("--router-output", type=click.Choice(["logits", "probabilities"]), default="logits",
              show_default=True, help="hf-router-logits: whether the saved tensors are raw logits or softmax "
                                      "probabilities (transformers 5.0's routers returned probabilities).")
@click.option("--keep-logits", is_flag=True, help="hf-router-logits: store the router logits column as well.")
@click.option("--compression", type=click.Choice(["lz4", "zstd", "gzip", "lzf", "none"]), default=None,
              help="Trace compression (as for moe-sim convert).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def import_cmd(sources: tuple[str, ...], output: str, fmt: str, model: str | None, config: str | None,
               phase: str, seq_col: str, layer_col: str, position_col: str, experts_col: str,
               weights_col: str,
               token_col: str, phase_col: str, step_col: str, router_output: str, keep_logits: bool,
               compression: str | None,
               force: bool, as_json: bool) -> None:
    """Convert routing dumps of a serving engine or another tool to a trace (or a load file), streaming.

    SRC... are files, quoted globs or directories (megatron: router_trace_rank*.jsonl in it). The dump gives
    the routing; --model or --config gives the model's shapes. Physical expert ids are mapped back to logical
    ones, ranks that recorded the same batch are kept once, and bad input stops the import with one line and
    no output file. docs/import.md describes each layout.

    Example: moe-sim import dumps/*.pt -o trace.h5 --from sglang-per-token --model deepseek-v3
    """
    from traces.importers import ImportOptions, import_dump
    from traces.importers.tabular import Columns

    options = ImportOptions(
        phase=phase, router_output=router_output, keep_logits=keep_logits,
        columns=Columns(seq=seq_col, layer=layer_col, position=position_col, experts=experts_col,
                        weights=weights_col, token=token_col, phase=phase_col, step=step_col),
    )
    with _counter(enabled=not as_json) as advance:
        result = import_dump(list(sources), output, fmt, model=model, config=config, options=options,
                             force=force, compression=compression,
                             command_line=" ".join(["moe-sim", *sys.argv[1:]]),
                             on_tokens=advance)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    extra = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in result.details.items()
                      if v not in ([], 0, None))
    noun = "tokens" if result.kind == "trace" else "tokens' worth of selections"
    click.echo(f"wrote {result.output} ({result.kind}): {result.num_tokens:,} {noun} from --from {fmt}"
               + (f"; {extra}" if extra else ""))
