"""Fitting any registered model end to end: read data, build the model, train through its default
schedule, write RUN_DIR."""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .analysis.heldout import split_cells
from .analysis.latents import output_tables
from .analysis.plots import plot_loss_curves
from .data import DatasetSpec, read_dataset
from .data.loader import unset_defaults
from .errors import InputError
from .infer import Trainer, TrainingConfig, seed_everything
from .infer.stages import check_epochs, check_patience
from .infer.trainer import check_learning_rate, check_seed
from .models import model_class
from .persistence import MODEL_FILE, save_model
from .rundir import CHECKPOINT_DIR, check_same_data, data_fingerprint, prepare_run_dir

#: cells of a run's training / validation split (RUN_DIR/split.tsv: cell id -> "train" or "validation")
SPLIT_FILE = "split.tsv"


@dataclass
class FitResult:
    """A fitted model with its data and its output tables (also written to RUN_DIR when given)."""

    model: object
    dataset: object
    history: pd.DataFrame
    tables: dict = field(default_factory=dict)
    run_dir: Path | None = None
    #: cell positions (in ``dataset``) held out of training for validation; empty without a split
    validation: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def split_options(name: str, options: dict) -> tuple[dict, dict]:
    """``(model options, schedule options)`` of model ``name``; an InputError names a keyword that
    the model does not take and lists those it does."""
    cls = model_class(name)
    accepted = set(cls.options)
    for fn in (cls.__init__, cls.from_dataset):
        accepted |= {p.name for p in inspect.signature(fn).parameters.values()
                     if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}
    accepted -= {"self", "cls", "dataset", "name", "counts_sample"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise InputError("<arguments>", unknown[0], f"model '{name}' takes no option {unknown[0]!r}",
                         f"use one of its options: {sorted(accepted)} (`pyro-livi fit --model {name} --help` "
                         "lists them as flags)")
    schedule = {k: v for k, v in options.items() if k in cls.options and cls.options[k].schedule}
    return {k: v for k, v in options.items() if k not in schedule}, schedule


def build_model(name: str, dataset, **options):
    """Instantiate registered model ``name`` sized for ``dataset`` (its ``from_dataset`` checks that
    the data give what the model needs, the options and the likelihoods). ``options``: the model's
    options and ``likelihoods`` ({modality: registered likelihood name})."""
    cls = model_class(name)
    model_options, schedule = split_options(name, options)
    if schedule:
        raise InputError("<arguments>", next(iter(schedule)), "a training-schedule option, not a model option",
                         "pass it to pyro_livi.run.fit, or to the model's default_stages")
    continuous = set(dataset.spec.continuous_modalities)
    counts_sample = {m: dataset.counts_sample(m, n=2000) for m in dataset.modalities if m not in continuous}
    return cls.from_dataset(dataset, counts_sample=counts_sample, **model_options)


def check_training_settings(*, epochs, patience, lr, seed, epochs_keyword: str = "epochs") -> int | None:
    """Check the training settings shared by every model before anything is read or trained; an
    InputError names the flag and keyword of the first bad one: ``epochs`` a whole number >= 1
    (named ``epochs_keyword``, e.g. ``max_epochs`` in :meth:`pyro_livi.api.Model.train`),
    ``patience`` None, 0 (no early stopping) or a whole number >= 1, ``lr`` a number > 0,
    ``seed`` a whole number from 0 to 2**32 - 1. Returns the patience, None for no early
    stopping."""
    check_epochs(epochs, keyword=epochs_keyword)
    patience = check_patience(patience)
    check_learning_rate(lr)
    check_seed(seed)
    return patience


def training_split(n_cells: int, train_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, validation)`` cell positions: a seeded split keeping ``train_size`` of the cells
    for training (:func:`pyro_livi.analysis.heldout.split_cells`); every cell trains when
    ``train_size`` is 1. Raises InputError outside (0, 1]."""
    if not 0.0 < float(train_size) <= 1.0:
        raise InputError("<arguments>", "train_size", f"must be in (0, 1], got {train_size}",
                         "give the fraction of cells to train on, e.g. 0.9 (--train-size on the CLI)")
    if float(train_size) == 1.0:
        return np.arange(n_cells, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return split_cells(n_cells, 1.0 - float(train_size), seed)


def fit(
    data,
    *,
    model: str = "livi",
    donor_key: str | None = None,
    layer: str | None = None,
    modalities: dict | None = None,
    optional_modalities=(),
    continuous_modalities=(),
    covariate_keys=(),
    label_keys=(),
    epochs: int = 200,
    patience: int | None = 20,
    train_size: float | None = None,
    batch_size: int = 1024,
    lr: float = 8e-4,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    nproc: int = 1,
    backed: bool = False,
    chunk_size: int | None = None,
    buffer_batches: int | None = None,
    **options,
) -> FitResult:
    """Fit registered model ``model`` (see ``pyro-livi models``) to ``data`` (a path or an
    in-memory AnnData/MuData), on the model's default training schedule.

    ``modalities`` ({modality: layer or None}; default ``{"rna": layer}``) chooses what is read;
    ``optional_modalities`` lists modalities some cells lack, ``continuous_modalities`` those
    holding normalised values instead of raw counts. ``donor_key`` is needed by models with
    donor factors only. ``epochs`` is the maximum length of the model's last stage (the donor
    stage of the LIVI family; a whole number >= 1), ``patience`` its early stopping (None or 0:
    none), ``lr`` Adam's learning rate (> 0), ``seed`` 0 .. 2**32 - 1. ``train_size``:
    fraction of cells trained on (seeded split); the others are validation cells whose loss is
    recorded every epoch (``validation_loss``) and watched by early stopping, as in
    scvi-tools. None takes the model's ``default_train_size`` (0.9; 1.0 for the LIVI family,
    whose donor factors use every cell, as the paper). ``options`` are the
    model's own (its ``options``, e.g. ``n_cell_state=15, n_dxc=100`` for LIVI,
    ``n_latent=10`` for scvi), ``likelihoods={"prot": "nb_mixture"}``, and its schedule options
    (the LIVI family: ``epochs_vae``, ``warmup_epochs_G``, ``persistent_in_vae_stage``,
    ``donor_lr``; see :func:`pyro_livi.models.livi_stages`).
    With ``out``, checkpoints go to ``out/checkpoints`` and the outputs are written by
    :func:`write_run_dir`. A run directory is never silently mixed or clobbered
    (:func:`prepare_run_dir`): when ``out`` already holds a run (finished, or interrupted with
    only its checkpoint), ``resume=True`` continues it, after checking that the model, its
    options, the training settings, the data spec and the data (cells, features) are those the
    checkpoint was made with (a RunDirectoryError names each setting that differs);
    ``overwrite=True`` removes the old run's outputs first; neither refuses with a
    RunDirectoryError. Raises InputError on bad input, TrainingDivergedError when training fails
    numerically.

    ``backed=True`` (``data`` a path) leaves the counts on disk: memory does not grow with the
    cells beyond per-cell metadata (ids, donor and covariate codes, size factors, the latent
    table written at the end: tens of bytes per cell). Training then reads contiguous chunks of
    ``chunk_size`` cells (default 128), shuffles the chunks and then the cells within buffers of
    ``buffer_batches`` minibatches (default 32), each cell once per epoch
    (:class:`~pyro_livi.data.MinibatchLoader`); ``chunk_size=1`` keeps the cell-level shuffle of
    data in memory. Both are settings of the run (resuming needs the same ones).

    ``nproc`` > 1 trains data-parallel in that many local processes (``torch.distributed``:
    gloo on CPU, nccl on CUDA; :mod:`pyro_livi.infer.distributed`): every minibatch of
    ``batch_size`` cells is split among them and their gradients averaged, so the processes
    follow one optimisation at the global batch size; rank 0 writes ``out``. A process started
    by ``torchrun`` (``WORLD_SIZE`` > 1 in its environment) trains data-parallel with the other
    launched processes without ``nproc``.
    """
    patience = check_training_settings(epochs=epochs, patience=patience, lr=lr, seed=seed)
    if nproc != 1:
        given = {k: v for k, v in locals().items() if k not in ("nproc", "options")}
        if not isinstance(nproc, int) or nproc < 1:
            raise InputError("<arguments>", "nproc", f"must be a whole number >= 1, got {nproc!r}",
                             "give the number of processes, e.g. --nproc 2 (nproc=2)")
        if nproc > 1:
            split_options(model, options)  # a bad model or option fails here, before any process starts
            from .infer.distributed import spawn_fit
            return spawn_fit({**given, **options}, nproc)
    cls = model_class(model)
    model_options, schedule = split_options(model, options)
    spec = DatasetSpec(modalities=modalities or {"rna": layer}, donor_key=donor_key,
                       covariate_keys=list(covariate_keys), label_keys=list(label_keys),
                       optional_modalities=list(optional_modalities),
                       continuous_modalities=list(continuous_modalities))
    declared = {k: o.default for k, o in cls.options.items()}
    train_size = cls.default_train_size if train_size is None else float(train_size)
    arguments = dict(model=model, epochs=epochs, patience=patience, train_size=train_size,
                     batch_size=batch_size, lr=lr, seed=seed, **{**declared, **options})
    # data-access settings are recorded only when set (and not the default), so that runs made
    # without them still resume
    chunk_size, buffer_batches = unset_defaults(chunk_size, buffer_batches, bool(backed))
    reading = dict(backed=bool(backed), chunk_size=chunk_size, buffer_batches=buffer_batches)
    arguments.update({k: v for k, v in reading.items() if v not in (None, False)})
    run_info = {"arguments": json.loads(json.dumps(arguments, default=str)), "spec": spec.to_dict(),
                "data": None if not isinstance(data, (str, Path)) else str(data)}
    context = _distributed_context(device)
    main = context is None or context.is_main
    if out is not None and main:
        prepare_run_dir(out, resume=resume, overwrite=overwrite, run_info=run_info)
    if context is not None:
        context.barrier()  # the run directory is ready before any rank reads a checkpoint
    dataset = read_dataset(data, spec, backed=backed)
    run_info["data_fingerprint"] = data_fingerprint(dataset)
    if out is not None and resume:
        check_same_data(Path(out), run_info)
    seed_everything(seed)
    net = build_model(model, dataset, **model_options)
    stages = cls.default_stages(epochs=epochs, patience=patience, **schedule)
    config = TrainingConfig(batch_size=batch_size, lr=lr, seed=seed, device=device, progress=progress,
                            chunk_size=chunk_size, buffer_batches=buffer_batches)
    train, validation = training_split(dataset.n_cells, train_size, seed)
    trainer_cls, parallel = Trainer, {}
    if context is not None:
        from .infer.distributed import DistributedTrainer
        trainer_cls, parallel = DistributedTrainer, {"context": context}
    trainer = trainer_cls(net, dataset.subset(train) if len(validation) else dataset, stages, config,
                          checkpoint_dir=Path(out) / CHECKPOINT_DIR if out is not None else None,
                          run_info=run_info, validation=dataset.subset(validation) if len(validation) else None,
                          **parallel)
    history = trainer.fit(resume=resume)
    net.to("cpu")
    result = FitResult(model=net, dataset=dataset, history=history, validation=validation,
                       tables=output_tables(net, dataset) if main else {})
    if out is not None and main:
        write_run_dir(result, out, spec=spec.to_dict(), arguments=arguments)
    if context is not None:
        context.barrier()  # every rank returns once rank 0 has written the outputs
    return result


def _distributed_context(device: str):
    """This process's :class:`~pyro_livi.infer.distributed.DistributedContext` when it is one of a
    data-parallel run (launched by torchrun or ``nproc``, or a process group already set up), else None."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 and not (dist.is_available() and dist.is_initialized()):
        return None
    from .infer.distributed import DistributedContext

    return DistributedContext.from_env(device)


