"""`moe-sim calibrate`: measure a GPU's MoE kernels and all-to-all into a cost profile
(simulator/profiles.py)."""
