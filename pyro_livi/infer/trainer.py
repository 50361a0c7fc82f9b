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
from pyro.infer.util import is_validation_enabled
from ..progress import tqdm

from ..data.loader import MinibatchLoader
from ..errors import InputError, RunDirectoryError, TrainingDivergedError
from .elbo import elbo_terms
from .stages import EarlyStopping, Stage, direction_change, is_real, is_whole

CHECKPOINT_NAME = "checkpoint.pt"

#: An epoch whose per-cell loss exceeds this many times the first epoch's (at least 1.0 in
#: absolute value) counts as diverged: healthy training lowers the loss, and a loss that has grown
#: a million-fold belongs to a model whose outputs are meaningless even while it is still finite.
LOSS_EXPLOSION_FACTOR = 1e6

#: Run Pyro's distribution checks (arguments in their support, observed values in the support)
#: on every training batch instead of the first batch of each epoch. They cost a few passes over
#: every (cells x features) tensor per step; the data are checked when read, and a parameter
#: that becomes non-finite or leaves its support between two checked batches makes the loss or a
#: gradient non-finite, which the loss and gradient checks of every step catch and then trace to
#: its site (the same error, :class:`TrainingDivergedError`). Pyro's global switch
#: (``pyro.enable_validation(False)``) turns the checks off everywhere.
VALIDATE_EVERY_BATCH = False

#: Settings of :class:`TrainingConfig` that may change when resuming (they do not change the result).
RESUMABLE_CHANGES = ("device", "progress")

__all__ = ["CHECKPOINT_NAME", "LOSS_EXPLOSION_FACTOR", "MAX_SEED", "Trainer", "TrainingConfig",
           "TrainingDivergedError", "check_learning_rate", "check_seed", "seed_everything"]


@dataclass
class TrainingConfig:
    """Settings of the training loop.

    lr: Adam learning rate of every parameter group without its own rate in the stage
        (:attr:`Stage.group_lr`).
    chunk_size, buffer_batches: the shuffle of the training minibatches
        (:class:`~pyro_livi.data.MinibatchLoader`); None: its defaults (chunks of 128 cells in
        buffers of 32 minibatches for backed data, a permutation of the cells in memory).
    """

    batch_size: int = 1024
    lr: float = 8e-4
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    chunk_size: int | None = None
    buffer_batches: int | None = None

    def __post_init__(self):
        """Raises InputError for a learning rate that is not a positive number, or a seed outside
        0 .. 2**32 - 1 (:func:`check_learning_rate`, :func:`check_seed`)."""
        check_learning_rate(self.lr)
        check_seed(self.seed)


#: Largest seed: NumPy's generator, which Pyro seeds with the same value, takes 0 .. 2**32 - 1.
MAX_SEED = 2 ** 32 - 1


def check_seed(seed, keyword: str = "seed", flag: str = "--seed") -> int:
    """``seed`` as an int; an InputError naming ``flag`` / ``keyword`` unless it is a whole number
    from 0 to :data:`MAX_SEED` (the seeds NumPy accepts)."""
    if not is_whole(seed) or not 0 <= int(seed) <= MAX_SEED:
        raise InputError("<arguments>", keyword,
                         f"the seed must be a whole number from 0 to 2**32 - 1 ({MAX_SEED}), got {seed!r}",
                         f"give e.g. {flag} 0 on the CLI ({keyword}=0 in Python)")
    return int(seed)


def check_learning_rate(lr, keyword: str = "lr", flag: str = "--lr") -> float:
    """``lr`` as a float; an InputError naming ``flag`` / ``keyword`` unless it is a finite number
    > 0 (Adam moves against the gradient by about ``lr`` per step: a negative rate climbs the
    loss, a zero rate trains nothing)."""
    if not is_real(lr) or lr <= 0:
        raise InputError("<arguments>", keyword, f"the learning rate must be a positive number, got {lr!r}",
                         f"give a rate > 0, e.g. {flag} 8e-4 on the CLI ({keyword}=8e-4 in Python), the default; "
                         "lower it (e.g. ten-fold) if training diverges")
    return float(lr)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and Pyro from one user seed (0 .. 2**32 - 1; an InputError
    naming ``--seed`` / ``seed=`` otherwise)."""
    pyro.set_rng_seed(check_seed(seed))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    """Restore :func:`_rng_state`; the CUDA generators only where the checkpoint has them and this
    machine has as many GPUs (a GPU checkpoint resumed on the CPU keeps the CPU generators)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


def _donor_dict(dataset) -> dict | None:
    return None if dataset.donor_index is None else dataset.donor_index.to_dict()


class Trainer:
    """Fit a zoo model to a :class:`~pyro_livi.data.SingleCellDataset` through its stages.

    ``checkpoint_dir`` (optional) receives ``checkpoint.pt`` after every epoch; ``fit(resume=True)``
    continues from it (a :class:`~pyro_livi.errors.RunDirectoryError` names what differs when the
    checkpoint was made by another model, config, schedule, training settings or donors).
    ``run_info`` (optional, JSON-like) is stored in the checkpoint, e.g. the arguments and data
    spec of :func:`pyro_livi.run.fit`, which compares them before resuming.
    ``callbacks`` are called as ``callback(trainer, record)`` after each epoch.
    ``validation`` (optional) holds cells the model does not train on: after every epoch their
    loss per cell (the same terms, the guide's sample, dropout off, the training RNG untouched)
    is recorded as ``validation_loss``, and early stopping watches it (``monitor="auto"``).

    Every numerical failure (a NaN/inf loss term, parameter, gradient or distribution argument,
    or a loss that grew :data:`LOSS_EXPLOSION_FACTOR`-fold) raises a
    :class:`~pyro_livi.errors.TrainingDivergedError` naming the stage, the epoch, the site or
    parameter, and the last checkpoint written (which always holds finite parameters).
    """

    def __init__(self, model, dataset, stages: list[Stage], config: TrainingConfig | None = None,
                 checkpoint_dir: str | Path | None = None, callbacks=(), run_info: dict | None = None,
                 validation=None):
        self.model = model
        self.dataset = dataset
        self.validation = validation if validation is not None and validation.n_cells else None
        self.stages = list(stages)
        for stage in self.stages:
            stage.check_trainable()
        self.config = config or TrainingConfig()
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.callbacks = list(callbacks)
        self.history: list[dict] = []
        self._position = {"stage": 0, "epoch_in_stage": 0, "epoch": 0}
        self._stop_state: dict = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending_optimizer_state = None
        self.run_info = run_info
        #: epoch after which this trainer last wrote (or, resuming, read) the checkpoint
        self._checkpoint_epoch: int | None = None
        self._param_names: dict[int, str] = {}

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
        self._param_names = {id(p): n for n, p in self.model.named_parameters()}
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

    def _stalled(self, stop: EarlyStopping, loss: float, watched: dict) -> bool:
        """Update the early-stopping state with one epoch (its monitored loss and the watched
        parameters at its end); True when the stage should end (see :class:`EarlyStopping`)."""
        state = self._stop_state
        best = state.get("best", math.inf)
        improved = loss < best - stop.min_delta * abs(best) if math.isfinite(best) else True
        if improved:
            state["best"] = loss
        state["stall"] = 0 if improved else state.get("stall", 0) + 1
        window = state.setdefault("window", [])
        if watched:
            window.append({k: v.cpu() for k, v in watched.items()})
            del window[:-2 * stop.patience]
        change = 0.0
        if watched:
            change = math.nan  # not measured until both windows are full
            if len(window) == 2 * stop.patience:
                mean = {k: [torch.stack([w[k] for w in half]).mean(0)
                            for half in (window[:stop.patience], window[stop.patience:])] for k in watched}
                change = max(direction_change(last, first) for first, last in mean.values())
        state["factor_change"] = change
        return state["stall"] >= stop.patience and change < stop.factor_tol

    # ------------------------------------------------------------------------- loop
    def fit(self, resume: bool = False) -> pd.DataFrame:
        """Train through every stage; return the loss history (one row per epoch)."""
        if resume:
            self.load_checkpoint()
        else:
            seed_everything(self.config.seed)
        device = torch.device(self.config.device)
        self.model.to(device)
        loader = self._make_loader()
        n_cells = self.dataset.n_cells
        bar = None
        try:
            while self._position["stage"] < len(self.stages):
                stage = self.stages[self._position["stage"]]
                self._enter_stage(stage)
                bar = tqdm(total=stage.epochs, initial=self._position["epoch_in_stage"],
                           desc=f"{stage.name}", unit="epoch", disable=not self.config.progress,
                           leave=True)
                stage_index = self._position["stage"]
                while self._position["stage"] == stage_index:
                    record = self._run_epoch(stage, loader, n_cells, device)
                    self._check_epoch(stage, record)
                    if self.validation is not None:
                        record["validation_loss"] = self._validation_loss(stage, device)
                    for group in self._optimizer.param_groups:
                        group["lr"] *= stage.lr_decay ** (1.0 / stage.epochs)
                    stopped = False
                    if stage.early_stopping is not None:
                        stopped = self._stalled(stage.early_stopping, self._monitored(stage, record),
                                                self._watched(stage.early_stopping))
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
        except BaseException as err:
            if bar is not None:
                bar.close()  # so that a message printed next starts on its own line
            if isinstance(err, KeyboardInterrupt):
                where = (f"{self.checkpoint_path} (after epoch {self._checkpoint_epoch})"
                         if self._checkpoint_epoch is not None else "none written yet")
                print(f"Interrupted; last checkpoint: {where}. "
                      "Continue with --resume on the CLI (resume=True in Python).")
            raise
        self.model.components = set(self.model.components_all)
        for p in self.model.parameters():
            p.requires_grad_(True)
        return self.history_frame()

    def _make_loader(self) -> MinibatchLoader:
        """The training minibatches: every cell once per epoch, seeded shuffling (hook: data-parallel
        training, :mod:`pyro_livi.infer.distributed`, gives each process its shard of every batch)."""
        return MinibatchLoader(self.dataset, batch_size=self.config.batch_size, shuffle=True,
                               seed=self.config.seed, chunk_size=self.config.chunk_size,
                               buffer_batches=self.config.buffer_batches)

    def _validation_batches(self, cells):
        """(minibatch, number of held-out cells its terms stand for) over the held-out cells
        (hook: data-parallel training gives each process its shard of every minibatch)."""
        for batch in MinibatchLoader(cells, batch_size=self.config.batch_size, shuffle=False):
            yield batch, batch.size

    def _combine_validation(self, total: float) -> float:
        """The held-out loss total of this process as the whole run's (hook: data-parallel
        training averages it over the processes)."""
        return total

    def _after_backward(self) -> None:
        """Hook between the backward pass and the gradient check of every step; nothing here
        (data-parallel training averages the gradients over the processes)."""

    def _run_epoch(self, stage: Stage, loader: MinibatchLoader, n_cells: int, device) -> dict:
        loader.set_epoch(self._position["epoch"])
        sums: dict[str, float] = {}
        n_batches = 0
        validating = is_validation_enabled()
        start = time.perf_counter()
        for batch in loader:
            batch = batch.to(device)
            kl_weight = 1.0
            if stage.kl_warmup is not None:
                epoch = self._position["epoch_in_stage"]
                kl_weight = stage.kl_warmup.weight(epoch * len(loader) + n_batches, epoch)
            try:
                # Pyro's distribution checks run on the first batch of every epoch (see
                # VALIDATE_EVERY_BATCH); the loss and gradient checks below run on every batch
                with pyro.validation_enabled(validating and (VALIDATE_EVERY_BATCH or n_batches == 0)):
                    terms = elbo_terms(self.stage_model, self.stage_guide, batch)
                if kl_weight != 1.0:
                    terms = {k: v * kl_weight if k.startswith("kl_") else v for k, v in terms.items()}
            except (ValueError, torch.linalg.LinAlgError) as err:
                # distribution argument checks reject non-finite or out-of-support parameters
                what = self._diagnose(batch)
                if what is None and not _numerical(err):
                    raise  # e.g. invalid observed data: not a numerical failure of training
                raise self._diverged(stage, n_batches, what or _first_line(err)) from err
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                bad = {k: v.item() for k, v in terms.items() if not torch.isfinite(v)}
                what = f"the loss became {loss.item()} (terms {bad})"
                origin = self._diagnose(batch)
                if origin:
                    what += f"; {origin}"
                raise self._diverged(stage, n_batches, what)
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._after_backward()
            self._check_gradients(stage, n_batches)
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

    def _monitored(self, stage: Stage, record: dict) -> float:
        """The loss early stopping watches in this epoch (see :class:`EarlyStopping`)."""
        monitor = stage.early_stopping.monitor
        if monitor == "auto":
            monitor = "validation_loss" if "validation_loss" in record else "loss"
        if monitor not in record:
            raise ValueError(f"stage {stage.name!r}: early stopping monitors {monitor!r}, which is not "
                             "recorded (validation_loss needs held-out cells)")
        return record[monitor]

    @torch.no_grad()
    def _validation_loss(self, stage: Stage, device) -> float:
        """Loss per held-out cell: each batch's terms estimate the sum over all held-out cells,
        so they are weighted by the batch's share of the cells."""
        cells = self.validation
        total = 0.0
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
                torch.manual_seed(self.config.seed + self._position["epoch"])
                for batch, n_step in self._validation_batches(cells):
                    batch = batch.to(device)
                    try:
                        terms = elbo_terms(self.stage_model, self.stage_guide, batch)
                    except (ValueError, torch.linalg.LinAlgError) as err:
                        what = self._diagnose(batch)
                        if what is None and not _numerical(err):
                            raise
                        raise self._diverged(stage, None, "on the validation cells: "
                                             + (what or _first_line(err))) from err
                    total += float(sum(terms.values())) * n_step / cells.n_cells
        finally:
            self.model.train(was_training)
        total = self._combine_validation(total)
        if not math.isfinite(total):
            raise self._diverged(stage, None, f"the loss of the validation cells became {total}")
        return total / cells.n_cells

    # ------------------------------------------------------------ numerical failures
    def _diverged(self, stage: Stage, n_batches: int | None, what: str) -> TrainingDivergedError:
        """The divergence error: stage, epoch, batch, what failed, the last checkpoint, the fix."""
        reason = ""
        checkpoint = None
        if self.checkpoint_dir is None:
            reason = "no checkpoint directory was given"
        elif self._checkpoint_epoch is None or not self.checkpoint_path.exists():
            reason = "training failed before the end of its first epoch"
        else:
            checkpoint = self.checkpoint_path
        return TrainingDivergedError(
            what, stage=stage.name, epoch=self._position["epoch"], batch=n_batches,
            checkpoint=checkpoint, checkpoint_epoch=self._checkpoint_epoch, no_checkpoint_reason=reason,
            lr=self.config.lr, group_lr={g: r for g, r in stage.group_lr.items() if g in stage.train})

    def _nonfinite_parameters(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]

    def _diagnose(self, batch) -> str | None:
        """Where a numerical failure comes from: the non-finite parameters, else the first guide
        or model sample site whose distribution arguments or sampled value are non-finite or
        outside their support (found by re-running the batch with validation off). None when
        nothing numerical is found (e.g. the observed data are invalid)."""
        bad = self._nonfinite_parameters()
        if bad:
            return f"parameter(s) {bad} are not finite"
        try:
            with pyro.validation_enabled(False), torch.no_grad():
                guide_trace = poutine.trace(self.stage_guide).get_trace(batch)
                model_trace = poutine.trace(poutine.replay(self.stage_model, trace=guide_trace)).get_trace(batch)
        except Exception:  # noqa: BLE001 - a diagnosis must never hide the original failure
            return None
        for role, trace in (("guide", guide_trace), ("model", model_trace)):
            for name, site in trace.nodes.items():
                if site["type"] == "sample":
                    problem = _site_problem(site)
                    if problem:
                        return f"{role} sample site '{name}': {problem}"
        return None

    def _check_gradients(self, stage: Stage, n_batches: int) -> None:
        """Refuse an optimiser step with non-finite gradients (it would make parameters NaN)."""
        grads = [p.grad for g in self._optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads, math.inf))).all()):
            return
        bad = [self._param_names.get(id(p), "?") for g in self._optimizer.param_groups for p in g["params"]
               if p.grad is not None and not torch.isfinite(p.grad).all()]
        raise self._diverged(stage, n_batches, f"the gradient of parameter(s) {bad} is not finite")

    def _check_epoch(self, stage: Stage, record: dict) -> None:
        """After an epoch: the parameters are finite and the loss has not exploded."""
        bad = self._nonfinite_parameters()
        if bad:
            raise self._diverged(stage, None, f"parameter(s) {bad} are not finite at the end of the epoch")
        first = self.history[0]["loss"] if self.history else record["loss"]
        if math.isfinite(first) and record["loss"] > LOSS_EXPLOSION_FACTOR * max(abs(first), 1.0):
            terms = {k: v for k, v in record.items()
                     if isinstance(v, float) and k not in ("loss", "cells_per_s", "factor_change")}
            largest = max(terms, key=lambda k: abs(terms[k])) if terms else "loss"
            raise self._diverged(stage, None, f"the loss exploded from {first:.4g} per cell (first epoch) to "
                                 f"{record['loss']:.4g} (largest term: {largest})")

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
        if self._nonfinite_parameters():  # a checkpoint always holds finite parameters
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
            "run": self.run_info,
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path)
        self._checkpoint_epoch = self._position["epoch"] - 1

    def load_checkpoint(self) -> None:
        """Restore the state saved by :meth:`save_checkpoint`; a RunDirectoryError when there is
        none or when it was made by another model, config, schedule, training settings or donors."""
        path = self.checkpoint_path
        if path is None or not path.exists():
            raise RunDirectoryError(
                path if path is not None else "<trainer>", "resume",
                "no checkpoint to resume from" + ("" if path is not None else " (no checkpoint_dir)"),
                "run without resume to start training (drop --resume on the CLI, resume=False in Python)")
        state = torch.load(path, map_location="cpu", weights_only=False)  # written on a GPU or not
        differ = []
        if state["model_class"] != type(self.model).__name__:
            differ.append(f"model class: {state['model_class']} in the checkpoint, {type(self.model).__name__} now")
        else:
            differ += [f"model config {k}: {a!r} in the checkpoint, {b!r} now"
                       for k, a, b in _differences(state["model_config"], self.model.config)]
        # settings added later than a checkpoint was written take their defaults
        stored_config = {k: v for k, v in {**asdict(TrainingConfig()), **state.get("training_config", {})}.items()
                         if k not in RESUMABLE_CHANGES}
        config = {k: v for k, v in asdict(self.config).items() if k not in RESUMABLE_CHANGES}
        differ += [f"training setting {k} (--{k.replace('_', '-')} / {k}=): {shown_setting(k, a)} in the "
                   f"checkpoint, {shown_setting(k, b)} now" for k, a, b in _differences(stored_config, config)]
        stages = [s.to_dict() for s in self.stages]
        if "stages" in state and state["stages"] != stages:
            differ.append(f"training stages: {_stage_summary(state['stages'])} in the checkpoint, "
                          f"{_stage_summary(stages)} now")
        if differ:
            raise RunDirectoryError(
                path, "resume", "the checkpoint was made with other settings: " + "; ".join(differ),
                "resume with the settings of the checkpoint, or use a fresh checkpoint directory "
                "(another --out / out=, or --overwrite / overwrite=True to discard it)")
        if state["donor_index"] != _donor_dict(self.dataset):
            raise RunDirectoryError(
                path, "resume", "the checkpoint was trained on other donors than this dataset's",
                "resume with the data the checkpoint was trained on, or use a fresh checkpoint directory")
        self.model.load_state_dict(state["model_state"])
        self._position = state["position"]
        self._stop_state = state["stop_state"]
        self.history = state["history"]
        self._pending_optimizer_state = state["optimizer_state"]
        self._checkpoint_epoch = self._position["epoch"] - 1 if self._position["epoch"] else None
        _set_rng_state(state["rng"])


