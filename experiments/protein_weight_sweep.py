"""RNA / protein reconstruction trade-off across protein weights (seed 001, Fig. 4a).

Fits LIVI (RNA only), MultiSLIVI and DMLIVI at protein weights lambda_prot in {1, 50, 200}
(lambda_RNA = 1) on the 10x PBMC 10k CITE-seq data and reports the held-out negative
log-likelihood per feature of each modality.

Data: ``citeseq/pbmc10k_cite.h5mu`` from the shared data folder (6,855 cells, 4,000 genes,
14 proteins, raw counts). It comes from a single donor, so a constant donor column
(``donor = "pbmc10k"``) is added in memory; the donor factors D and V then describe that one
donor (they act as per-feature offsets) and the comparison is about the cell state and the
decoders. The RNA is reduced to the ``--n-genes`` most variable genes (scanpy, Seurat
flavour, on log-normalised counts); cells left with no RNA count are dropped and counted.

Every model uses the same link of the cell state into its decoders and interaction
(``--link``, identity by default: the decoders act on c as in seed 001 eq. 3, 7 and 14), so the
three models differ only in their encoders, latents and protein decoders. With one donor the
interaction term is a linear map of the cell state in all three.

Split: a seeded 20% of the cells is held out (:func:`pyro_livi.analysis.heldout.split_cells`);
every model trains on the same 80% and is scored on the same 20%: the guide encodes each
held-out cell, the model is evaluated at the posterior means, and the NLL is averaged over
cells and features (:func:`pyro_livi.analysis.heldout.heldout_nll`).

Outputs in ``--out``: ``protein_weight_sweep.tsv`` (one row per fit), ``tradeoff.png``
(RNA NLL vs protein NLL, one line per model across lambda_prot, LIVI as a reference line),
``history_<fit>.tsv``. Run::

    python experiments/protein_weight_sweep.py   # about 10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mudata as md  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scanpy as sc  # noqa: E402
import torch  # noqa: E402

from pyro_livi.analysis.heldout import heldout_nll, nll_summary, split_cells  # noqa: E402
from pyro_livi.data import DatasetSpec, read_dataset  # noqa: E402
from pyro_livi.infer import Trainer, TrainingConfig, seed_everything  # noqa: E402
from pyro_livi.models import livi_stages  # noqa: E402
from pyro_livi.paths import shared_data_dir  # noqa: E402
from pyro_livi.run import build_model  # noqa: E402

DONOR = "pbmc10k"


def load_pbmc(path: Path, n_genes: int) -> tuple[md.MuData, dict]:
    """The CITE-seq MuData with a constant donor column and the ``n_genes`` most variable
    genes; returns it with a note of what was changed."""
    mdata = md.read_h5mu(path)
    rna, prot = mdata.mod["rna"], mdata.mod["prot"]
    logged = rna.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    sc.pp.highly_variable_genes(logged, n_top_genes=n_genes, flavor="seurat")
    rna = rna[:, logged.var["highly_variable"].to_numpy()].copy()
    totals = np.asarray(rna.X.sum(1)).ravel()
    keep = totals > 0
    with md.set_options(pull_on_update=False):
        out = md.MuData({"rna": rna[keep].copy(), "prot": prot[keep].copy()})
    out.obs["donor"] = DONOR
    notes = {"cells_in_file": int(mdata.n_obs), "genes_in_file": int(mdata.mod["rna"].n_vars),
             "genes_used": int(rna.n_vars), "cells_dropped_no_rna_count": int((~keep).sum()),
             "cells_used": int(keep.sum()), "proteins": int(prot.n_vars)}
    return out, notes


def fit_one(name: str, model: str, dataset, train, test, *, weight: float | None, args) -> dict:
    """Train one model on the cells ``train`` and score it on ``test``."""
    seed_everything(args.seed)
    options = dict(n_dxc=args.n_dxc, n_persistent=args.n_persistent, link=args.link)
    if model == "dmlivi":
        options["interaction_link"] = args.link
    if model == "livi":
        options.update(n_cell_state=args.n_cell_state, encoder_hidden=(args.hidden,))
    elif model == "multislivi":
        options.update(n_cell_state=args.n_cell_state, encoder_hidden=(args.hidden,),
                       modality_weights={"rna": 1.0, "prot": weight})
    else:
        options.update(n_shared=args.n_cell_state, modality_weights={"rna": 1.0, "prot": weight},
                       shared_encoder_hidden={"rna": (args.hidden,), "prot": (64,)},
                       specific_encoder_hidden={"rna": (64,), "prot": (32,)})
    train_set = dataset.subset(train)
    net = build_model(model, train_set, **options)
    stages = livi_stages(args.epochs_vae, args.epochs, patience=args.patience)
    config = TrainingConfig(batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=False)
    start = time.perf_counter()
    history = Trainer(net, train_set, stages, config).fit()
    seconds = time.perf_counter() - start
    history.to_csv(Path(args.out) / f"history_{name}.tsv", sep="\t", index=False)
    summary = nll_summary(heldout_nll(net, dataset, test))
    row = {"fit": name, "model": model, "lambda_prot": weight, "epochs": len(history),
           "train_seconds": round(seconds, 1)}
    for modality in ("rna", "prot"):
        row[f"heldout_nll_{modality}"] = (float(summary.loc[modality, "nll_per_feature"])
                                          if modality in summary.index else np.nan)
    row["train_loss_per_cell"] = float(history["loss"].iloc[-1])
    print(f"{name:>16}: RNA {row['heldout_nll_rna']:.4f}  protein {row['heldout_nll_prot']:.4f}  "
          f"({row['epochs']} epochs, {seconds:.0f} s)", flush=True)
    return row


def plot_tradeoff(table: pd.DataFrame, path: Path) -> None:
    """RNA vs protein held-out NLL per feature; one line per model across lambda_prot."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for model, colour in (("multislivi", "tab:orange"), ("dmlivi", "tab:blue")):
        rows = table[table.model == model].sort_values("lambda_prot")
        ax.plot(rows.heldout_nll_rna, rows.heldout_nll_prot, "o-", color=colour,
                label={"multislivi": "MultiSLIVI", "dmlivi": "DMLIVI"}[model])
        for _, r in rows.iterrows():
            ax.annotate(f"w={r.lambda_prot:g}", (r.heldout_nll_rna, r.heldout_nll_prot),
                        textcoords="offset points", xytext=(5, 4), fontsize=8, color=colour)
    livi = table[table.model == "livi"]
    if len(livi):
        ax.axvline(livi.heldout_nll_rna.iloc[0], color="grey", ls="--", label="LIVI (RNA only)")
    ax.set(xlabel="held-out RNA NLL per gene and cell (nats)",
           ylabel="held-out protein NLL per protein and cell (nats)",
           title="RNA-protein reconstruction trade-off")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="CITE-seq .h5mu (default: shared citeseq/pbmc10k_cite.h5mu)")
    p.add_argument("--out", default="experiments/results/protein_weight_sweep", help="output folder")
    p.add_argument("--weights", default="1,50,200", help="lambda_prot values")
    p.add_argument("--n-genes", type=int, default=1000, help="most variable genes kept")
    p.add_argument("--epochs-vae", type=int, default=40)
    p.add_argument("--epochs", type=int, default=5, help="epochs of the donor stage")
    p.add_argument("--patience", type=int, default=20)
    p.add_argument("--n-cell-state", type=int, default=15, help="K_C (K_shared for DMLIVI)")
    p.add_argument("--n-dxc", type=int, default=10)
    p.add_argument("--n-persistent", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128, help="width of the RNA (or joint) encoder")
    p.add_argument("--link", default="identity", choices=["identity", "softmax"],
                   help="map of the cell state into decoders and interaction, the same for all "
                   "three models (default identity, as W_C c in seed 001 eq. 3, 7, 14)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(args.data) if args.data else shared_data_dir() / "citeseq" / "pbmc10k_cite.h5mu"
    mdata, notes = load_pbmc(path, args.n_genes)
    print(json.dumps(notes))
    both = read_dataset(mdata, DatasetSpec(modalities={"rna": None, "prot": None}, donor_key="donor"))
    rna_only = read_dataset(mdata, DatasetSpec(modalities={"rna": None}, donor_key="donor"))
    train, test = split_cells(both.n_cells, 0.2, seed=args.seed)
    start = time.perf_counter()
    rows = [fit_one("livi", "livi", rna_only, train, test, weight=None, args=args)]
    for weight in (float(w) for w in args.weights.split(",")):
        for model in ("multislivi", "dmlivi"):
            rows.append(fit_one(f"{model}_{weight:g}", model, both, train, test, weight=weight, args=args))
    table = pd.DataFrame(rows)
    table.to_csv(out / "protein_weight_sweep.tsv", sep="\t", index=False)
    plot_tradeoff(table, out / "tradeoff.png")
    settings = {**vars(args), **notes, "n_train": int(train.size), "n_test": int(test.size),
                "total_seconds": round(time.perf_counter() - start, 1)}
    (out / "settings.json").write_text(json.dumps(settings, indent=2))
    print(table[["fit", "lambda_prot", "heldout_nll_rna", "heldout_nll_prot", "epochs",
                 "train_seconds"]].to_string(index=False))
    return table


if __name__ == "__main__":
    main()
