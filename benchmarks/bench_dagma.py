"""pyro_livi's DAGMA-style linear DAG fit (:func:`pyro_livi.acyclicity.fit_linear_sem`) beside the
`dagma` package's ``DagmaLinear`` on DAGMA's synthetic benchmark.

Run with the separate environment that holds `dagma` (never a dependency of the project; see
benchmarks/README.md)::

    /work/venv-dagma/bin/python benchmarks/bench_dagma.py [--seeds 0 1 2 3 4]

For each seed: an Erdos-Renyi DAG with d = 20 nodes and 20 edges, weights uniform on
+-[0.5, 2], n = 500 samples of its linear Gaussian SEM (unit noise)
(:func:`pyro_livi.acyclicity.simulate_er_linear_sem`). Both methods get the same X and the same
settings (least-squares score, lambda1 0.03, threshold 0.3, 5 rounds with mu 1 .. 1e-4,
s = 1.0 .. 0.6, Adam lr 3e-4, 3e4 / 6e4 iterations), one after the other for each seed
(interleaved, so that a change of machine load hits both). Reported: SHD, TPR, FDR, edges, h of
the unthresholded W, restarted rounds (pyro_livi only), wall time; then the mean over seeds. One thread each.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

from pyro_livi.acyclicity import fit_linear_sem, graph_accuracy, simulate_er_linear_sem  # noqa: E402


def run_dagma(X: np.ndarray, lambda1: float, threshold: float) -> tuple[np.ndarray, float, float]:
    """``dagma.linear.DagmaLinear(loss_type="l2").fit`` with the reference's defaults; its
    progress bar is silenced. Returns (thresholded W, seconds, h of the unthresholded W)."""
    from dagma.linear import DagmaLinear

    model = DagmaLinear(loss_type="l2")
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        W = model.fit(X.copy(), lambda1=lambda1, w_threshold=threshold)
    seconds = time.perf_counter() - start
    return W, seconds, float(model.h_final)


def markdown(table: pd.DataFrame) -> str:
    """A pipe table of ``table`` (floats with 2 decimals)."""
    cells = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="graph / data seeds")
    parser.add_argument("--d", type=int, default=20, help="nodes")
    parser.add_argument("--edges", type=int, default=20, help="edges of the ER graph")
    parser.add_argument("--n", type=int, default=500, help="samples")
    parser.add_argument("--lambda1", type=float, default=0.03, help="L1 weight of both methods")
    parser.add_argument("--threshold", type=float, default=0.3, help="|w| below which an edge is dropped")
    args = parser.parse_args(argv)

    from importlib.metadata import version

    import torch

    torch.set_num_threads(1)
    print(f"machine: {cpu_model()}, Python {platform.python_version()}, numpy {np.__version__}, "
          f"dagma {version('dagma')}; one thread")
    print(f"benchmark: ER DAG, d = {args.d}, {args.edges} edges, n = {args.n}, linear Gaussian SEM; "
          f"lambda1 = {args.lambda1}, threshold = {args.threshold}")
    rows = []
    for seed in args.seeds:
        W_true, X = simulate_er_linear_sem(args.d, args.edges, args.n, seed=seed)
        fit = fit_linear_sem(X, lambda1=args.lambda1, w_threshold=args.threshold)
        rows.append({"seed": seed, "method": "pyro_livi fit_linear_sem", **graph_accuracy(W_true, fit.W),
                     "h": fit.h, "retries": fit.retries, "seconds": fit.seconds})
        W_dagma, seconds, h = run_dagma(X, args.lambda1, args.threshold)
        rows.append({"seed": seed, "method": "dagma DagmaLinear", **graph_accuracy(W_true, W_dagma),
                     "h": h, "retries": "-", "seconds": seconds})
        print(f"seed {seed}: " + "; ".join(f"{r['method']} SHD {r['shd']}, {r['seconds']:.1f} s" for r in rows[-2:]),
              flush=True)
    table = pd.DataFrame(rows)
    table["h"] = table["h"].map(lambda v: f"{v:.1e}")
    cols = ["seed", "method", "shd", "tpr", "fdr", "nnz", "h", "retries", "seconds"]
    print()
    print(markdown(table[cols]))
    mean = table.groupby("method", sort=False)[["shd", "tpr", "fdr", "nnz", "seconds"]].mean().reset_index()
    print()
    print(markdown(mean))
    return 0


if __name__ == "__main__":
    sys.exit(main())
