"""All-to-all traffic against step load: placements scored under the home and stay dispatch models
(`kernels`, NumPy twin in `reference`, the pass over a trace in `score`) and the trade-off curve of the
traffic-aware policies (`tradeoff`)."""
