"""The MOFA-like model of the zoo beside mofapy2 0.7.5, on planted data and on a real CITE-seq set.

Run with the separate environment that holds mofapy2 (see benchmarks/README.md)::

    /work/venv-mofa/bin/python benchmarks/bench_mofa.py [--data ../shared/data/citeseq/pbmc10k_cite.h5mu]

For each data set mofapy2 and the zoo's ``mofa`` (once per prior of ``--priors``: by default the
zoo's default, the regularised horseshoe, and its spike-and-slab, the prior family mofapy2 uses)
are fitted with the same K on every cell, one after the other in one run, each in its own forked process (time: wall clock of the fit; memory: peak resident set
size of that process above its size at the fork, from /proc/self/status VmHWM; the 1-minute load
average of the machine at the start and end of each fit is printed beside them). Every fit uses
one thread.

Reported per data set: per-view total R2 of each model (mofapy2: its own
``calculate_variance_explained``; zoo: :func:`pyro_livi.analysis.factors.variance_explained`,
the same definition), the top 5 active mofapy2 factors (by total R2; active: R2 >= 1e-3 in some view) matched one to one to the zoo's
factors by |Pearson r| of the factor values (Hungarian assignment), the multiple correlation of
each of them with all the zoo's factors, and the canonical correlations between the span of
those 5 factors and the span of the zoo's factors (agreement of the subspaces, whatever the
rotation within them: 1 for every direction the zoo also spans), time and peak memory.
Planted data also get |r| of each model's best match to every true factor.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import multiprocessing as mp  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from machine import cpu_model  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

from pyro_livi.simulate import simulate_factor_views as planted  # noqa: E402

DATA = Path(os.environ.get("PYRO_LIVI_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _in_child(fn, *args):
    """Run ``fn(*args)`` in a forked process; returns (result, seconds, peak MiB above start)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def target():
        start = _rss_kib("VmRSS")
        load = os.getloadavg()[0]
        t = time.perf_counter()
        out = fn(*args)
        seconds = time.perf_counter() - t
        out["load"] = (load, os.getloadavg()[0])
        child.send((out, seconds, (_rss_kib("VmHWM") - start) / 1024))
        child.close()

    proc = ctx.Process(target=target)
    proc.start()
    result = parent.recv()
    proc.join()
    return result


def fit_mofapy2(views: dict, K: int, seed: int = 0):
    """mofapy2 0.7.5 with its defaults (ARD + spike-and-slab weights, Gaussian views, features
    centred, views not scaled, convergence_mode "fast", at most 1000 iterations)."""
    from mofapy2.run.entry_point import entry_point

    ent = entry_point()
    ent.set_data_options(scale_views=False, center_groups=True)
    ent.set_data_matrix([[np.asarray(Y, dtype=np.float64)] for Y in views.values()],
                        likelihoods=["gaussian"] * len(views), views_names=list(views))
    ent.set_model_options(factors=K, spikeslab_weights=True, ard_weights=True)
    ent.set_train_options(iter=1000, convergence_mode="fast", seed=seed, verbose=False, quiet=True)
    ent.build()
    ent.run()
    model = ent.model
    Z = model.nodes["Z"].getExpectation()
    r2 = np.asarray(model.calculate_variance_explained())[0]  # (views, factors), one group
    total = np.asarray(model.calculate_variance_explained(total=True))[0]
    return {"Z": Z, "r2": r2, "total": total, "K": Z.shape[1]}


def fit_zoo(data, spec_kwargs: dict, K: int, epochs: int, batch_size: int, patience=None, prior="horseshoe",
            seed: int = 0):
    import torch

    torch.set_num_threads(1)
    from pyro_livi.analysis.factors import variance_explained
    from pyro_livi.analysis.latents import cell_state
    from pyro_livi.run import fit

    result = fit(data, model="mofa", n_factors=K, prior=prior, epochs=epochs, batch_size=batch_size, seed=seed,
                 patience=patience, train_size=1.0, progress=False, **spec_kwargs)
    ve = variance_explained(result.model, result.dataset)
    Z = cell_state(result.model, result.dataset)
    return {"Z": Z, "r2": ve.per_factor.sort_index(key=lambda i: i.str[2:].astype(int)).to_numpy().T,
            "total": ve.total.to_numpy(), "inactive": ve.inactive, "epochs": len(result.history)}


