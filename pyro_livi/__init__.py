"""pyro_livi: a Pyro model zoo for population-scale multimodal single-cell data.

LIVI splits each cell's expression into cell state, persistent donor effects and
donor x cell-state interactions; its donor factors are tested against genotypes to
find trans-eQTLs.
"""

__version__ = "0.1.0"
