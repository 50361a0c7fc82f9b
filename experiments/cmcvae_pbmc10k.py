"""CMC-VAE on real CITE-seq: does RNA -> protein dominate protein -> RNA for matched pairs?
(seed 003's central-dogma asymmetry panel), over three seeds.

Data: ``citeseq/pbmc10k_cite.h5mu`` from the shared data folder (10x PBMC 10k, one donor,
6,855 cells, 4,000 genes, 14 surface proteins, raw counts), used as it is.

Model: ``pyro-livi fit --model cmcvae`` with its defaults (NB likelihood with library size on
both modalities, K_R = 10 RNA nodes, K_P = 5 protein nodes, acyclicity on the whole graph, both
cross blocks free, varimax-PCA start, three path-following rounds), Adam lr ``--lr`` (3e-3),
batch 512, ``--epochs`` for the last round (half as many for each earlier round), the default
90/10 split with early stopping on the held-out cells, one torch thread.

Analysis per seed: :func:`pyro_livi.analysis.causal.causal_analysis` with the default matched
pairs (:data:`pyro_livi.analysis.causal.PBMC10K_PAIRS`, 12 pairs): effect of each gene on its
protein and back through (I - A^T)^{-1}, Wilcoxon signed-rank test across the pairs. The
summary also gives the median over the nodes of each block of the variance across cells of the
posterior mean of z (the latent variances that orient the edges between blocks, see the model's
docstring on identifiability).

Outputs in ``--out`` (default experiments/results/cmcvae_pbmc10k): ``summary.tsv`` (one row per
seed), ``pairs_by_seed.tsv`` (every pair's effects at every seed), ``asymmetry_seed<k>.png``,
``graph_seed<k>.png``, ``graph_seed<k>.tsv``, ``nodes_seed<k>.tsv``; the run directories go to
``--work`` (default /tmp/cmcvae_pbmc10k). Run::

    python experiments/cmcvae_pbmc10k.py   # a few CPU minutes per seed (cpu_minutes in summary.tsv)
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pyro_livi.acyclicity import is_dag, threshold_graph
from pyro_livi.analysis.causal import causal_analysis
from pyro_livi.paths import shared_data_dir
from pyro_livi.persistence import load_model
from pyro_livi.run import fit


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=str(shared_data_dir() / "citeseq" / "pbmc10k_cite.h5mu"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the last path-following round")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cmcvae_pbmc10k"))
    parser.add_argument("--work", default="/tmp/cmcvae_pbmc10k", help="run directories (models, checkpoints)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    rows, pair_rows = [], []
    for seed in args.seeds:
        run = work / f"seed{seed}"
        start, cpu = time.perf_counter(), time.process_time()
        result = fit(args.data, model="cmcvae", modalities={"rna": None, "prot": None}, epochs=args.epochs,
                     batch_size=args.batch_size, lr=args.lr, seed=seed, progress=False, out=run, overwrite=True)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        causal = causal_analysis(run, out=run / "causal")
        for name, target in (("asymmetry.png", f"asymmetry_seed{seed}.png"), ("graph.png", f"graph_seed{seed}.png"),
                             ("graph.tsv", f"graph_seed{seed}.tsv"), ("nodes.tsv", f"nodes_seed{seed}.tsv")):
            shutil.copyfile(run / "causal" / name, out / target)
        model, _ = load_model(run)
        kept = causal.graph[causal.graph["in_graph"]]
        test = causal.tests.iloc[0]
        history = result.history
        latent = result.tables["latent"].to_numpy()
        var_rna, var_prot = latent[:, :model.K_R].var(0), latent[:, model.K_R:].var(0)
        rows.append({"seed": seed, "epochs": len(history), "minutes": round(seconds / 60, 1),
                     "cpu_minutes": round(cpu / 60, 1),
                     "final_loss": round(float(history["loss"].iloc[-1]), 2),
                     "validation_loss": round(float(history["validation_loss"].iloc[-1]), 2),
                     "edges": len(kept), **{f"edges_{b}": int((kept["block"] == b).sum())
                                            for b in ("rna->rna", "rna->prot", "prot->rna", "prot->prot")},
                     "dag": is_dag(threshold_graph(model.A.detach().numpy(), model.edge_threshold)),
                     "n_pairs": int(test["n"]), "median_abs_rna_to_prot": test["median_abs_forward"],
                     "median_abs_prot_to_rna": test["median_abs_reverse"],
                     "fraction_rna_to_prot_larger": test["fraction_forward_larger"],
                     "wilcoxon_p": test["p_value"], "direction": test["direction"],
                     "median_var_z_rna": float(np.median(var_rna)), "median_var_z_prot": float(np.median(var_prot))})
        pair_rows.append(causal.pairs.drop(columns="label").assign(seed=seed))
        print(f"seed {seed}: {len(history)} epochs in {seconds / 60:.1f} min; {len(kept)} edges; "
              f"matched pairs p = {test['p_value']:.3g}, {test['direction']}", flush=True)
    summary = pd.DataFrame(rows)
    pairs = pd.concat(pair_rows, ignore_index=True)
    summary.to_csv(out / "summary.tsv", sep="\t", index=False)
    pairs.to_csv(out / "pairs_by_seed.tsv", sep="\t", index=False)
    pd.set_option("display.width", 200)
    print()
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    wide = pairs.pivot(index=["gene", "protein"], columns="seed", values="difference")
    wide.columns = [f"|fwd|-|rev| seed {s}" for s in wide.columns]
    wide["seeds with RNA->protein larger"] = (wide > 0).sum(axis=1)
    print()
    print(wide.to_string(float_format=lambda v: f"{v:+.4f}"))
    agree = int((wide["seeds with RNA->protein larger"].isin([0, len(args.seeds)])).sum())
    print(f"\npairs with the same direction at every seed: {agree} of {len(wide)}")
    print(f"seeds calling rna_to_prot: {int((summary['direction'] == 'rna_to_prot').sum())}, "
          f"prot_to_rna: {int((summary['direction'] == 'prot_to_rna').sum())}, "
          f"undetermined: {int((summary['direction'] == 'undetermined').sum())} (alpha 0.05)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