def match(Za, Zb, top):
    """One-to-one matching of the columns ``top`` of Za to columns of Zb maximising sum |r|."""
    A = _abs_r(Za, Zb)[top]
    rows, cols = linear_sum_assignment(-A)
    return [(top[r], int(c), float(A[r, c])) for r, c in zip(rows, cols)]


def multiple_r(Za, Zb):
    """For each column of Za, the correlation between it and its least-squares fit on all
    columns of Zb (with an intercept): 1 when the factor lies in the span of the other model's
    factors, whatever the rotation."""
    X = np.column_stack([np.ones(len(Zb)), Zb])
    fit = X @ np.linalg.lstsq(X, Za, rcond=None)[0]
    return np.array([np.corrcoef(Za[:, k], fit[:, k])[0, 1] for k in range(Za.shape[1])])


def canonical_correlations(Za, Zb):
    """Canonical correlations between the column spans of Za and Zb (each centred), largest
    first: cosines of the principal angles between the two subspaces of cell space. Constant
    columns (factors switched off) span nothing."""
    spans = []
    for Z in (Za, Zb):
        Z = Z - Z.mean(0)
        Z = Z[:, Z.std(0) > 0]
        spans.append(np.linalg.qr(Z)[0])
    return np.linalg.svd(spans[0].T @ spans[1], compute_uv=False)


def _abs_r(truth, fitted):
    K = truth.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(np.nan_to_num(np.corrcoef(truth.T, fitted.T)[:K, K:]))


def report(name, views, ref, zoos: dict, truth=None):
    """Markdown comparison of the mofapy2 fit ``ref`` with the zoo fits ``zoos`` ({label: fit})."""
    fmt = lambda xs: ", ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    labels = list(zoos)
    lines = [f"### {name}", "", "| view | R2 total mofapy2 | " + " | ".join(
        f"R2 total {lab} (difference)" for lab in labels) + " |", "|---" * (2 + len(labels)) + "|"]
    for v, m in enumerate(views):
        lines.append(f"| {m} | {ref['total'][v]:.4f} | " + " | ".join(
            f"{z['total'][v]:.4f} ({z['total'][v] - ref['total'][v]:+.4f})" for z in zoos.values()) + " |")
    order = [int(k) for k in np.argsort(-ref["r2"].sum(0)) if ref["r2"][:, k].max() >= 1e-3]
    top = order[:5]
    for label, zoo in zoos.items():
        lines += ["", f"{label}:", "", f"| mofapy2 factor (rank by total R2) | R2 per view (mofapy2) | {label} factor "
                  "| R2 per view | abs(r) | multiple R on all its factors |", "|---|---|---|---|---|---|"]
        multiple = multiple_r(ref["Z"], zoo["Z"])
        for rank, (a, b, r) in enumerate(sorted(match(ref["Z"], zoo["Z"], top), key=lambda t: top.index(t[0]))):
            lines.append(f"| {a} (#{rank + 1}) | {fmt(ref['r2'][:, a])} | z_{b} | {fmt(zoo['r2'][:, b])} | {r:.3f} "
                         f"| {multiple[a]:.3f} |")
        lines += ["", f"canonical correlations, span of mofapy2's top {len(top)} factors vs all {label} factors: "
                  f"{fmt(canonical_correlations(ref['Z'][:, top], zoo['Z']))}; "
                  f"span of mofapy2's {len(order)} active factors vs all {label} factors: "
                  f"{fmt(canonical_correlations(ref['Z'][:, order], zoo['Z']))}",
                  f"inactive (R2 < 1e-3 in every view): {', '.join(zoo['inactive']) or 'none'}; "
                  f"{zoo['epochs']} epochs"]
    lines += ["", f"mofapy2: {len(order)} active factors (R2 >= 1e-3 in some view) of {ref['K']}"]
    if truth is not None:
        for label, fitted in (("mofapy2", ref), *zoos.items()):
            lines.append(f"best abs(r) to each true factor, {label}: {fmt(_abs_r(truth, fitted['Z']).max(1))}")
    lines += ["", "| | time (s) | peak memory above start (MiB) | load average at start, end |", "|---|---|---|---|"]
    for label, fitted in (("mofapy2", ref), *zoos.items()):
        lines.append(f"| {label} | {fitted['seconds']:.1f} | {fitted['mib']:.0f} | "
                     f"{fitted['load'][0]:.1f}, {fitted['load'][1]:.1f} |")
    return "\n".join(lines + [""])


