"""Association at genome scale: the scan of this package against glimix-core called factor
by factor, and against the bound of one shared rotation ``Q^T G``.

Simulates a PLINK fileset (default 1,000 donors x 20,000 SNPs, allele frequencies
U(0.05, 0.5), redrawn until every SNP passes the QC, no missing calls) in a temporary
folder, a kinship from those SNPs (given to the association, so no
leave-one-chromosome-out pass), 2 covariates and donor factors with kinship variance
(heritability U(0.1, 0.6)) plus a few SNP effects. For 1 / 10 / 100 factors it measures

- **this package**: ``associate_factors(factors, PlinkReader(prefix), kinship=K,
  covariates=C, pvalue_method="lrt")`` (at 1,000 donors ``"auto"`` also picks the LRT,
  the test of glimix-core's p-values), end to end (PLINK read by chunks, QC,
  eigendecomposition of the kinship, null fits of all factors at once, the scan, BH over
  all pairs, the results table; fastest of ``--repeats``), and a breakdown of the same
  stages timed one by one;
- **glimix-core factor by factor** (what the reference LIVI analysis does): one
  ``economic_qs`` of the kinship, then per factor ``LMM(y, M, QS).fit()``,
  ``get_fast_scanner().fast_scan(G)`` and the LRT p-values, on the genotypes already in
  memory (reading them is not counted);
- **the bound**: ``Q0^T G`` over the same chunks, genotypes in memory: one rotation of
  every SNP, shared by all factors;
- peak memory of this package: the peak resident set size (``VmHWM``) minus the
  resident size just before the call, in a fresh process (inputs loaded, modules
  imported), at half and all of the SNPs (glimix-core holds the whole genotype matrix,
  8 bytes x donors x SNPs, in memory);
- the agreement of the p-values: largest relative difference and largest difference of
  -log10 p between this package and glimix-core;
- wall time and the process's CPU time (all threads), and the load average before and
  after each measurement (the machine may be shared);
- an extrapolation to ``--extrapolate-snps`` (default 1,000,000) SNPs: this package's
  end-to-end time is also measured on the first half of the SNPs and extended along
  that line (a fixed cost per run plus a cost per SNP); glimix-core: ``economic_qs``
  and the null fits once, ``fast_scan`` scaled by the number of SNPs; the bound scaled
  by the number of SNPs.

    python benchmarks/bench_association.py [--threads 2] [--factors 1 10 100]
        [--glimix-factors 1 10 100] [--donors 1000] [--snps 20000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

MIB = 1024 ** 2


# ------------------------------------------------------------------ measurement helpers


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Measure:
    """Wall time, CPU time, peak RSS above the start, load averages of one block."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.rss0 = _status_kib("VmRSS")
        self.load0 = os.getloadavg()[0]
        self.cpu0 = time.process_time()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.cpu0
        self.peak_mib = (_status_kib("VmHWM") - self.rss0) / 1024
        self.load1 = os.getloadavg()[0]


class Clock:
    """Accumulated wall and CPU seconds of named stages."""

    def __init__(self):
        self.wall: dict = {}
        self.cpu: dict = {}

    def time(self, name, func, *args, **kwargs):
        t, c = time.perf_counter(), time.process_time()
        out = func(*args, **kwargs)
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - t
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
        return out


# ------------------------------------------------------------------ data