def read_checkpoint(path: str | Path) -> dict:
    """The state dict stored by :meth:`Trainer.save_checkpoint` (CPU tensors)."""
    return torch.load(Path(path), map_location="cpu", weights_only=False)


def _differences(stored: dict, now: dict) -> list[tuple[str, object, object]]:
    """``(key, stored, now)`` for every key whose value differs (lists and tuples compare alike)."""
    def norm(v):
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        return v
    missing = object()
    out = []
    for k in list(stored) + [k for k in now if k not in stored]:
        a, b = stored.get(k, missing), now.get(k, missing)
        if norm(a) != norm(b):
            out.append((k, None if a is missing else a, None if b is missing else b))
    return out


def shown_setting(name: str, value) -> str:
    """A compared run setting as its user gave it, for resume messages: ``backed`` as given / not
    given, an unset ``chunk_size`` or ``buffer_batches`` (None: recorded only when given) as the
    default, anything else as its repr."""
    if name == "backed":
        return "given" if value else "not given"
    if name in ("chunk_size", "buffer_batches") and value is None:
        return "not given (the default)"
    return repr(value)


def _stage_summary(stages: list[dict]) -> str:
    return ", ".join(f"{s['name']} ({s['epochs']} epochs)" for s in stages)


def _numerical(err: Exception) -> bool:
    """Whether an exception raised inside the ELBO is a numerical failure of training."""
    if isinstance(err, torch.linalg.LinAlgError):
        return True
    text = str(err)
    return text.startswith("Expected parameter") or ("found invalid values" in text
                                                     and "Expected value argument" not in text)


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _site_problem(site: dict) -> str | None:
    """What is numerically wrong at a traced sample site: a non-finite or out-of-support
    distribution argument, or (latent sites) a non-finite sampled value; None if nothing."""
    fn = site["fn"]
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    for pname, constraint in getattr(fn, "arg_constraints", {}).items():
        value = fn.__dict__.get(pname)  # only stored arguments (no lazy conversions)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        finite = torch.isfinite(value)
        if not finite.all():
            n = int((~finite).sum())
            return (f"argument {pname} of its {type(fn).__name__} distribution has {n:,} non-finite "
                    f"value(s) of {value.numel():,}")
        try:
            ok = constraint.check(value)
        except Exception:  # noqa: BLE001 - constraints that cannot check a plain tensor
            continue
        if not bool(ok.all()):
            return (f"argument {pname} of its {type(fn).__name__} distribution is outside its support "
                    f"({constraint}) in {int((~ok).sum()):,} value(s)")
    value = site.get("value")
    if not site.get("is_observed") and isinstance(value, torch.Tensor) and value.is_floating_point():
        if not torch.isfinite(value).all():
            return f"its sampled value has {int((~torch.isfinite(value)).sum()):,} non-finite entries"
    return None
