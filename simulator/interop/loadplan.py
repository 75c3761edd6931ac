"""`plan --load-file` and `report --load-file`: plan from per-layer expert counts when no per-token ids exist.

The planner replays steps, so a load file is turned into steps first: a synthetic trace of the model (a
preset) whose tokens draw their experts independently from the file's per-expert shares -- no co-selection, no
temporal locality (traces.synthetic with cluster weight and stickiness 0). Layers the file lacks take the
nearest counted layer's skew with shuffled experts. The load per expert is therefore the file's; per-step
imbalance, co-selection and all-to-all bytes are modelled from independent draws, not measured, and every
output says so.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from traces.errors import InputError
from traces.loadfile import CANNOT_SHOW, counts_table, read_load_file

DEFAULT_LOAD_TOKENS = 200_000


def load_file_note(path: str, tokens: int) -> str:
    """What a plan or report made from a load file states about itself."""
    return (f"planned from load file {path}: {tokens:,} tokens drawn independently from its per-expert "
            f"shares; a load file cannot show {CANNOT_SHOW}, so those figures are modelled, not measured")


@contextmanager
def trace_or_load_file(traces: tuple[str, ...], load_file: str | None, *, model: str | None = None,
                       tokens: int = DEFAULT_LOAD_TOKENS,
                       seed: int = 0) -> Iterator[tuple[list[str], str | None]]:
    """Yields (trace paths to open, a note or None): the traces given, or a temporary trace made from a load
    file (removed afterwards)."""
    if load_file is None:
        if not traces:
            raise InputError("give a TRACE, or --load-file with per-layer expert counts")
        yield list(traces), None
        return
    if traces:
        raise InputError("give a TRACE or --load-file, not both")
    from traces.presets import get_preset
    from traces.synthetic import SynthConfig, write_synthetic

    load = read_load_file(load_file)
    name = model or load.model_id
    if not name:
        raise InputError(f"{load_file}: the load file names no model; pass --load-model PRESET for its "
                         "shapes")
    preset = get_preset(name)
    if preset.num_experts != load.num_experts:
        raise InputError(f"{load_file}: counts {load.num_experts} experts per layer, {preset.name} has "
                         f"{preset.num_experts}")
    if load.top_k and load.top_k != preset.top_k:
        raise InputError(f"{load_file}: counted with top-{load.top_k}, {preset.name} routes "
                         f"top-{preset.top_k}")
    config = SynthConfig(model=preset.name, tokens=tokens, seed=seed, counts=counts_table(load),
                         cluster_weight=0.0, stickiness=0.0, token_ids=False,
                         extra_notes={"load_file": str(load_file)})
    with tempfile.TemporaryDirectory(prefix="moe-trace-load-") as tmp:
        path = Path(tmp) / "from-load-file.h5"
        write_synthetic(path, config)
        yield [str(path)], load_file_note(load_file, tokens)


def load_file_options(fn):  # type: ignore[no-untyped-def]
    """The --load-file, --load-model and --load-tokens options, for plan (report takes them from plan)."""
    import click

    options = [
        click.option("--load-file", default=None, type=click.Path(dir_okay=False),
                     help="Plan from per-layer expert counts instead of a TRACE (a load file from moe-sim "
                          "import, per-layer load JSON/CSV or the OLMoE counts file); per-step imbalance, "
                          "co-selection and all-to-all bytes are then modelled, not measured."),
        click.option("--load-model", default=None,
                     help="Model preset of the load file [default: the model the file names]."),
        click.option("--load-tokens", type=click.IntRange(min=1000), default=DEFAULT_LOAD_TOKENS,
                     show_default=True,
                     help="Tokens drawn from the load file's expert shares to form steps."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn
