"""Chapter 4 of seed 004 on simulated paired RNA + ATAC: GPG, PGP and the dual VAE, each in the
count-likelihood mode (NB genes, Bernoulli peaks), in the thesis mode (MSE on log1p values) at the
same size and training, and in the thesis mode with the settings of Table 3.2, scored by latent
classification and agreement, peak prediction F1 at the swept threshold (with a shuffled
baseline) and gene reconstruction correlation.

    python experiments/multiome_sequential.py        # 1,500 cells, 1,000 genes, 4,000 peaks
    python experiments/multiome_sequential.py --n-cells 5000 --n-genes 2000 --n-peaks 20000 --modes counts

Writes experiments/results/multiome_sequential/{latents,outputs}.tsv and table.md, and prints
the tables.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pyro_livi import preprocessing as pp
from pyro_livi.analysis.multiome_eval import cell_pearson, evaluate_multiome
from pyro_livi.models.sequential import THESIS_TRAINING
from pyro_livi.run import fit
from pyro_livi.simulate_multiome import MultiomeConfig, simulate_multiome

MODELS = ("gpg", "pgp", "dualvae")
NAMES = {"gpg": "GPG", "pgp": "PGP", "dualvae": "Dual VAE"}
#: training of the first two modes: 60 epochs (KL warm-up over the first 20, as Table 3.2), Adam
#: lr 2e-3, minibatches of 256 cells
TRAINING = dict(epochs=60, lr=2e-3, batch_size=256)
#: mode -> (label, input kind, model options, training (None: Table 3.2's, THESIS_TRAINING))
MODES = {
    # the models' defaults: NB genes, Bernoulli peaks, K 20, hidden [256], ReLU, beta_max 1
    "counts": ("NB / Bernoulli", "counts", {}, TRAINING),
    # the thesis's loss (MSE on log1p values, Tanh, beta_max 0.1) at the same size and training
    "thesis_loss": ("MSE, same size", "continuous", dict(preset="thesis", n_latent=20, hidden=[256]), TRAINING),
    # Table 3.2 as it stands: K 256, hidden [1024] ([2048] dual), its epochs, lr and batch sizes
    "table_3_2": ("MSE, Table 3.2", "continuous", dict(preset="thesis"), None),
}


#: number formats of some columns of the printed tables (others: floats with the table's digits)
FORMATS = {"lr": "g", "batch": "d", "epochs": "d", "fit_s": ".0f", "threshold": ".2f"}


def markdown(table: pd.DataFrame, digits: int) -> str:
    """A pipe table of ``table`` (floats rounded to ``digits`` unless :data:`FORMATS` says
    otherwise)."""
    def cell(column, v):
        if column in FORMATS:
            return format(int(v) if FORMATS[column] == "d" else float(v), FORMATS[column])
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(table.columns, row)) + " |"
              for row in table.itertuples(index=False)]
    return "\n".join(lines)


def write_tables(latents: pd.DataFrame, outputs: pd.DataFrame, out: Path, header: str) -> str:
    """Write latents.tsv, outputs.tsv and table.md to ``out``; return the text of table.md."""
    latents.to_csv(out / "latents.tsv", sep="\t", index=False)
    outputs.to_csv(out / "outputs.tsv", sep="\t", index=False)
    text = header + "\n\n" + markdown(latents, 2) + "\n\n" + markdown(outputs, 3) + "\n"
    (out / "table.md").write_text(text)
    return text


def simulated_data(args):
    """The simulated set after the section-3.2 preprocessing: paired cells, RNA to the median
    library size then log1p, peaks open in >= 3% of cells then log1p; raw counts stay in
    layers["counts"] (the count mode reads them: same cells and peaks)."""
    cfg = MultiomeConfig(n_cells=args.n_cells, n_genes=args.n_genes, n_peaks=args.n_peaks)
    sim = simulate_multiome(cfg, seed=args.seed)
    return cfg, sim, pp.preprocess(sim.mdata, rna="lognorm_median", atac="log1p", pair=True)


def mean_profile_pearson(data) -> float:
    """Baseline of the gene reconstruction: the mean over cells of the Pearson correlation of each
    cell's log1p gene vector with the mean vector over cells (a model that predicts every cell
    alike)."""
    x = data.mod["rna"].X
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    return float(np.nanmean(cell_pearson(x, np.broadcast_to(x.mean(0), x.shape))))


def baselines(data, labels, seed: int) -> str:
    """One line of reference values: the gene Pearson of the mean profile, the held-out weighted
    F1 of predicting the majority type, and the F1 of z1 of an untrained GPG with the Table 3.2
    settings (random features of the genes)."""
    from sklearn.metrics import f1_score
    from sklearn.model_selection import train_test_split

    from pyro_livi.analysis.multiome_eval import latent_classification
    from pyro_livi.data import DatasetSpec, read_dataset
    from pyro_livi.run import build_model

    train, test = train_test_split(np.arange(labels.size), test_size=0.3, random_state=seed, stratify=labels)
    values, counts = np.unique(labels[train], return_counts=True)
    majority = f1_score(labels[test], np.full(test.size, values[np.argmax(counts)]), average="weighted",
                        zero_division=0)
    dataset = read_dataset(data, DatasetSpec(modalities={"rna": None, "atac": None},
                                             continuous_modalities=["rna", "atac"]))
    torch.manual_seed(seed)
    model = build_model("gpg", dataset, preset="thesis")
    with torch.no_grad():
        z1 = model.encode(dataset.batch(np.arange(dataset.n_cells)))[0].numpy()
    untrained = latent_classification(z1, labels, seed=seed)["f1"]
    return (f"Baselines: gene Pearson of the mean profile (every cell predicted alike) "
            f"{mean_profile_pearson(data):.3f}; weighted F1 of the majority type {majority:.2f}; z1 F1 of an "
            f"untrained Table 3.2 GPG {untrained:.2f}.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=1500)
    parser.add_argument("--n-genes", type=int, default=1000)
    parser.add_argument("--n-peaks", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated modes among {list(MODES)}")
    parser.add_argument("--table-only", action="store_true",
                        help="print the tables of a finished run (OUT/latents.tsv, outputs.tsv) without fitting")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "multiome_sequential")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg, sim, data = simulated_data(args)
    labels = data.obs["cell_type"].astype(str).to_numpy()
    baseline = baselines(data, labels, args.seed)
    if args.table_only:
        header = (args.out / "table.md").read_text().splitlines()[0].split(" Gene Pearson")[0].split(" Baselines")[0]
        print(write_tables(pd.read_csv(args.out / "latents.tsv", sep="\t"),
                           pd.read_csv(args.out / "outputs.tsv", sep="\t"), args.out, header + " " + baseline))
        return 0
    n, g, p = data.n_obs, data.mod["rna"].n_vars, data.mod["atac"].n_vars
    sparsity = 1 - data.mod["atac"].layers["counts"].nnz / (n * p)
    print(f"simulated {cfg.n_cells} cells x {cfg.n_genes} genes x {cfg.n_peaks} peaks (seed {args.seed}); after "
          f"preprocessing {n} cells, {g} genes, {p} peaks (peak matrix {sparsity:.1%} zeros), "
          f"{sim.cell_types.nunique()} planted types")

    latent_rows, output_rows = [], []
    for mode in args.modes.split(","):
        mode_name, kind, options, training = MODES[mode]
        for name in MODELS:
            start = time.perf_counter()
            train = dict(training or THESIS_TRAINING[name])
            train["batch_size"] = train["batch_size"] or n  # None: full batch
            if kind == "counts":
                result = fit(data, model=name, modalities={"rna": "counts", "atac": "counts"}, train_size=1.0,
                             patience=None, progress=False, seed=args.seed, **options, **train)
            else:
                result = fit(data, model=name, modalities={"rna": None, "atac": None},
                             continuous_modalities=["rna", "atac"], train_size=1.0, patience=None,
                             progress=False, seed=args.seed, **options, **train)
            seconds = time.perf_counter() - start
            ev = evaluate_multiome(result.model, result.dataset, labels, seed=args.seed)
            for latent, row in ev.classification.iterrows():
                latent_rows.append({"model": NAMES[name], "mode": mode_name, "latent": latent,
                                    **{k: float(row[k]) for k in ("precision", "recall", "f1", "ari", "ami")}})
            output_rows.append({"model": NAMES[name], "mode": mode_name,
                                "peak_precision": float(ev.peaks_best["precision"]),
                                "peak_recall": float(ev.peaks_best["recall"]),
                                "peak_f1": float(ev.peaks_best["f1"]),
                                "threshold": float(ev.peaks_best["threshold"]),
                                "peak_f1_shuffled": float(ev.peaks_shuffled_best["f1"]),
                                "gene_pearson": ev.gene_correlation_mean,
                                "epochs": len(result.history), "lr": train["lr"],
                                "batch": train["batch_size"], "fit_s": round(seconds, 1)})
            print(f"{NAMES[name]:8s} {mode_name:15s} fitted in {seconds:.0f} s; z F1 "
                  + ", ".join(f"{k} {v:.2f}" for k, v in ev.classification["f1"].items())
                  + f"; peak F1 {ev.peaks_best['f1']:.3f} (shuffled {ev.peaks_shuffled_best['f1']:.3f}); gene r "
                  f"{ev.gene_correlation_mean:.3f}", flush=True)
    header = (f"Simulated: {cfg.n_cells} cells x {cfg.n_genes} genes x {cfg.n_peaks} peaks (seed {args.seed}); "
              f"after preprocessing {n} cells, {g} genes, {p} peaks. {baseline}")
    text = write_tables(pd.DataFrame(latent_rows), pd.DataFrame(output_rows), args.out, header)
    print()
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
