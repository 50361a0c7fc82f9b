"""The training engine shared by every model of the zoo.

Stochastic variational inference over minibatches with the mean-field ELBO (analytic KL
where it exists), Adam with per-group learning rates, stages as data (freezing by parameter
group), early stopping, tqdm progress, per-site loss history, and checkpoints that resume to
the same result as an uninterrupted run.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch
from tqdm.auto import tqdm

from ..data.loader import MinibatchLoader
from .elbo import elbo_terms
from .stages import EarlyStopping, Stage

CHECKPOINT_NAME = "checkpoint.pt"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainingConfig:
    """Settings of the training loop.

    lr: Adam learning rate of every parameter group without its own rate in the stage
        (:attr:`Stage.group_lr`).
    """

    batch_size: int = 1024
    lr: float = 8e-4
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and Pyro from one user seed."""
    pyro.set_rng_seed(seed)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _donor_dict(dataset) -> dict | None:
    return None if dataset.donor_index is None else dataset.donor_index.to_dict()


class Trainer:
    """Fit a zoo model to a :class:`~pyro_livi.data.SingleCellDataset` through its stages.

    ``checkpoint_dir`` (optional) receives ``checkpoint.pt`` after every epoch; ``fit(resume=True)``
    continues from it. ``callbacks`` are called as ``callback(trainer, record)`` after each epoch.
    """

    def __init__(self, model, dataset, stages: list[Stage], config: TrainingConfig | None = None,
                 checkpoint_dir: str | Path | None = None, callbacks=()):
        self.model = model
        self.dataset = dataset
        self.stages = list(stages)
        self.config = config or TrainingConfig()
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.callbacks = list(callbacks)
        self.history: list[dict] = []
        self._position = {"stage": 0, "epoch_in_stage": 0, "epoch": 0}
        self._stop_state: dict = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending_optimizer_state = None

    # ---------------------------------------------------------------- stage machinery
    def _enter_stage(self, stage: Stage) -> None:
        """Switch model components on, freeze every group the stage does not train, build Adam."""
        unknown = set(stage.components) - set(self.model.components_all)
        if unknown:
            raise ValueError(f"stage {stage.name!r}: {type(self.model).__name__} has no components {sorted(unknown)}")
        self.model.components = set(stage.components)
        groups = self.model.parameters_by_group()
        missing = set(stage.train) - set(groups)
        if missing:
            raise ValueError(f"stage {stage.name!r}: unknown parameter groups {sorted(missing)}; "
                             f"the model has {sorted(groups)}")
        self._frozen_names = []
        param_groups = []
        for group, params in groups.items():
            trainable = group in stage.train
            for pname, p in params.items():
                p.requires_grad_(trainable)
                p.grad = None  # gradients from earlier stages must not leak into this one
                if not trainable:
                    self._frozen_names.append(self.model.pyro_param_name(pname))
            if trainable:
                lr = stage.group_lr.get(group, self.config.lr)
                param_groups.append({"params": list(params.values()), "lr": lr, "name": group})
        self._optimizer = torch.optim.Adam(param_groups)
        if self._pending_optimizer_state is not None:
            self._optimizer.load_state_dict(self._pending_optimizer_state)
            self._pending_optimizer_state = None

    def stage_model(self, *args, **kwargs):
        """The model with the frozen parameters hidden from Pyro (``poutine.block``)."""
        return poutine.block(self.model.model, hide=self._frozen_names)(*args, **kwargs)

    def stage_guide(self, *args, **kwargs):
        return poutine.block(self.model.guide, hide=self._frozen_names)(*args, **kwargs)

    def _watched(self, stop: EarlyStopping | None) -> dict[str, torch.Tensor]:
        if stop is None:
            return {}
        named = {k.removesuffix("_unconstrained"): p for k, p in self.model.named_parameters()}
        missing = set(stop.watch) - set(named)
        if missing:
            raise ValueError(f"early stopping watches {sorted(missing)}, which "
                             f"{type(self.model).__name__} does not have")
        return {w: named[w].detach().clone() for w in stop.watch}

    def _stalled(self, stop: EarlyStopping, loss: float, before: dict, after: dict) -> bool:
        """Update the early-stopping state with one epoch; True when the stage should end."""
        state = self._stop_state
        best = state.get("best", math.inf)
        improved = loss < best - stop.min_delta * abs(best) if math.isfinite(best) else True
        change = max((float((after[k] - before[k]).norm() / (after[k].norm() + 1e-12)) for k in after),
                     default=0.0)
        if improved:
            state["best"] = loss
        settled = change < stop.factor_tol
        state["stall"] = state.get("stall", 0) + 1 if (not improved and settled) else 0
        state["factor_change"] = change
        return state["stall"] >= stop.patience

    # ------------------------------------------------------------------------- loop
    def fit(self, resume: bool = False) -> pd.DataFrame:
        """Train through every stage; return the loss history (one row per epoch)."""
        if resume:
            self.load_checkpoint()
        else:
            seed_everything(self.config.seed)
        device = torch.device(self.config.device)
        self.model.to(device)
        loader = MinibatchLoader(self.dataset, batch_size=self.config.batch_size, shuffle=True,
                                 seed=self.config.seed)
        n_cells = self.dataset.n_cells
        try:
            while self._position["stage"] < len(self.stages):
                stage = self.stages[self._position["stage"]]
                self._enter_stage(stage)
                bar = tqdm(total=stage.epochs, initial=self._position["epoch_in_stage"],
                           desc=f"{stage.name}", unit="epoch", disable=not self.config.progress,
                           leave=True)
                stage_index = self._position["stage"]
                while self._position["stage"] == stage_index:
                    before = self._watched(stage.early_stopping)
                    record = self._run_epoch(stage, loader, n_cells, device)
                    for group in self._optimizer.param_groups:
                        group["lr"] *= stage.lr_decay ** (1.0 / stage.epochs)
                    after = self._watched(stage.early_stopping)
                    stopped = False
                    if stage.early_stopping is not None:
                        stopped = self._stalled(stage.early_stopping, record["loss"], before, after)
                        record["factor_change"] = self._stop_state["factor_change"]
                    self.history.append(record)
                    self._position["epoch_in_stage"] += 1
                    self._position["epoch"] += 1
                    if stopped or self._position["epoch_in_stage"] >= stage.epochs:
                        self._position.update(stage=self._position["stage"] + 1, epoch_in_stage=0)
                        self._stop_state = {}
                    self.save_checkpoint()
                    bar.set_postfix(loss=f"{record['loss']:.4g}")
                    bar.update(1)
                    for callback in self.callbacks:
                        callback(self, record)
                bar.close()
        except KeyboardInterrupt:
            where = self.checkpoint_path if self.checkpoint_dir else "nowhere (no checkpoint_dir)"
            print(f"Interrupted at epoch {self._position['epoch']}; last checkpoint: {where}. "
                  "Run again with resume to continue.")
            raise
        self.model.components = set(self.model.components_all)
        for p in self.model.parameters():
            p.requires_grad_(True)
        return self.history_frame()

    def _run_epoch(self, stage: Stage, loader: MinibatchLoader, n_cells: int, device) -> dict:
        loader.set_epoch(self._position["epoch"])
        sums: dict[str, float] = {}
        n_batches = 0
        start = time.perf_counter()
        for batch in loader:
            batch = batch.to(device)
            kl_weight = 1.0
            if stage.kl_warmup is not None:
                epoch = self._position["epoch_in_stage"]
                kl_weight = stage.kl_warmup.weight(epoch * len(loader) + n_batches, epoch)
            try:
                terms = elbo_terms(self.stage_model, self.stage_guide, batch)
                if kl_weight != 1.0:
                    terms = {k: v * kl_weight if k.startswith("kl_") else v for k, v in terms.items()}
            except ValueError as err:  # distribution argument checks reject non-finite parameters
                bad = [k for k, p in self.model.named_parameters() if not torch.isfinite(p).all()]
                if bad:
                    raise self._diverged(stage, n_batches, f"parameters {bad} are not finite") from err
                raise
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                raise self._diverged(stage, n_batches, f"the loss became {loss.item()}; terms: "
                                     f"{ {k: v.item() for k, v in terms.items()} }")
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._optimizer.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            n_batches += 1
        elapsed = time.perf_counter() - start
        # each minibatch's terms estimate the full-data sum; report per-cell means
        per_cell = {k: v / n_batches / n_cells for k, v in sums.items()}
        warmup = {"beta": kl_weight} if stage.kl_warmup is not None else {}  # KL weight, last step
        return {"stage": stage.name, "epoch": self._position["epoch"],
                "loss": sum(per_cell.values()), **per_cell, **warmup,
                "cells_per_s": n_cells / elapsed}

    def _diverged(self, stage: Stage, n_batches: int, what: str) -> TrainingDivergedError:
        last = self.checkpoint_path if self.checkpoint_dir else "none (no checkpoint_dir)"
        return TrainingDivergedError(
            f"{what} in stage {stage.name!r} at epoch {self._position['epoch']} (batch {n_batches}). "
            f"Last good checkpoint: {last}. Lower the learning rate or check the input counts."
        )

    def history_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.history)

    # ------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return self.checkpoint_dir / CHECKPOINT_NAME if self.checkpoint_dir else None

    def save_checkpoint(self) -> None:
        """Write parameters, module state, optimiser state, position, RNG state and history."""
        if self.checkpoint_dir is None:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "model_class": type(self.model).__name__,
            "model_config": self.model.config,
            "model_state": self.model.state_dict(),
            "optimizer_state": self._optimizer.state_dict() if self._position["epoch_in_stage"] else None,
            "position": dict(self._position),
            "stop_state": dict(self._stop_state),
            "rng": _rng_state(),
            "history": self.history,
            "stages": [s.to_dict() for s in self.stages],
            "training_config": asdict(self.config),
            "donor_index": _donor_dict(self.dataset),
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path)

    def load_checkpoint(self) -> None:
        path = self.checkpoint_path
        if path is None or not path.exists():
            raise FileNotFoundError(f"no checkpoint to resume from at {path}; run without resume first")
        state = torch.load(path, weights_only=False)
        if state["model_class"] != type(self.model).__name__ or state["model_config"] != self.model.config:
            raise ValueError(f"{path}: the checkpoint is of a {state['model_class']} with config "
                             f"{state['model_config']}, not of this model; use a fresh checkpoint directory")
        if state["donor_index"] != _donor_dict(self.dataset):
            raise ValueError(f"{path}: the checkpoint was trained on other donors than this dataset's")
        self.model.load_state_dict(state["model_state"])
        self._position = state["position"]
        self._stop_state = state["stop_state"]
        self.history = state["history"]
        self._pending_optimizer_state = state["optimizer_state"]
        _set_rng_state(state["rng"])
