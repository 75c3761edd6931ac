"""The project's one number formatter (traces.units): three significant figures, binary prefixes for bytes, SI
for rates and counts, hand-checked."""

from __future__ import annotations

import pytest

from simulator import units


@pytest.mark.parametrize("x,text", [(0.000316, "0.000316"), (12.06, "12.1"), (1.0, "1.00"), (9.996, "10.0"),
                                    (999.7, "1000"), (1234.0, "1234"), (0.0, "0"), (-2.345, "-2.35"),
                                    (float("nan"), "-")])
def test_sig(x, text):
    assert units.sig(x) == text


@pytest.mark.parametrize("x,unit,text", [(1.21e-5, "s", "12.1 us"), (3.16e-10, "s", "0.316 ns"),
                                         (999.7e-6, "s", "1.00 ms"), (4.5e11, "B/s", "450 GB/s"),
                                         (805.31e6, "B/s", "805 MB/s"), (2094, "", "2.09k"),
                                         (317285, "", "317k"), (12.5, "B", "12.5 B"), (0, "s", "0 s"),
                                         (0, "", "0")])
def test_si(x, unit, text):
    assert units.si(x, unit) == text


def test_seconds_bytes_share():
    assert units.seconds(2.5e-4) == "250 us"
    assert units.seconds(1.25) == "1.25 s" and units.seconds(3600) == "3600 s"  # no kilo-seconds
    assert units.nbytes(202_240) == "198 KiB"  # 202240 / 1024 = 197.5
    assert units.nbytes(1000) == "1000 B" and units.nbytes(1024) == "1.00 KiB" and units.nbytes(0) == "0 B"
    assert units.nbytes(9.49e6) == "9.05 MiB" and units.nbytes(80e9) == "74.5 GiB"
    assert units.nbytes(1023.9 * 1024) == "1.00 MiB"  # the unit is picked on the rounded mantissa
    assert units.share(0.873) == "87.3%" and units.share(0.00312) == "0.312%" and units.share(1.0) == "100%"
    assert units.share(0.0) == "0%" and units.share(1.2e-6) == "<0.01%"


def test_report_and_trace_commands_print_bytes_as_replay_does():
    from simulator.report.format import fmt_bytes
    from traces import commands

    assert fmt_bytes(9.49e6) == units.nbytes(9.49e6) == "9.05 MiB"
    assert fmt_bytes(float("nan")) == "n/a"
    assert commands.nbytes is units.nbytes
