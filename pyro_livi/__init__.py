"""pyro_livi: a Pyro model zoo for population-scale multimodal single-cell data.

LIVI splits each cell's expression into cell state, persistent donor effects and
donor x cell-state interactions; its donor factors are tested against genotypes to
find trans-eQTLs.
"""

import os

# OpenMP threads that busy-wait (libgomp's default) stall whenever another process holds one of
# the cores: on a shared 2-core machine an epoch took 3-10x longer with 2 torch threads than with
# one. Passive waiting keeps 2 threads as fast as 1 under load (benchmarks/bench_threads.py). It
# is read when torch loads, so it applies when pyro_livi is imported first (the CLI always is);
# a value set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
