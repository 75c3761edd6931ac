"""`moe-sim hardware`: the GPU presets, their figures and sources, what prices each, and a hardware file's
fields."""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from simulator import units
from simulator.cost_model import gpu_pricing_source
from simulator.hardware import PRESETS, GpuSpec, load_hardware

SOURCES = {
    "a100": "NVIDIA A100 SXM 80 GB datasheet; NVLink3",
    "h100": "NVIDIA H100 SXM datasheet (dense BF16: half the sparsity figure); NVLink4",
    "h200": "NVIDIA H200 SXM datasheet; NVLink4",
    "b200": "NVIDIA HGX B200 (1000 W) datasheet, lower HBM figure of 180-192 GB; NVLink5",
    "mi300x": "AMD Instinct MI300X datasheet; Infinity Fabric aggregate over 7 peers",
}


@click.command("hardware")
@click.option("--json", "as_json", is_flag=True, help="Print the presets and fields as JSON.")
def hardware(as_json: bool) -> None:
    """List the GPU presets with their figures and sources, what prices each, and a hardware file's fields.

    A hardware file (YAML or JSON, `--hardware my_gpu.yaml`) holds GpuSpec's fields; `profile` names a profile
    from `moe-sim calibrate` (omitted: derived from the nearest measured one; null: roofline).
    """
    specs = [load_hardware(name) for name in PRESETS]
    fields = [f.name for f in dataclasses.fields(GpuSpec)]
    if as_json:
        json.dump({"presets": [s.to_dict() | {"source": SOURCES.get(s.name, ""),
                                              "priced_by": gpu_pricing_source(s)}
                               for s in specs], "fields": fields}, sys.stdout)
        sys.stdout.write("\n")
        return
    for s in specs:
        click.echo(f"{s.name:7} {units.si(s.bf16_flops, 'FLOP/s')} BF16, {units.nbytes(s.hbm_bytes)} HBM at "
                   f"{units.si(s.hbm_bandwidth, 'B/s')}, scale-up {units.si(s.scale_up_bandwidth, 'B/s')}, "
                   f"scale-out {units.si(s.scale_out_bandwidth, 'B/s')}")
        click.echo(f"        source: {SOURCES.get(s.name, '-')}; expert time: {gpu_pricing_source(s)}")
    click.echo("Latencies: 3 us per all-to-all phase inside a node, 10 us across (stated assumptions).")
    required = [f.name for f in dataclasses.fields(GpuSpec) if f.default is dataclasses.MISSING]
    click.echo(f"Hardware file fields: {', '.join(fields)} (required: {', '.join(required)}).")
