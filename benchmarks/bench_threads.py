"""Training speed on a shared machine: torch threads x OpenMP wait policy, idle and with one
busy process on the same cores.

Each setting runs in a fresh process (the OpenMP wait policy is read when torch loads): LIVI's
VAE stage on a simulated population (2,000 cells x 300 genes, batch 256), seconds per epoch
(median of the epochs after the first). "busy" starts one process spinning on a core for the
duration of the run. Prints a markdown table.

    python benchmarks/bench_threads.py [--epochs 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from pyro_livi.run import fit
from pyro_livi.simulate import SimulationConfig, simulate
sim = simulate(SimulationConfig(n_donors=40, cells_per_donor=50, n_genes=300, n_snps=50), seed=1)
r = fit(sim.adata, donor_key="donor", epochs_vae=int(sys.argv[2]), epochs=1, batch_size=256, n_cell_state=8,
        n_dxc=5, encoder_hidden=(128,), progress=False)
vae = r.history[r.history["stage"] == "vae"]
print(json.dumps({"cells_per_s": float(vae["cells_per_s"].iloc[1:].median()), "n_cells": r.dataset.n_cells}))
"""
SPIN = "while True:\n    pass\n"


def run(threads: int, policy: str, epochs: int) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(epochs)], env=env, check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["n_cells"] / result["cells_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4, help="VAE epochs per run (the first is left out)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting; the table shows the median")
    args = parser.parse_args()
    settings = [(1, "ACTIVE"), (2, "ACTIVE"), (1, "PASSIVE"), (2, "PASSIVE")]
    rows = []
    for load in ("idle", "busy"):
        spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if load == "busy" else None
        try:
            for threads, policy in settings:
                times = sorted(run(threads, policy, args.epochs) for _ in range(args.repeats))
                rows.append((load, threads, policy, times[len(times) // 2]))
        finally:
            if spinner is not None:
                spinner.kill()
    print(f"cores: {os.cpu_count()}, affinity: {len(os.sched_getaffinity(0))}, epochs: {args.epochs}, "
          f"repeats: {args.repeats}\n")
    print("| machine | torch threads | OMP_WAIT_POLICY | s / epoch |")
    print("|---|---|---|---|")
    for load, threads, policy, seconds in rows:
        print(f"| {load} | {threads} | {policy} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
