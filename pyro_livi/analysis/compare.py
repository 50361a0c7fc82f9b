"""Side-by-side comparison of models of the zoo on one dataset (seed 002, Table 1).

Every chosen model is fitted on the same training cells (a seeded split), each modality given as
the model prefers it (raw counts, or log-normalised RNA / CLR proteins / TF-IDF peaks from
:mod:`pyro_livi.preprocessing`), and scored on its posterior-mean latent of every cell: ARI,
NMI, silhouette, graph connectivity and isolated-label silhouette (:mod:`.graph_metrics`), the
label probe (:mod:`.probes`), held-out reconstruction NLL per modality on the held-out cells
(:mod:`.heldout`; only comparable between models given the same input), training time and
cells/s. Each model's results are kept in ``OUT/<model>/metrics.json``, so an interrupted
comparison resumes with the models it has not finished.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError

#: recipe of :func:`pyro_livi.preprocessing.preprocess` giving a modality as continuous values
CONTINUOUS_RECIPES = {"rna": "lognorm", "prot": "clr", "adt": "clr", "atac": "tfidf"}
TABLE_COLUMNS = ["model", "input", "ari", "nmi", "silhouette", "graph_connectivity",
                 "isolated_label_silhouette", "probe_accuracy", "train_seconds", "cells_per_s"]


def derived_labels(dataset, *, n_pcs: int = 15, resolution: float = 1.0, seed: int = 0) -> np.ndarray:
    """Cell labels for data without any: Leiden clusters (``resolution``) of the kNN graph of the
    first ``n_pcs`` principal components of the log-normalised first modality (as seed 004
    labels cells). Such labels come from one modality and favour models of that modality."""
    from .graph_metrics import knn_graph, leiden
    from .report import pca_latent

    graph = knn_graph(pca_latent(dataset, n_pcs=n_pcs, seed=seed), seed=seed)
    return leiden(graph, resolution=resolution, seed=seed)


def _read(data):
    import anndata as ad

    from ..data.expression import read_h5mu

    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise InputError(path, "--data", "file not found", "give an existing .h5ad or .h5mu file")
        return read_h5mu(path) if path.suffix == ".h5mu" else ad.read_h5ad(path)
    return data


def _subset(obj, names):
    return obj[obj.obs_names.isin(names)].copy()


def compare(data, models, out, *, label_key: str | None = None, modalities=None, donor_key: str | None = None,
            covariate_keys=(), epochs: int = 100, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
            test_fraction: float = 0.1, options: dict | None = None, progress: bool = True) -> pd.DataFrame:
    """Fit every model of ``models`` (registered names) on the same cells of ``data`` and score
    them; returns the comparison table (one row per model, :data:`TABLE_COLUMNS`) and writes
    ``OUT/compare.tsv``, ``OUT/compare.md``, ``OUT/umap_grid.png`` and one folder per model.

    ``data``: a ``.h5ad``/``.h5mu`` path or object with raw counts; ``modalities``: the modality
    names to use (default: all; one-modality models take the first); ``label_key``: ``.obs``
    column of cell labels (default: :func:`derived_labels`); the donors (or the first covariate)
    are the batches of the isolated-label silhouette; ``options``: {model: keyword
    options of :func:`pyro_livi.run.fit`}. Models needing donors are skipped (with the reason in
    the table) without ``donor_key``. A model already fitted in ``OUT`` with the same settings
    (``OUT/<model>/settings.json``) is reused; with other settings it is fitted again. Raises
    InputError on bad input.
    """
    from ..data import DatasetSpec, read_dataset
    from ..models import MODELS
    from ..preprocessing import preprocess
    from ..run import fit
    from .figures import plot_umap_grid
    from .graph_metrics import graph_metrics
    from .heldout import heldout_nll, split_cells
    from .latents import cell_state
    from .probes import probe

    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise InputError("<arguments>", "--models", f"unknown model(s) {unknown}",
                         f"choose among {sorted(MODELS)} (`pyro-livi models`)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = _read(data)
    available = list(getattr(raw, "mod", {"rna": None}))
    modalities = list(modalities or available)
    missing = [m for m in modalities if m not in available]
    if missing:
        raise InputError(str(data), "--modalities", f"modality(ies) {missing} not in the data",
                         f"choose among {available}")
    recipes = {m: CONTINUOUS_RECIPES.get(m, "lognorm") for m in modalities}
    prepared = preprocess(raw, recipes if hasattr(raw, "mod") else recipes[modalities[0]])
    # read once through the dataset reader: a missing label, donor or covariate column is an
    # InputError naming its flag, and a MuData's modality-level .obs columns are found too
    try:
        base = read_dataset(prepared, DatasetSpec(modalities={m: "counts" for m in modalities[:1]},
                                                  donor_key=donor_key, covariate_keys=list(covariate_keys),
                                                  label_keys=[label_key] if label_key else []))
    except InputError as err:  # name the user's file (not the preprocessed copy) and compare's own flags
        flags = {"(label_keys)": "--label-key (label_key=", "(donor_key)": "--donor-key (donor_key=",
                 "(covariate_keys)": "--covariate-keys (covariate_keys="}
        flag = next((f for k, f in flags.items() if str(err.field).endswith(k)), None)
        fix = (err.fix if flag is None else
               f"give {flag} in Python) one of the available .obs columns, or add the column to .obs")
        raise InputError(data if isinstance(data, (str, Path)) else err.source, err.field, err.problem,
                         fix) from None
    labels = (base.obs[label_key].astype(str).to_numpy() if label_key
              else derived_labels(base, seed=seed))
    batch_key = donor_key or (covariate_keys[0] if covariate_keys else None)
    batches = None if batch_key is None else base.obs[batch_key].astype(str).to_numpy()
    train, test = split_cells(base.n_cells, test_fraction, seed)
    train_names = base.obs_names[train]
    rows, latents = [], {}
    for name in models:
        cls = MODELS[name]
        folder = out / name
        done, recorded = folder / "metrics.json", folder / "settings.json"
        settings = json.loads(json.dumps(dict(
            modalities=modalities, label_key=label_key, donor_key=donor_key, covariate_keys=list(covariate_keys),
            epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, test_fraction=test_fraction,
            options=(options or {}).get(name, {})), default=str))
        before = json.loads(recorded.read_text()) if recorded.is_file() else None
        if done.is_file() and before == settings:
            row = json.loads(done.read_text())
            if progress:
                print(f"[{name}] already done with these settings, reusing {done}")
        elif cls.data_needs.donors == "required" and donor_key is None:
            row = {"model": name, "status": "skipped: needs donors (--donor-key)"}
        else:
            if done.is_file() and progress:
                changed = ("no record of its settings" if before is None else "settings changed: " + ", ".join(
                    f"{k} {before.get(k)!r} -> {v!r}" for k, v in settings.items() if before.get(k) != v))
                print(f"[{name}] fitting again ({changed})")
            low, high = cls.data_needs.modalities
            used = modalities[:high] if high is not None else modalities
            if len(used) < low:
                rows.append({"model": name, "status": f"skipped: needs {low} modalities"})
                continue
            kinds = cls.data_needs.input_kinds(used)
            spec = dict(modalities={m: "counts" if kinds[m] == "counts" else None for m in used},
                        continuous_modalities=[m for m in used if kinds[m] == "continuous"],
                        donor_key=donor_key if cls.data_needs.donors != "unused" else None,
                        covariate_keys=list(covariate_keys))
            if progress:
                print(f"[{name}] fitting on {len(train)} cells ({', '.join(f'{m}: {k}' for m, k in kinds.items())})")
            tic = time.perf_counter()
            result = fit(_subset(prepared, train_names), model=name, epochs=epochs, batch_size=batch_size, lr=lr,
                         seed=seed, progress=progress, out=folder / "run", overwrite=True, **spec,
                         **(options or {}).get(name, {}))
            seconds = time.perf_counter() - tic
            everything = read_dataset(prepared, DatasetSpec(**spec), donor_index=result.dataset.donor_index,
                                      covariate_categories=result.dataset.covariate_categories)
            latent = cell_state(result.model, everything)
            np.save(folder / "latent.npy", latent)
            metrics = graph_metrics(latent, labels, batches, seed=seed)
            nll = heldout_nll(result.model, everything, test)
            row = {"model": name, "status": "ok",
                   "input": ", ".join(f"{m}: {k}" for m, k in kinds.items()),
                   **{k: metrics[k] for k in TABLE_COLUMNS[2:7]},
                   "probe_accuracy": probe(latent, labels, label="labels").accuracy,
                   **{f"heldout_nll_{m}": float(series.sum()) for m, series in nll.items()},
                   "train_seconds": seconds,
                   "cells_per_s": float(result.history["cells_per_s"].median()),
                   "epochs": int(len(result.history))}
            done.write_text(json.dumps(row, indent=2))
            recorded.write_text(json.dumps(settings, indent=2))
        rows.append(row)
        if (folder / "latent.npy").is_file() and row.get("status") == "ok":
            latents[name] = np.load(folder / "latent.npy")
    table = pd.DataFrame(rows)
    table.to_csv(out / "compare.tsv", sep="\t", index=False)
    if latents:
        plot_umap_grid(latents, labels, out / "umap_grid.png", label_name=label_key or "leiden_rna", seed=seed)
    _write_markdown(table, out / "compare.md", label_key=label_key, n_train=len(train), n_test=len(test),
                    epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, data=data)
    return table


def _write_markdown(table: pd.DataFrame, path: Path, *, label_key, n_train, n_test, epochs, batch_size, lr,
                    seed, data) -> None:
    labels = (f"`{label_key}`" if label_key else "Leiden clusters (resolution 1) of 15 PCs of the "
              "log-normalised first modality; labels from one modality favour models of that modality")
    lines = ["# Model comparison", "",
             f"- data: {data}", f"- labels: {labels}",
             f"- cells: {n_train} training, {n_test} held out (seed {seed}); {epochs} epochs (the last stage), "
             f"batch {batch_size}, learning rate {lr}",
             "- graph metrics and the probe on every cell's posterior-mean latent; held-out NLL per cell on the "
             "held-out cells (nats; comparable only between models given the same input)", "",
             "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for _, row in table.iterrows():
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.to_numpy()]
        lines.append("| " + " | ".join("" if c == "nan" else c for c in cells) + " |")
    lines += ["", "![UMAP of every model's latent](umap_grid.png)", ""]
    path.write_text("\n".join(lines))
