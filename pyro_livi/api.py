"""The user layer over every model of the zoo, in the conventions of scvi-tools and scanpy.

>>> m = Model(adata, "scvi", n_latent=10)            # any registered model, its options as keywords
>>> m.train(max_epochs=100)
>>> adata.obsm["X_scvi"] = m.get_latent_representation()
>>> m.get_normalized_expression(library_size=1e4)    # cells x genes DataFrame
>>> m.save("run/"); m2 = Model.load("run/", adata=new_cells)

``m.module`` is the PyroModule itself, so the notebook way keeps working untouched:
``SVI(m.module.model, m.module.guide, optim, loss).step(batch)``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .analysis.denoise import normalized_expression, predictive_samples
from .analysis.latents import cell_state, donor_factor_tables, specific_state_tables
from .data import DatasetSpec, read_dataset
from .data.loader import unset_defaults
from .errors import InputError
from .infer import Trainer, TrainingConfig, seed_everything
from .infer.trainer import check_seed
from .models import model_class
from .persistence import MODEL_FILE, load_model, save_model
from .run import build_model, check_training_settings, split_options, training_split


class Model:
    """A model of the zoo bound to data (an AnnData or MuData, in memory or a path).

    Parameters
    ----------
    data : AnnData | MuData | str | Path
        The cells; never modified (write-back is :meth:`write_to`).
    model : str
        Registered name (``pyro-livi models``).
    modalities, layer, donor_key, covariate_keys, label_keys, optional_modalities,
    continuous_modalities : what to read, as in :class:`pyro_livi.data.DatasetSpec`
        (default modalities: ``{"rna": layer}``).
    likelihoods : {modality: registered likelihood name}.
    seed : seed of the initialisation, 0 .. 2**32 - 1.
    backed : leave the counts of a ``.h5ad``/``.h5mu`` path on disk (memory flat in the number of
        cells; training then reads chunks of cells, see :meth:`train`).
    options : the model's options (and its schedule options, used by :meth:`train`).

    Raises InputError on bad input, naming the keyword and the fix.
    """

    def __init__(self, data, model: str = "scvi", *, modalities: dict | None = None, layer: str | None = None,
                 donor_key: str | None = None, covariate_keys=(), label_keys=(), optional_modalities=(),
                 continuous_modalities=(), likelihoods: dict | None = None, seed: int = 0, backed: bool = False,
                 **options):
        check_seed(seed)
        model_options, self._schedule_options = split_options(model, options)
        self.spec = DatasetSpec(modalities=modalities or {"rna": layer}, donor_key=donor_key,
                                covariate_keys=list(covariate_keys), label_keys=list(label_keys),
                                optional_modalities=list(optional_modalities),
                                continuous_modalities=list(continuous_modalities))
        self.data = data
        self.dataset = read_dataset(data, self.spec, backed=backed)
        seed_everything(seed)
        if likelihoods:
            model_options["likelihoods"] = likelihoods
        self.module = build_model(model, self.dataset, **model_options)
        self.name = model
        self.history: pd.DataFrame | None = None
        self._trained = False
        self._donors, self._categories = self.dataset.donor_index, self.dataset.covariate_categories

    @classmethod
    def _wrap(cls, module, dataset, spec: DatasetSpec, data, meta: dict, history=None) -> "Model":
        self = cls.__new__(cls)
        self.module, self.dataset, self.spec, self.data = module, dataset, spec, data
        self.name, self.history, self._schedule_options = type(module).registry_name, history, {}
        self._trained = True  # a saved model
        self._donors, self._categories = meta["donor_index"], meta["covariate_categories"]
        self._feature_names = meta["feature_names"]
        return self

    def __repr__(self) -> str:
        state = "untrained" if self.history is None else f"trained {len(self.history)} epochs"
        return f"Model({self.name}, {self.dataset!r}, {state})"

    # ------------------------------------------------------------------------------ training
    def train(self, max_epochs: int = 200, *, train_size: float | None = None, batch_size: int = 1024,
              lr: float = 8e-4, patience: int | None = 20, seed: int = 0, device: str = "cpu",
              progress: bool = True, checkpoint_dir=None, resume: bool = False, chunk_size: int | None = None,
              buffer_batches: int | None = None, **schedule_options) -> pd.DataFrame:
        """Train on the model's default schedule (``max_epochs``: its last stage); returns and
        keeps the history (one row per epoch, with ``validation_loss`` when cells are held out).
        ``train_size``: fraction of cells trained on (seeded split; None: the model's default,
        0.9, or 1.0 for the LIVI family); the held-out positions are kept in
        ``self.validation``. ``schedule_options`` (e.g. the LIVI family's ``epochs_vae``)
        override those given at construction. ``chunk_size``, ``buffer_batches``: the shuffle of
        the minibatches (:class:`~pyro_livi.data.MinibatchLoader`; defaults: chunks of 128 cells
        in buffers of 32 minibatches for backed data, a permutation of the cells in memory).
        Raises InputError (naming the keyword) for ``max_epochs`` < 1, a negative ``patience``
        (None or 0: no early stopping), ``lr`` <= 0, or ``seed`` outside 0 .. 2**32 - 1."""
        patience = check_training_settings(epochs=max_epochs, patience=patience, lr=lr, seed=seed,
                                           epochs_keyword="max_epochs")
        cls = model_class(self.name)
        options = {**self._schedule_options, **schedule_options}
        _, schedule = split_options(self.name, options)
        stages = cls.default_stages(epochs=max_epochs, patience=patience, **schedule)
        chunk_size, buffer_batches = unset_defaults(chunk_size, buffer_batches, self.dataset.backed)
        config = TrainingConfig(batch_size=batch_size, lr=lr, seed=seed, device=device, progress=progress,
                                chunk_size=chunk_size, buffer_batches=buffer_batches)
        train_size = cls.default_train_size if train_size is None else train_size
        train, self.validation = training_split(self.dataset.n_cells, train_size, seed)
        held = self.dataset.subset(self.validation) if len(self.validation) else None
        trainer = Trainer(self.module, self.dataset.subset(train) if held is not None else self.dataset, stages,
                          config, checkpoint_dir=checkpoint_dir, validation=held)
        self.history = trainer.fit(resume=resume)
        self._trained = True
        self.module.to("cpu")
        return self.history

    # --------------------------------------------------------------------- data of new cells
    def _cells(self, adata):
        """The training cells, or ``adata`` read as the model was fitted (its spec, donors and
        covariate categories; unseen donors or categories raise an InputError). Warns when the
        model has not been trained (its outputs are those of the initial parameters)."""
        self._warn_if_untrained()
        if adata is None:
            if self.dataset is None:
                raise InputError("<arguments>", "adata", "this model was loaded without data",
                                 "pass the cells: adata=... (or Model.load(path, adata=...))")
            return self.dataset
        return read_dataset(adata, self.spec, donor_index=self._donors, covariate_categories=self._categories)

    def _warn_if_untrained(self) -> None:
        if not self._trained:
            warnings.warn(f"querying an untrained {self.name} model: its outputs come from the initial "
                          "parameters; call .train() first", UserWarning, stacklevel=3)

    # ---------------------------------------------------------------------------- summaries
    def get_latent_representation(self, adata=None, *, give_mean: bool = True, latent: str | None = None,
                                  seed: int = 0) -> np.ndarray:
        """Per-cell latent, (n_cells, K): the posterior mean, or one posterior sample with
        ``give_mean=False``. ``latent`` names another per-cell latent of models that have
        several (e.g. DMLIVI's ``"s_prot"``; posterior means only)."""
        dataset = self._cells(adata)
        if latent is None:
            values = cell_state(self.module, dataset, n_samples=0 if give_mean else 1, seed=seed)
            return values if give_mean else values[0]
        tables = specific_state_tables(self.module, dataset)
        key = f"specific_state_{latent[2:]}" if latent.startswith("s_") else latent
        if key not in tables:
            names = ["c"] + [f"s_{k.removeprefix('specific_state_')}" for k in tables]
            raise InputError("<arguments>", "latent", f"{self.name} has no per-cell latent {latent!r}",
                             f"use one of {names}, or None for the main one")
        return tables[key].to_numpy()

    def get_normalized_expression(self, adata=None, *, library_size: float | None = 1e4,
                                  modality: str | None = None) -> pd.DataFrame:
        """Denoised means of ``modality`` (default: the first), cells x features, rescaled to
        ``library_size`` counts per cell (None: each cell's own total);
        :func:`pyro_livi.analysis.denoise.normalized_expression`."""
        return normalized_expression(self.module, self._cells(adata), modality=modality,
                                     library_size=library_size)

    def posterior_predictive_sample(self, adata=None, *, n_samples: int = 1, modality: str | None = None,
                                    seed: int = 0) -> np.ndarray:
        """Replicated values of ``modality``, (n_samples, n_cells, n_features)."""
        return predictive_samples(self.module, self._cells(adata), modality=modality, n_samples=n_samples,
                                  seed=seed)

    def get_donor_factors(self) -> dict[str, pd.DataFrame]:
        """Donor x factor tables (e.g. LIVI's ``D`` and ``V``); empty for donor-free models."""
        if "donor_factors" not in self.module.outputs:
            return {}
        self._warn_if_untrained()
        return donor_factor_tables(self.module, self._donors)

    # ----------------------------------------------------------------------------- write-back
    def write_to(self, adata=None, *, library_size: float | None = 1e4):
        """Add the model's results to ``adata`` (default: the data it was built with, when in
        memory) and return it: the latent in ``.obsm["X_<model>"]`` (other per-cell latents in
        ``.obsm["X_<model>_<name>"]``), denoised values in ``.layers["<model>_normalized"]`` of
        each modality, donor factors in ``.uns["<model>_donor_factors"]``. Counts, ``.X`` and
        existing entries other than these keys are left alone."""
        target = self.data if adata is None else adata
        if isinstance(target, (str, Path)):
            raise InputError(str(target), "adata", "results are written into an in-memory object",
                             "read the file (anndata.read_h5ad / mudata.read_h5mu) and pass it as adata=")
        dataset = self._cells(target)
        is_mu = hasattr(target, "mod")
        ref = target.mod[dataset.modalities[0]] if is_mu else target
        ref.obsm[f"X_{self.name}"] = cell_state(self.module, dataset)
        for key, table in specific_state_tables(self.module, dataset).items():
            ref.obsm[f"X_{self.name}_s_{key.removeprefix('specific_state_')}"] = table.to_numpy()
        for m in dataset.modalities:
            values = normalized_expression(self.module, dataset, modality=m, library_size=library_size)
            holder = target.mod[m] if is_mu else target
            rows = holder.obs_names.get_indexer(values.index)
            layer = np.full(holder.shape, np.nan, dtype=np.float32)
            present = rows >= 0
            layer[rows[present]] = values.to_numpy()[present]
            holder.layers[f"{self.name}_normalized"] = layer
        factors = self.get_donor_factors()
        if factors:
            target.uns[f"{self.name}_donor_factors"] = factors
        if is_mu:
            target.update()
        return target

    # --------------------------------------------------------------------------- save / load
    def save(self, path, *, overwrite: bool = False) -> Path:
        """Write ``path/model.pt`` (registered name, configuration, parameters, donor index,
        covariate categories, feature names, spec) and ``path/history.tsv``.

        Raises InputError when ``path`` already holds a saved model and not ``overwrite`` (as
        scvi-tools' ``save(dir_path, overwrite=False)``)."""
        path = Path(path)
        if not overwrite and ((path / MODEL_FILE).exists() or path.is_file()):
            raise InputError(path, "path", "already holds a saved model",
                             "pass overwrite=True to replace it, or save to another path")
        features = self.dataset.feature_names if self.dataset is not None else self._feature_names
        saved = save_model(self.module, path, donor_index=self._donors, covariate_categories=self._categories,
                           feature_names=features, spec=self.spec.to_dict())
        if self.history is not None:
            self.history.to_csv(saved.parent / "history.tsv", sep="\t", index=False)
        return saved

    @classmethod
    def load(cls, path, adata=None) -> "Model":
        """A saved model, bound to ``adata`` (new cells of known donors and categories, read
        with the saved spec). Without ``adata`` it can save and report, not embed."""
        module, meta = load_model(path)
        spec = DatasetSpec.from_dict(meta["spec"])
        history_path = Path(path) / "history.tsv"
        history = pd.read_csv(history_path, sep="\t") if Path(path).is_dir() and history_path.is_file() else None
        self = cls._wrap(module, None, spec, adata, meta, history)
        if adata is not None:
            self.dataset = self._cells(adata)
            for m, names in meta["feature_names"].items():
                if [str(n) for n in self.dataset.feature_names[m]] != list(names):
                    raise InputError(self.dataset.source, f"var_names of modality '{m}'",
                                     "the features differ from those the model was fitted on",
                                     "give data with the same features in the same order")
        return self
