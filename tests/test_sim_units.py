"""The shared number formatter of the simulator's tables: three significant figures, SI prefixes, hand-checked."""

from __future__ import annotations

import pytest

from simulator import units


@pytest.mark.parametrize("x,text", [(0.000316, "0.000316"), (12.06, "12.1"), (1.0, "1.00"), (9.996, "10.0"),
                                    (999.7, "1000"), (1234.0, "1234"), (0.0, "0"), (-2.345, "-2.35"),
                                    (float("nan"), "-")])
def test_sig(x, text):
    assert units.sig(x) == text


@pytest.mark.parametrize("x,unit,text", [(1.21e-5, "s", "12.1 us"), (3.16e-10, "s", "0.316 ns"),
                                         (999.7e-6, "s", "1.00 ms"), (9.49e6, "B", "9.49 MB"),
                                         (805.31e6, "B", "805 MB"), (2094, "", "2.09k"), (317285, "", "317k"),
                                         (12.5, "B", "12.5 B"), (0, "s", "0 s"), (0, "", "0")])
def test_si(x, unit, text):
    assert units.si(x, unit) == text


def test_seconds_bytes_share():
    assert units.seconds(2.5e-4) == "250 us"
    assert units.seconds(1.25) == "1.25 s" and units.seconds(3600) == "3600 s"  # no kilo-seconds
    assert units.nbytes(202_240) == "202 kB"
    assert units.share(0.873) == "87.3%" and units.share(0.00312) == "0.312%" and units.share(1.0) == "100%"
    assert units.share(0.0) == "0%" and units.share(1.2e-6) == "<0.01%"