def _fit_all(views, mdata, spec, K, epochs, batch_size, patience, priors):
    """mofapy2, then the zoo model once per prior, each in its own child process."""
    ref, s, mib = _in_child(fit_mofapy2, views, K)
    ref.update(seconds=s, mib=mib)
    zoos = {}
    for prior in priors:
        zoo, s, mib = _in_child(fit_zoo, mdata, spec, K, epochs, batch_size, patience, prior)
        zoo.update(seconds=s, mib=mib)
        zoos[f"zoo MOFA, {prior}"] = zoo
    return ref, zoos


def run_planted(K: int, epochs: int, patience, priors):
    import anndata as ad
    import mudata as md

    Z, _, Ys = planted()
    views = {"v0": Ys[0], "v1": Ys[1]}
    obs = pd.DataFrame(index=[f"c{i}" for i in range(Z.shape[0])])
    mdata = md.MuData({m: ad.AnnData(Y, obs=obs.copy(), var=pd.DataFrame(index=[f"{m}_{j}" for j in range(Y.shape[1])]))
                       for m, Y in views.items()})
    spec = dict(modalities={"v0": None, "v1": None}, continuous_modalities=["v0", "v1"])
    ref, zoos = _fit_all(views, mdata, spec, K, epochs, Z.shape[0], patience, priors)
    return report(f"Planted: 300 cells, views of 200 and 50 features, 3 true factors, K = {K}",
                  list(views), ref, zoos, truth=Z)


def run_citeseq(path: Path, K: int, epochs: int, batch_size: int, patience, priors):
    import mudata as md

    from pyro_livi.preprocessing import preprocess

    mdata = preprocess(md.read_h5mu(path), rna="lognorm_hvg", prot="clr")
    views = {}
    for m in ("rna", "prot"):
        X = mdata.mod[m].X
        views[m] = np.asarray(X.todense() if hasattr(X, "todense") else X, dtype=np.float32)
    spec = dict(modalities={"rna": None, "prot": None}, continuous_modalities=["rna", "prot"])
    ref, zoos = _fit_all(views, mdata, spec, K, epochs, batch_size, patience, priors)
    shape = ", ".join(f"{m} {v.shape[0]} x {v.shape[1]}" for m, v in views.items())
    return report(f"{path.name}: log-normalised HVG RNA + CLR protein ({shape}), K = {K}",
                  list(views), ref, zoos)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA / "citeseq" / "pbmc10k_cite.h5mu")
    parser.add_argument("--factors", type=int, default=10, help="K on the CITE-seq data")
    parser.add_argument("--epochs", type=int, default=600, help="epochs of the zoo model, planted data")
    parser.add_argument("--epochs-real", type=int, default=200, help="epochs of the zoo model, CITE-seq data")
    parser.add_argument("--patience", type=int, default=None,
                        help="early stopping of the zoo model (default: none, every epoch runs)")
    parser.add_argument("--batch-size", type=int, default=1024, help="zoo minibatch on the CITE-seq data")
    parser.add_argument("--priors", default="horseshoe,spike_slab",
                        help="priors of the zoo model, comma-separated, one fit each (default: the zoo's "
                             "default, the horseshoe, and the spike-and-slab of mofapy2's prior family)")
    parser.add_argument("--skip-real", action="store_true")
    args = parser.parse_args(argv)
    import mofapy2
    import torch

    print(f"# bench_mofa.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"mofapy2 {getattr(mofapy2, '__version__', '0.7.5')}, torch {torch.__version__}, python "
          f"{sys.version.split()[0]}; one thread each; {cpu_model()}, {os.cpu_count()} cores, "
          f"load average (1, 5, 15 min) {', '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    priors = [p.strip() for p in args.priors.split(",") if p.strip()]
    print(run_planted(6, args.epochs, args.patience, priors), flush=True)
    if not args.skip_real:
        if not args.data.exists():
            print(f"{args.data} not found: set PYRO_LIVI_DATA or --data")
            return 1
        print(run_citeseq(args.data, args.factors, args.epochs_real, args.batch_size, args.patience, priors),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
