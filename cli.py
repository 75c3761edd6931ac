"""Command lines: `moe-rec` (record routing traces) and `moe-sim` (inspect, replay and plan from traces).

Both groups are thin. Each command lives beside the library code it calls (`<package>/commands.py`) and is
imported only when it runs, so `moe-sim info` never pays for importing torch and `moe-rec` never compiles
Numba kernels. Any InputError becomes one line on stderr and exit code 2; `--debug` shows the traceback
instead.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import PackageNotFoundError, version

import click

from traces.errors import InputError

try:
    __version__ = version("moe-trace")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

# command name -> ("module:function", one-line help shown by the group's --help)
REC_COMMANDS = {
    "record": ("recorder.commands:record",
               "Run a transformers MoE model over prompts and record its routing."),
}
SIM_COMMANDS = {
    "info": ("traces.commands:info",
             "Summarise traces: tokens, phases, layers, size, per-layer expert load."),
    "validate": ("traces.commands:validate", "Check traces fully; exit non-zero on the first problem."),
    "convert": ("traces.commands:convert",
                "Convert a trace between HDF5 and Arrow (by the output's extension)."),
    "synth": ("traces.commands:synth", "Write a synthetic trace with realistic skew and co-selection."),
    "import": ("traces.import_commands:import_cmd",
               "Import SGLang, vLLM, Megatron, tabular or HF router dumps."),
    "replay": ("simulator.commands:replay", "Replay a trace on a GPU layout and compare expert placements."),
    "plan": ("simulator.commands:plan", "Find the cheapest layouts that meet a throughput target."),
    "report": ("simulator.report.commands:report",
               "Write a self-contained HTML or Markdown capacity-planning report."),
    "place": ("simulator.interop.place:place",
              "Fit one placement to a trace or load file; export it for an engine."),
    "rebalance": ("simulator.rebalance.commands:rebalance",
                  "Replay periodic placement refits: how often to rebalance."),
    "calibrate": ("simulator.calibrate.commands:calibrate",
                  "Measure this machine's GPU kernels into a cost profile."),
    "hardware": ("simulator.hardware_commands:hardware",
                 "List GPU presets, their sources and a hardware file's fields."),
}


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use; InputError becomes a one-line error."""

    def __init__(self, *args, lazy_commands: dict[str, tuple[str, str]], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.lazy_commands)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy_commands:
            return None
        module_name, attr = self.lazy_commands[cmd_name][0].split(":")
        command = getattr(importlib.import_module(module_name), attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # The group's --help lists commands from the table above, importing none of them.
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, short) in self.lazy_commands.items()])

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # `--debug` is a group option, but people type it after the subcommand too (`moe-sim info x --debug`)
        if "--debug" in args[1:] and args and not args[0].startswith("-"):
            args = [args[0], *(a for a in args[1:] if a != "--debug")]
            ctx.meta["moe_trace.debug"] = True
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug")) or bool(ctx.meta.get("moe_trace.debug")) \
            or os.environ.get("MOE_TRACE_DEBUG") == "1"
        from traces.watchdog import exit_on_stuck_reads

        exit_on_stuck_reads()  # a data read stuck inside a C library ends the command with a one-line error
        try:
            return super().invoke(ctx)
        except InputError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=LazyGroup, lazy_commands=REC_COMMANDS)
@click.version_option(__version__, prog_name="moe-rec")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def moe_rec(debug: bool) -> None:
    """Record mixture-of-experts routing traces from Hugging Face transformers models."""


@click.group(cls=LazyGroup, lazy_commands=SIM_COMMANDS)
@click.version_option(__version__, prog_name="moe-sim")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def moe_sim(debug: bool) -> None:
    """Inspect MoE routing traces and replay them to plan expert-parallel serving."""


if __name__ == "__main__":
    moe_sim()