def simulate(folder: Path, n: int, m: int, max_factors: int, seed: int = 0):
    from bed_reader import to_bed

    from pyro_livi.data.kinship import kinship_from_genotypes

    rng = np.random.default_rng(seed)
    freq = rng.uniform(0.05, 0.5, m)
    G = rng.binomial(2, freq, size=(n, m)).astype(np.float32)
    while True:                     # every SNP passes QC (sample MAF >= 0.05)
        f = G.mean(axis=0) / 2
        low = np.minimum(f, 1 - f) < 0.05
        if not low.any():
            break
        G[:, low] = rng.binomial(2, 0.3, size=(n, int(low.sum())))
    donors = [f"donor{i:05d}" for i in range(n)]
    for name, cols in (("geno", m), ("half", m // 2)):
        to_bed(folder / f"{name}.bed", np.ascontiguousarray(G[:, :cols]), properties={
            "iid": donors, "sid": [f"rs{j}" for j in range(cols)],
            "chromosome": ["1"] * cols, "bp_position": list(range(1, cols + 1))})
    G = G.astype(np.float64)
    K = kinship_from_genotypes(G)
    w, V = np.linalg.eigh(K)
    L = V * np.sqrt(np.clip(w, 0, None))
    cov = pd.DataFrame(rng.normal(size=(n, 2)), index=donors, columns=["pc1", "pc2"])
    cols = {}
    for k in range(max_factors):
        h = rng.uniform(0.1, 0.6)
        y = np.sqrt(h) * (L @ rng.normal(size=n)) + np.sqrt(1 - h) * rng.normal(size=n)
        j = rng.integers(m)
        cols[f"D_{k}"] = y + 0.15 * (G[:, j] - G[:, j].mean()) + 0.3 * cov["pc1"]
    factors = pd.DataFrame(cols, index=donors)
    return G, pd.DataFrame(K, index=donors, columns=donors), cov, factors


# ------------------------------------------------------------------ the three methods


def run_package(prefix, factors, K, cov, chunk_size, repeats):
    """End to end; the run with the smallest wall time of ``repeats``."""
    from pyro_livi.analysis.association import associate_factors
    from pyro_livi.data.genotypes import PlinkReader

    best = None
    for _ in range(repeats):
        with PlinkReader(prefix) as reader, Measure() as meas:
            res, rep = associate_factors(factors, reader, kinship=K, covariates=cov,
                                         chunk_size=chunk_size, pvalue_method="lrt",
                                         progress=False)
        if best is None or meas.wall < best[2].wall:
            best = (res, rep, meas)
    return best


def breakdown(prefix, factors, K, cov, chunk_size, pvalue_method):
    """The stages of the package's scan, timed one by one (same computations)."""
    from pyro_livi.analysis.association import KinshipBasis, ScanPlan, fit_null_models
    from pyro_livi.analysis.association_chunks import ChunkSource
    from pyro_livi.data.genotypes import PlinkReader, qc_dosage_block

    clock = Clock()
    C = cov.to_numpy()
    M = np.column_stack([np.ones(len(C)), (C - C.mean(0)) / C.std(0)])
    with PlinkReader(prefix) as reader:
        source = ChunkSource.from_genotypes(reader, list(factors.index))
        basis = clock.time("eigendecomposition of the kinship", KinshipBasis,
                           K.to_numpy(), M)
        models = clock.time("null fits (all factors)", fit_null_models,
                            factors.to_numpy(), M, basis, list(factors.columns))
        plan = ScanPlan(models, basis, [pvalue_method] * len(models))
        for start in range(0, reader.n_snps, chunk_size):
            idx = np.arange(start, min(start + chunk_size, reader.n_snps))
            dos = clock.time("read PLINK chunks", source.read, idx)
            block = clock.time("SNP QC", qc_dosage_block, dos, 0.05, copy=False)
            rot = clock.time("rotation Q0^T G", plan.rotate, block.dosages)
            clock.time("tests of all factors", plan.scan, rot)
    return clock


def run_glimix(G, factors, K, cov):
    """glimix-core factor by factor; returns p-values (factors x SNPs) and times."""
    from glimix_core.lmm import LMM
    from numpy_sugar.linalg import economic_qs
    from scipy import stats

    n = len(factors)
    C = cov.to_numpy()
    M = np.column_stack([np.ones(n), (C - C.mean(0)) / C.std(0)])
    clock = Clock()
    P = np.empty((factors.shape[1], G.shape[1]))
    with Measure() as meas:
        # the intercept direction of the centred kinship gets variance 1, as in the
        # package (without it the ML fit is unbounded)
        QS = clock.time("economic_qs", economic_qs, K.to_numpy() + np.ones((n, n)) / n)
        for k, c in enumerate(factors.columns):
            y = factors[c].to_numpy()
            lmm = LMM(y / y.std(), M, QS, restricted=False)
            clock.time("null fits", lmm.fit, verbose=False)
            scanner = lmm.get_fast_scanner()
            r = clock.time("fast_scan", scanner.fast_scan, G, verbose=False)
            P[k] = stats.chi2(1).sf(np.clip(2 * (r["lml"] - scanner.null_lml()), 0, None))
    return P, clock, meas


def run_bound(G, K, cov, chunk_size, repeats):
    """``Q0^T G`` over the chunks; the smallest wall time of ``repeats``."""
    from pyro_livi.analysis.association import KinshipBasis

    C = cov.to_numpy()
    M = np.column_stack([np.ones(len(C)), (C - C.mean(0)) / C.std(0)])
    Q0 = KinshipBasis(K.to_numpy(), M).Q0
    best = None
    for _ in range(repeats):
        with Measure() as meas:
            for start in range(0, G.shape[1], chunk_size):
                Q0.T @ G[:, start:start + chunk_size]
        if best is None or meas.wall < best.wall:
            best = meas
    return best


CHILD = "--memory-child"


def memory_in_fresh_process(folder: Path, bed: str, n_factors: int, chunk_size: int,
                            threads: int) -> float:
    """Peak RSS increment (MiB) of one ``associate_factors`` run in a fresh process
    (inputs loaded and modules imported before the measurement starts), so that memory
    freed by earlier runs and kept by the allocator does not hide the peak."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, CHILD, str(folder), bed,
                          str(n_factors), str(chunk_size), str(threads)],
                         check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_mib"])


def memory_child(folder: str, bed: str, n_factors: int, chunk_size: int,
                 threads: int) -> None:
    from threadpoolctl import threadpool_limits

    folder = Path(folder)
    K = pd.read_pickle(folder / "kinship.pkl")
    cov = pd.read_pickle(folder / "covariates.pkl")
    factors = pd.read_pickle(folder / "factors.pkl").iloc[:, :n_factors]
    with threadpool_limits(threads):
        run_package(str(folder / bed), factors.iloc[:50, :1].copy(), K.iloc[:50, :50],
                    cov.iloc[:50], chunk_size, 1)                    # imports, warm-up
        _, _, meas = run_package(str(folder / bed), factors, K, cov, chunk_size, 1)
    print(json.dumps({"peak_mib": meas.peak_mib}))


# ------------------------------------------------------------------ main


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        folder, bed, n_factors, chunk, threads = sys.argv[2:7]
        memory_child(folder, bed, int(n_factors), int(chunk), int(threads))
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--donors", type=int, default=1000)
    parser.add_argument("--snps", type=int, default=20000)
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--glimix-factors", type=int, nargs="*", default=None,
                        help="factor counts for which glimix-core runs (default: all of "
                        "--factors)")
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads")
    parser.add_argument("--chunk-size", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the package and "
                        "of the bound per factor count; the fastest is shown (glimix-core "
                        "runs once)")
    parser.add_argument("--extrapolate-snps", type=int, default=1_000_000)
    parser.add_argument("--json", default=None, help="write every number to this file")
    args = parser.parse_args()
    glimix_factors = set(args.factors if args.glimix_factors is None
                         else args.glimix_factors)
    from threadpoolctl import threadpool_info, threadpool_limits

    import glimix_core
    import scipy

    rows, out = [], {"args": vars(args), "runs": []}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(args.threads):
        folder = Path(tmp)
        G, K, cov, all_factors = simulate(folder, args.donors, args.snps,
                                          max(args.factors))
        prefix = str(folder / "geno")
        K.to_pickle(folder / "kinship.pkl")
        cov.to_pickle(folder / "covariates.pkl")
        all_factors.to_pickle(folder / "factors.pkl")
        scale = args.extrapolate_snps / args.snps
        # warm-up: imports and first calls out of the timings
        run_package(prefix, all_factors.iloc[:50, :1].copy(), K.iloc[:50, :50], cov.iloc[:50],
                    args.chunk_size, 1)
        for n_factors in args.factors:
            factors = all_factors.iloc[:, :n_factors]
            res, rep, meas = run_package(prefix, factors, K, cov, args.chunk_size,
                                         args.repeats)
            method = rep["pvalue_method"]["used"]
            clock = breakdown(prefix, factors, K, cov, args.chunk_size, method)
            bound = run_bound(G, K, cov, args.chunk_size, args.repeats)
            _, _, half = run_package(str(folder / "half"), factors, K, cov,
                                     args.chunk_size, args.repeats)
            per_snp = (meas.wall - half.wall) / (args.snps - args.snps // 2)
            per_snp_cpu = (meas.cpu - half.cpu) / (args.snps - args.snps // 2)
            run = {"factors": n_factors, "pvalue_method": method,
                   "package": {"wall": meas.wall, "cpu": meas.cpu,
                               "peak_mib": meas.peak_mib,
                               "load": [meas.load0, meas.load1],
                               "stages_wall": clock.wall, "stages_cpu": clock.cpu,
                               "result_rows": len(res),
                               "result_mib": res.memory_usage(deep=False).sum() / MIB},
                   "bound": {"wall": bound.wall, "cpu": bound.cpu,
                             "load": [bound.load0, bound.load1]}}
            run["package"]["half_snps_wall"] = half.wall
            run["package"]["peak_mib_fresh"] = {
                args.snps // 2: memory_in_fresh_process(folder, "half", n_factors,
                                                        args.chunk_size, args.threads),
                args.snps: memory_in_fresh_process(folder, "geno", n_factors,
                                                   args.chunk_size, args.threads)}
            run["package"]["extrapolated_wall"] = (
                meas.wall + per_snp * (args.extrapolate_snps - args.snps))
            run["package"]["extrapolated_cpu"] = (
                meas.cpu + per_snp_cpu * (args.extrapolate_snps - args.snps))
            if n_factors in glimix_factors:
                P, gclock, gmeas = run_glimix(G, factors, K, cov)
                got = res.pivot(index="factor", columns="snp", values="pvalue")
                got = got.loc[factors.columns, [f"rs{j}" for j in range(args.snps)]]
                got = got.to_numpy()
                rel = np.nanmax(np.abs(got / P - 1))
                dlog = np.nanmax(np.abs(np.log10(got) - np.log10(P)))
                g_once = gclock.wall["economic_qs"] + gclock.wall["null fits"]
                g_once_cpu = gclock.cpu["economic_qs"] + gclock.cpu["null fits"]
                run["glimix"] = {"wall": gmeas.wall, "cpu": gmeas.cpu,
                                 "peak_mib": gmeas.peak_mib,
                                 "load": [gmeas.load0, gmeas.load1],
                                 "stages_wall": gclock.wall,
                                 "pvalue_max_rel_diff": float(rel),
                                 "pvalue_max_abs_log10_diff": float(dlog),
                                 "extrapolated_wall": g_once + (gmeas.wall - g_once) * scale,
                                 "extrapolated_cpu": (g_once_cpu
                                                      + (gmeas.cpu - g_once_cpu) * scale)}
            out["runs"].append(run)
            rows.append(run)
            print(f"done: {n_factors} factors", file=sys.stderr)
    load_end = os.getloadavg()

    blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads)"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores; Python "
          f"{platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
          f"glimix-core {glimix_core.__version__}; BLAS {', '.join(blas) or 'unknown'}, "
          f"limited to {args.threads} thread(s)")
    print(f"Data: {args.donors} donors x {args.snps} SNPs (PLINK, simulated), 2 covariates, "
          f"given kinship; chunks of {args.chunk_size} SNPs; load average (1 min) "
          f"{load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end\n")
    print("| factors | this package s (CPU s) | glimix-core factor by factor s (CPU s) | "
          "bound Q0^T G s (CPU s) | package / bound (wall, CPU) | glimix / package | "
          f"package peak RSS +MiB at {args.snps // 2:,} / {args.snps:,} SNPs | "
          "p-values: max rel diff, max abs diff -log10 p | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p, b, g = r["package"], r["bound"], r.get("glimix")
        gl = f"{g['wall']:.1f} ({g['cpu']:.1f})" if g else "not run"
        ratio = f"{g['wall'] / p['wall']:.1f}" if g else ""
        fresh = p["peak_mib_fresh"]
        mem = f"{fresh[args.snps // 2]:.0f} / {fresh[args.snps]:.0f}"
        agree = (f"{g['pvalue_max_rel_diff']:.1e}, {g['pvalue_max_abs_log10_diff']:.1e}"
                 if g else "")
        loads = [*p["load"], *b["load"], *(g["load"] if g else [])]
        print(f"| {r['factors']} | {p['wall']:.2f} ({p['cpu']:.2f}) | {gl} | "
              f"{b['wall']:.2f} ({b['cpu']:.2f}) | {p['wall'] / b['wall']:.1f}, "
              f"{p['cpu'] / b['cpu']:.1f} | {ratio} | {mem} | {agree} | "
              f"{min(loads):.1f}-{max(loads):.1f} |")
    print("\nWhere the package's time goes (stages timed one by one; wall s, CPU s in "
          "brackets; 'rest' = end-to-end minus the stages: results table, "
          "Benjamini-Hochberg, lambda_gc, input checks):\n")
    stages = list(rows[0]["package"]["stages_wall"])
    print("| factors | " + " | ".join(stages) + " | rest |")
    print("|---" * (len(stages) + 2) + "|")
    for r in rows:
        p = r["package"]
        rest = p["wall"] - sum(p["stages_wall"].values())
        cells = [f"{p['stages_wall'][s]:.2f} ({p['stages_cpu'][s]:.2f})" for s in stages]
        print(f"| {r['factors']} | " + " | ".join(cells) + f" | {rest:.2f} |")
    print(f"\nExtrapolated to {args.extrapolate_snps:,} SNPs (this package: along the "
          f"line through its end-to-end times at {args.snps // 2:,} and {args.snps:,} "
          "SNPs; glimix-core: economic_qs + null fits once, fast_scan x SNPs; bound x "
          "SNPs):\n")
    print("| factors | this package min (CPU min) | glimix-core factor by factor min "
          "(CPU min) | bound min (CPU min) | package / bound (wall, CPU) | results table "
          "(rows, MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        p, b, g = r["package"], r["bound"], r.get("glimix")
        ext_b, ext_bc = b["wall"] * scale, b["cpu"] * scale
        g_txt = (f"{g['extrapolated_wall'] / 60:.1f} ({g['extrapolated_cpu'] / 60:.1f})"
                 if g else "not run")
        print(f"| {r['factors']} | {p['extrapolated_wall'] / 60:.1f} "
              f"({p['extrapolated_cpu'] / 60:.1f}) | {g_txt} | {ext_b / 60:.1f} "
              f"({ext_bc / 60:.1f}) | {p['extrapolated_wall'] / ext_b:.1f}, "
              f"{p['extrapolated_cpu'] / ext_bc:.1f} | "
              f"{p['result_rows'] * scale:,.0f}, {p['result_mib'] * scale:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
