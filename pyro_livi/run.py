"""Fitting a model end to end: read data, build the model, train through its stages, write RUN_DIR."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .analysis.latents import (assignment_table, cell_state_table, dispersion_tables,
                               donor_factor_tables, loading_tables, specific_state_tables)
from .analysis.plots import plot_loss_curves
from .data import DatasetSpec, read_dataset
from .infer import Trainer, TrainingConfig, livi_stages, seed_everything
from .models import model_class
from .persistence import save_model


@dataclass
class FitResult:
    """A fitted model with its data and the tables written to RUN_DIR."""

    model: object
    dataset: object
    history: pd.DataFrame
    tables: dict = field(default_factory=dict)
    run_dir: Path | None = None


def build_model(name: str, dataset, **options):
    """Instantiate a zoo model sized for ``dataset`` (features, donors, covariate categories)."""
    cls = model_class(name)
    counts_sample = {m: dataset.counts_sample(m, n=2000) for m in dataset.modalities}
    n_cov = [len(dataset.covariate_categories[k]) for k in dataset.covariate_categories]
    if name == "livi":
        (modality,) = dataset.modalities
        return cls(dataset.n_features[modality], len(dataset.donor_index), n_covariate_categories=n_cov,
                   counts_sample=counts_sample[modality], **options)
    return cls.from_dataset(dataset, counts_sample=counts_sample, **options)


def fit(
    data,
    *,
    donor_key: str,
    model: str = "livi",
    layer: str | None = None,
    modalities: dict | None = None,
    optional_modalities=(),
    covariate_keys=(),
    label_keys=(),
    epochs_vae: int = 60,
    epochs: int = 200,
    warmup_epochs_G: int = 0,
    persistent_in_vae_stage: bool = False,
    patience: int = 20,
    batch_size: int = 1024,
    lr: float = 8e-4,
    donor_lr: float = 1e-2,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    out: str | Path | None = None,
    resume: bool = False,
    **model_options,
) -> FitResult:
    """Fit ``model`` to ``data`` (a path or an in-memory AnnData/MuData).

    ``model_options`` go to the model's constructor (e.g. ``n_cell_state=15, n_dxc=100,
    n_persistent=5, likelihood="nb"``). Multimodal models (``model="multislivi"`` or
    ``"dmlivi"``) read ``modalities`` ({modality: layer or None}, e.g. ``{"rna": None,
    "prot": None}``) and take e.g. ``likelihoods={"prot": "nb_mixture"}``,
    ``modality_weights={"prot": 50}``; ``optional_modalities`` (e.g. ``["prot"]``) lists
    modalities some cells lack (DMLIVI embeds such cells from the modalities they have).
    ``persistent_in_vae_stage=True`` trains V and W_V jointly with the VAE in stage 1 (see
    :func:`pyro_livi.infer.livi_stages`; recommended, the default is the paper's schedule).
    With ``out``, checkpoints go to ``out/checkpoints``
    (``resume=True`` continues from them) and the outputs are written by :func:`write_run_dir`.
    """
    spec = DatasetSpec(modalities=modalities or {"rna": layer}, donor_key=donor_key,
                       covariate_keys=list(covariate_keys), label_keys=list(label_keys),
                       optional_modalities=list(optional_modalities))
    dataset = read_dataset(data, spec)
    seed_everything(seed)
    net = build_model(model, dataset, **model_options)
    stages = livi_stages(epochs_vae, epochs, warmup_epochs_G=warmup_epochs_G, patience=patience,
                         persistent_in_vae_stage=persistent_in_vae_stage)
    config = TrainingConfig(batch_size=batch_size, lr=lr, seed=seed, device=device, progress=progress,
                            group_lr={"persistent": donor_lr, "interaction": donor_lr})
    trainer = Trainer(net, dataset, stages, config,
                      checkpoint_dir=Path(out) / "checkpoints" if out is not None else None)
    history = trainer.fit(resume=resume)
    net.to("cpu")
    result = FitResult(model=net, dataset=dataset, history=history)
    if out is not None:
        write_run_dir(result, out, spec=spec.to_dict(),
                      arguments=dict(model=model, epochs_vae=epochs_vae, epochs=epochs,
                                     warmup_epochs_G=warmup_epochs_G,
                                     persistent_in_vae_stage=persistent_in_vae_stage, patience=patience,
                                     batch_size=batch_size, lr=lr, donor_lr=donor_lr, seed=seed,
                                     **model_options))
    return result


def write_run_dir(result: FitResult, out: str | Path, *, spec: dict | None = None,
                  arguments: dict | None = None) -> Path:
    """Write a fitted model's outputs.

    RUN_DIR/model.pt, D.tsv and V.tsv (rows: donor ids, header: factor names), A.tsv,
    cell_state.tsv (rows: cell ids), specific_state_<modality>.tsv (DMLIVI's modality-specific
    latents), loadings_<decoder>.tsv, dispersions_<modality>.tsv,
    history.tsv (per-epoch loss and each ELBO term / penalty, per cell), loss_curve.png,
    run.json (the arguments of the fit).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, dataset = result.model, result.dataset
    save_model(model, out, donor_index=dataset.donor_index,
               covariate_categories=dataset.covariate_categories,
               feature_names=dataset.feature_names, spec=spec)
    tables = {**donor_factor_tables(model, dataset.donor_index)}
    tables["A"] = assignment_table(model)
    tables["cell_state"] = cell_state_table(model, dataset)
    tables.update(specific_state_tables(model, dataset))
    for name, table in loading_tables(model, dataset.feature_names).items():
        tables[f"loadings_{name}"] = table
    for modality, table in dispersion_tables(model, dataset.feature_names).items():
        tables[f"dispersions_{modality}"] = table
    for name, table in tables.items():
        table.to_csv(out / f"{name}.tsv", sep="\t")
    result.history.to_csv(out / "history.tsv", sep="\t", index=False)
    plot_loss_curves(result.history, out / "loss_curve.png")
    (out / "run.json").write_text(json.dumps(arguments or {}, indent=2, default=str))
    result.tables, result.run_dir = tables, out
    return out
