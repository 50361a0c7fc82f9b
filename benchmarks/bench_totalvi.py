"""TOTALVI of pyro_livi side by side with scvi-tools' TOTALVI on real CITE-seq data.

Data: ``citeseq/pbmc10k_cite.h5mu`` (6,855 cells, 4,000 genes, 14 proteins) from the shared data
folder. Both fits use the same 90/10 cell split (:func:`pyro_livi.analysis.heldout.split_cells`,
seed 0), latent size 20, encoder 2 x 256, decoders 1 x 256, batch 256, Adam lr 4e-3, the same
number of epochs (``--epochs``, default 50), a KL warm-up over 0.75 x 6,855 optimiser steps, no
early stopping and no learning-rate schedule, 2 torch threads. Each fit runs in its own child
process (so its peak resident memory is its own), in interleaved order (pyro, scvi, pyro, scvi,
... for ``--rounds``), and reports:

- held-out negative log-likelihood per cell of the genes and of the proteins, and the held-out
  negative ELBO per cell (one guide draw per cell, averaged over 5 passes; KL at full weight);
- training cells/s (cells x epochs / training wall time);
- peak resident memory of the process (MiB);
- the per-protein Spearman correlation, over held-out cells, of the two fits' protein
  foreground probabilities (25 posterior draws each).

Run with an environment that has both packages (scvi-tools 1.4.2 and pyro_livi)::

    /work/venv-scvi/bin/python benchmarks/bench_totalvi.py --epochs 50 --out /tmp/bench_totalvi

Writes ``results.tsv`` (one row per fit), ``spearman.tsv`` (per protein) and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

N_LATENT, N_HIDDEN, BATCH, LR, THREADS = 20, 256, 256, 4e-3, 2


def _data():
    import mudata as md

    from pyro_livi.paths import shared_data_dir

    path = shared_data_dir() / "citeseq" / "pbmc10k_cite.h5mu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return path, md.read_h5mu(path)


def _split(n_cells: int):
    from pyro_livi.analysis.heldout import split_cells

    return split_cells(n_cells, test_fraction=0.1, seed=0)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_pyro(epochs: int, out: Path) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    from pyro_livi.analysis.totalvi_outputs import totalvi_tables
    from pyro_livi.data import DatasetSpec, MinibatchLoader, read_dataset
    from pyro_livi.infer import Trainer, TrainingConfig, elbo_terms, seed_everything
    from pyro_livi.models import TOTALVI
    from pyro_livi.run import build_model

    path, mdata = _data()
    dataset = read_dataset(mdata, DatasetSpec(modalities={"rna": None, "prot": None}))
    train, test = _split(dataset.n_cells)
    train_ds, test_ds = dataset.subset(train), dataset.subset(test)
    seed_everything(0)
    model = build_model("totalvi", train_ds, n_latent=N_LATENT, n_hidden=N_HIDDEN, n_layers_encoder=2,
                        n_layers_decoder=1)
    stages = TOTALVI.default_stages(epochs=epochs, patience=None, n_cells=dataset.n_cells)
    trainer = Trainer(model, train_ds, stages, TrainingConfig(batch_size=BATCH, lr=LR, seed=0, progress=False))
    start = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - start
    model.eval()
    sums: dict[str, float] = {}
    n_test = test_ds.n_cells
    with torch.no_grad():
        for _ in range(5):
            for batch in MinibatchLoader(test_ds, batch_size=BATCH, shuffle=False):
                for k, v in elbo_terms(model.model, model.guide, batch).items():
                    sums[k] = sums.get(k, 0.0) + float(v) * batch.size / n_test / n_test / 5
    fg = totalvi_tables(model, test_ds, n_samples=25)["protein_foreground_probability"]
    np.save(out / "fg_pyro.npy", fg.to_numpy())
    return {"fit": "pyro_livi", "epochs": epochs, "nll_rna": sums["nll_obs_rna"], "nll_prot": sums["nll_obs_prot"],
            "neg_elbo": sum(sums.values()), "cells_per_s": len(train) * epochs / elapsed,
            "train_s": elapsed, "peak_mib": _peak_mib(), "proteins": list(fg.columns)}


def run_scvi(epochs: int, out: Path) -> dict:
    import scvi
    import torch

    torch.set_num_threads(THREADS)
    scvi.settings.seed = 0
    torch.set_num_threads(THREADS)
    path, mdata = _data()
    rna, prot = mdata.mod["rna"], mdata.mod["prot"]
    adata = rna.copy()
    adata.obsm["protein_expression"] = pd.DataFrame(np.asarray(prot.X.todense() if hasattr(prot.X, "todense")
                                                               else prot.X), index=adata.obs_names,
                                                    columns=list(map(str, prot.var_names)))
    train, test = _split(adata.n_obs)
    a_train, a_test = adata[train].copy(), adata[test].copy()
    scvi.model.TOTALVI.setup_anndata(a_train, protein_expression_obsm_key="protein_expression")
    model = scvi.model.TOTALVI(a_train, n_latent=N_LATENT)
    start = time.perf_counter()
    model.train(max_epochs=epochs, lr=LR, batch_size=BATCH, train_size=1.0, early_stopping=False,
                reduce_lr_on_plateau=False, n_steps_kl_warmup=round(0.75 * adata.n_obs),
                accelerator="cpu", devices=1, enable_progress_bar=False)
    elapsed = time.perf_counter() - start
    model.module.eval()
    a_test = model._validate_anndata(a_test)
    sums = {"nll_rna": 0.0, "nll_prot": 0.0, "kl": 0.0}
    with torch.no_grad():
        for _ in range(5):
            for tensors in model._make_data_loader(adata=a_test, batch_size=BATCH):
                _, _, losses = model.module(tensors, loss_kwargs={"kl_weight": 1.0})
                rec = losses.reconstruction_loss
                sums["nll_rna"] += float(rec["reconst_loss_gene"].sum()) / len(test) / 5
                sums["nll_prot"] += float(rec["reconst_loss_protein"].sum()) / len(test) / 5
                sums["kl"] += float(sum(v.sum() for v in losses.kl_local.values())) / len(test) / 5
    fg = model.get_protein_foreground_probability(a_test, n_samples=25, return_mean=True)
    np.save(out / "fg_scvi.npy", np.asarray(fg))
    return {"fit": "scvi-tools", "epochs": epochs, "nll_rna": sums["nll_rna"], "nll_prot": sums["nll_prot"],
            "neg_elbo": sums["nll_rna"] + sums["nll_prot"] + sums["kl"],
            "cells_per_s": len(train) * epochs / elapsed, "train_s": elapsed, "peak_mib": _peak_mib(),
            "proteins": list(map(str, fg.columns))}


def _markdown(frame: pd.DataFrame) -> str:
    """A pipe table of ``frame`` (index included)."""
    head = [frame.index.name or ""] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, row in frame.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [f"{v:.3f}" if isinstance(v, float) else str(v)
                                                     for v in row]) + " |")
    return "\n".join(lines)


def summarise(rows: list[dict], out: Path, epochs: int, rounds: int) -> str:
    """Write results.tsv, spearman.tsv and summary.md from the fits' rows; returns the summary."""
    from scipy.stats import spearmanr

    proteins = rows[0]["proteins"]
    table = pd.DataFrame([{k: v for k, v in row.items() if k != "proteins"} for row in rows])
    table.to_csv(out / "results.tsv", sep="\t", index=False)
    a, b = np.load(out / "fg_pyro.npy"), np.load(out / "fg_scvi.npy")
    rho = pd.Series([spearmanr(a[:, t], b[:, t])[0] for t in range(a.shape[1])], index=proteins, name="spearman")
    rho.index.name = "protein"
    rho.to_csv(out / "spearman.tsv", sep="\t")
    mean = table.groupby("fit")[["nll_rna", "nll_prot", "neg_elbo", "cells_per_s", "peak_mib"]].mean()
    text = "\n".join([
        f"# TOTALVI: pyro_livi vs scvi-tools 1.4.2, pbmc10k_cite, {epochs} epochs, {rounds} interleaved round(s)",
        "", _markdown(mean), "",
        f"median per-protein foreground Spearman: {rho.median():.3f} (min {rho.min():.3f})", "",
        _markdown(rho.to_frame())]) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--rounds", type=int, default=1, help="interleaved (pyro, scvi) pairs")
    p.add_argument("--out", default="/tmp/bench_totalvi")
    p.add_argument("--worker", choices=("pyro", "scvi"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        row = (run_pyro if args.worker == "pyro" else run_scvi)(args.epochs, out)
        print("RESULT " + json.dumps(row))
        return 0
    rows = []
    for r in range(args.rounds):
        for which in ("pyro", "scvi"):
            proc = subprocess.run([sys.executable, __file__, "--worker", which, "--epochs", str(args.epochs),
                                   "--out", str(out)], capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                raise SystemExit(f"{which} fit failed")
            row = json.loads(lines[-1][len("RESULT "):])
            row["round"] = r
            rows.append(row)
            print(which, {k: v for k, v in row.items() if k != "proteins"}, flush=True)
    summarise(rows, out, args.epochs, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
