"""A million cells from disk: peak memory of ``pyro-livi fit --backed`` and loader throughput.

For each size (cells, ``--genes`` genes) the benchmark

1. writes a backed-friendly ``.h5ad`` with the streaming simulator
   (:func:`pyro_livi.simulate.write_h5ad_streaming`, ``pyro-livi simulate --stream``): 200
   donors, ``median_library`` 1000 (about 23% non-zero at 2,000 genes), CSR int32 counts,
   uncompressed; it reports the file size, the write time and the writer's peak RSS;
2. runs ``pyro-livi fit --model livi --backed`` on it in a fresh subprocess, one epoch per stage
   (``--epochs-vae 1 --epochs 1``), in the reference configuration (K_C 15, K_DxC 20, K_V 5,
   encoder [512, 128], batch 1024, NB), and reports the child's peak resident set size
   (``VmHWM`` of ``/proc/self/status``, read when the command has written RUN_DIR) and the cells/s
   of each stage (from history.tsv); with ``--in-memory-fit`` also the same fit reading the counts
   in memory, at the smallest size;
3. times the minibatch loaders alone, each in its own subprocess (peak RSS included), on the same
   file opened backed, batch 1024, shuffled: this package's chunked, buffered shuffle
   (``MinibatchLoader`` defaults for backed data: chunks of 128 cells, buffers of 32 batches); the
   same loader with ``chunk_size=1`` (a permutation of the cells, rows read one by one through
   h5py); the random-row read this package used before (anndata's ``X[sorted rows]`` per batch,
   then dense); anndata's ``AnnLoader``; scvi-tools' ``AnnDataLoader`` (run with the Python of
   ``--scvi-python`` when it exists). Each runs one epoch or ``--loader-seconds``, whichever ends
   first; every loader hands out dense float32 batches of 1024 cells.

The files are read through the page cache: the machine's memory holds them after writing, so the
loader numbers are those of a warm file; a cold read from a slow disk costs more per chunk.
The machine's cores are shared with other work: cells/s vary by some 10-20% between runs.
Prints markdown. The files are removed at the end unless ``--keep``.

Example::

    python benchmarks/bench_backed.py                                  # 1e5, 3e5, 1e6 cells (~25 min)
    python benchmarks/bench_backed.py --sizes 20000 50000 --genes 500  # a quick look
    python benchmarks/bench_backed.py --dir DIR --keep; python benchmarks/bench_backed.py --dir DIR --reuse
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
MIB = 1024 * 1024
N_DONORS = 200


def peak_rss_mib() -> float:
    """Peak resident set size of this process (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------ child tasks
def task_write(job: dict) -> dict:
    import warnings

    from pyro_livi.simulate import SimulationConfig, write_h5ad_streaming

    warnings.simplefilter("ignore")
    n = int(job["n_cells"])
    cfg = SimulationConfig(n_donors=N_DONORS, cells_per_donor=n / N_DONORS, vary_cells_per_donor=False,
                           n_genes=int(job["genes"]), n_snps=500, median_library=1000.0)
    start = time.perf_counter()
    info = write_h5ad_streaming(job["path"], cfg, seed=0)
    seconds = time.perf_counter() - start
    return {"n_cells": info["n_cells"], "nnz": info["nnz"], "write_s": seconds,
            "bytes": Path(job["path"]).stat().st_size}


def task_fit(job: dict) -> dict:
    import pandas as pd

    from pyro_livi.cli import main

    argv = ["fit", "--data", job["path"], "--model", "livi", "--donor-key", "donor", "--epochs-vae", "1",
            "--epochs", "1", "--patience", "0", "--n-cell-state", "15", "--n-dxc", "20", "--n-persistent", "5",
            "--encoder-hidden", "512", "128", "--batch-size", "1024", "--threads", str(job["threads"]),
            "--out", job["out"], "--overwrite"]
    if job["backed"]:
        argv.append("--backed")
    start = time.perf_counter()
    assert main(argv) == 0
    seconds = time.perf_counter() - start
    history = pd.read_csv(Path(job["out"]) / "history.tsv", sep="\t")
    per_stage = history.groupby("stage", sort=False)["cells_per_s"].median().to_dict()
    return {"wall_s": seconds, "cells_per_s": per_stage}


def _time_batches(batches, n_cells: int, seconds: float) -> dict:
    start, cells = time.perf_counter(), 0
    for x in batches:
        assert x.dtype.itemsize == 4 and x.shape[0] > 0
        cells += int(x.shape[0])
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    return {"cells": cells, "seconds": elapsed, "cells_per_s": cells / elapsed, "epoch_done": cells >= n_cells}


def task_loader(job: dict) -> dict:
    import warnings

    import anndata as ad
    import numpy as np

    warnings.simplefilter("ignore")
    kind, path, seconds, B = job["loader"], job["path"], float(job["seconds"]), 1024
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    if kind in ("chunked", "cell_permutation"):
        from pyro_livi.data import MinibatchLoader, read_dataset

        dataset = read_dataset(path, {"modalities": {"rna": None}, "donor_key": "donor"}, backed=True)
        loader = MinibatchLoader(dataset, batch_size=B, seed=0, chunk_size=None if kind == "chunked" else 1)
        return _time_batches((b.x["rna"] for b in loader), dataset.n_cells, seconds)
    adata = ad.read_h5ad(path, backed="r")
    n = adata.n_obs
    if kind == "anndata_rows":  # this package's loader before the chunked shuffle
        order = np.random.default_rng(0).permutation(n)

        def rows():
            for k in range(0, n, B):
                block = adata.X[np.sort(order[k:k + B])]
                yield np.asarray(block.toarray(), dtype=np.float32)
        return _time_batches(rows(), n, seconds)
    if kind == "annloader":
        from anndata.experimental.pytorch import AnnLoader

        loader = AnnLoader(adata, batch_size=B, shuffle=True)
        return _time_batches((b.X for b in loader), n, seconds)
    if kind == "scvi":
        import scvi
        from scvi.dataloaders import AnnDataLoader

        scvi.model.SCVI.setup_anndata(adata)
        manager = scvi.model.SCVI(adata).adata_manager
        loader = AnnDataLoader(manager, batch_size=B, shuffle=True)
        return _time_batches((b["X"] for b in loader), n, seconds)
    raise ValueError(kind)


def child(job: dict) -> None:
    result = {"write": task_write, "fit": task_fit, "loader": task_loader}[job["task"]](job)
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


def run_child(job: dict, python: str = sys.executable, timeout: float = 7200) -> dict:
    proc = subprocess.run([python, str(HERE), "--child", json.dumps(job)], capture_output=True, text=True,
                          timeout=timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{job['task']} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000], help="cells per file")
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--dir", default=None, help="where to write the files (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the files")
    p.add_argument("--reuse", action="store_true",
                   help="use the files already in --dir (written by an earlier --keep run; write time not measured)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the fit")
    p.add_argument("--loader-seconds", type=float, default=20.0, help="time cap of each loader run")
    p.add_argument("--no-fit", action="store_true", help="files and loaders only")
    p.add_argument("--in-memory-fit", action="store_true", help="also fit the smallest file read in memory")
    p.add_argument("--scvi-python", default="/work/venv-scvi/bin/python",
                   help="Python with scvi-tools for its AnnDataLoader (skipped when missing)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_backed_"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"cores: {os.cpu_count()}, genes: {args.genes}, donors: {N_DONORS}, files in {root}", flush=True)
    files, fits, loaders = [], [], []
    kinds = ["chunked", "cell_permutation", "anndata_rows", "annloader"]
    if Path(args.scvi_python).exists():
        kinds.append("scvi")
    try:
        for n in args.sizes:
            path = root / f"cells_{n}.h5ad"
            if args.reuse and path.exists():
                import h5py

                with h5py.File(path, "r") as f:
                    nnz = int(f["X/data"].shape[0])
                w = {"n_cells": n, "nnz": nnz, "write_s": float("nan"), "bytes": path.stat().st_size,
                     "peak_rss_mib": float("nan")}
            else:
                w = run_child({"task": "write", "n_cells": n, "genes": args.genes, "path": str(path)})
            files.append(w)
            print(f"wrote {n:,} cells: {w['bytes'] / MIB / 1024:.2f} GiB in {w['write_s']:.0f} s", flush=True)
            if not args.no_fit:
                modes = [True] + ([False] if args.in_memory_fit and n == min(args.sizes) else [])
                for backed in modes:
                    f = run_child({"task": "fit", "path": str(path), "backed": backed, "threads": args.threads,
                                   "out": str(root / f"run_{n}_{'backed' if backed else 'memory'}")})
                    fits.append({"n_cells": n, "backed": backed, **f})
                    print(f"fit {n:,} ({'backed' if backed else 'in memory'}): peak {f['peak_rss_mib']:.0f} MiB, "
                          f"{f['wall_s']:.0f} s", flush=True)
            for kind in kinds:
                python = args.scvi_python if kind == "scvi" else sys.executable
                try:
                    r = run_child({"task": "loader", "loader": kind, "path": str(path),
                                   "seconds": args.loader_seconds}, python=python)
                except RuntimeError as err:
                    print(f"loader {kind} failed: {str(err).splitlines()[-1]}", flush=True)
                    continue
                loaders.append({"n_cells": n, "loader": kind, **r})
                print(f"loader {kind} on {n:,}: {r['cells_per_s']:,.0f} cells/s", flush=True)
            if not args.keep:
                path.unlink()
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    print("\n### Files written by the streaming simulator\n")
    print("| cells | genes | non-zero | file GiB | write s | cells/s | writer peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for w in files:
        print(f"| {w['n_cells']:,} | {args.genes:,} | {w['nnz'] / (w['n_cells'] * args.genes):.1%} | "
              f"{w['bytes'] / MIB / 1024:.2f} | {w['write_s']:.0f} | {w['n_cells'] / w['write_s']:,.0f} | "
              f"{w['peak_rss_mib']:.0f} |")
    if fits:
        print("\n### `pyro-livi fit --model livi --backed` (1 epoch per stage, "
              f"{args.threads} thread(s))\n")
        print("| cells | counts read | peak RSS MiB | vae cells/s | donor cells/s | wall s |")
        print("|---|---|---|---|---|---|")
        for f in fits:
            c = f["cells_per_s"]
            print(f"| {f['n_cells']:,} | {'backed' if f['backed'] else 'in memory'} | {f['peak_rss_mib']:.0f} | "
                  f"{c.get('vae', float('nan')):,.0f} | {c.get('donor', float('nan')):,.0f} | {f['wall_s']:.0f} |")
        backed = [f for f in fits if f["backed"]]
        if len(backed) > 1:
            a, b = backed[0], backed[-1]
            slope = (b["peak_rss_mib"] - a["peak_rss_mib"]) / (b["n_cells"] - a["n_cells"]) * MIB
            print(f"\nGrowth of the peak from {a['n_cells']:,} to {b['n_cells']:,} cells: "
                  f"{b['peak_rss_mib'] - a['peak_rss_mib']:+.0f} MiB, {slope:.0f} bytes per cell "
                  f"(the counts are {files[-1]['nnz'] * 8 / files[-1]['n_cells']:.0f} bytes per cell on disk).")
    print("\n### Loaders alone (backed file, batch 1024, shuffled, dense float32 batches)\n")
    print("| cells | loader | cells/s | cells timed | full epoch | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    names = {"chunked": "pyro_livi chunked shuffle (chunks 128, buffer 32 batches)",
             "cell_permutation": "pyro_livi, chunk_size=1 (random rows via h5py)",
             "anndata_rows": "random rows, anndata X[rows] (pyro_livi before)",
             "annloader": "anndata AnnLoader", "scvi": "scvi-tools AnnDataLoader"}
    for r in loaders:
        print(f"| {r['n_cells']:,} | {names[r['loader']]} | {r['cells_per_s']:,.0f} | {r['cells']:,} | "
              f"{'yes' if r['epoch_done'] else 'no'} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