def write_run_dir(result: FitResult, out: str | Path, *, spec: dict | None = None,
                  arguments: dict | None = None) -> Path:
    """Write a fitted model's outputs.

    RUN_DIR/model.pt, one TSV per table the model declares (:func:`~pyro_livi.analysis.latents.output_tables`:
    e.g. cell_state.tsv or latent.tsv with cell ids as rows; for donor models D.tsv and V.tsv
    with donor ids as rows, A.tsv; loadings_<decoder>.tsv, dispersions_<modality>.tsv with
    feature names as rows), history.tsv (per-epoch loss and each ELBO term / penalty, per
    cell), loss_curve.png, run.json (the arguments of the fit, and under ``"outputs"`` the
    files written, which ``overwrite`` removes and nothing else).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, dataset = result.model, result.dataset
    save_model(model, out, donor_index=dataset.donor_index,
               covariate_categories=dataset.covariate_categories,
               feature_names=dataset.feature_names, spec=spec)
    tables = result.tables or output_tables(model, dataset)
    for name, table in tables.items():
        table.to_csv(out / f"{name}.tsv", sep="\t")
    result.history.to_csv(out / "history.tsv", sep="\t", index=False)
    plot_loss_curves(result.history, out / "loss_curve.png", model=model)
    written = [MODEL_FILE, *(f"{name}.tsv" for name in tables), "history.tsv", "loss_curve.png", "run.json"]
    if len(result.validation):
        held = np.zeros(dataset.n_cells, dtype=bool)
        held[result.validation] = True
        pd.DataFrame({"set": np.where(held, "validation", "train")},
                     index=pd.Index(dataset.obs_names, name="cell")).to_csv(out / SPLIT_FILE, sep="\t")
        written.append(SPLIT_FILE)
    (out / "run.json").write_text(json.dumps({**(arguments or {}), "outputs": written}, indent=2, default=str))
    result.tables, result.run_dir = tables, out
    return out
