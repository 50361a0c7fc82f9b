"""Training stages as data: what trains, what is frozen, which model parts are switched on."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import InputError

#: How the epoch settings of a model's schedule are given, for messages.
_EPOCH_FLAGS = ("--epochs / epochs= (max_epochs= in Model.train) for the last stage; the model's own "
                "schedule options for the others, e.g. --epochs-vae / epochs_vae= of the LIVI family "
                "(`pyro-livi fit --model NAME --help` lists them)")


def is_whole(value) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    """A finite real number (Python or NumPy), not a bool."""
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value))


def check_epochs(epochs, keyword: str = "epochs", flag: str = "--epochs") -> int:
    """``epochs`` as an int; an InputError naming ``flag`` / ``keyword`` unless it is a whole
    number >= 1 (a training run trains at least one epoch)."""
    if not is_whole(epochs) or epochs < 1:
        raise InputError("<arguments>", keyword, f"the number of epochs must be a whole number >= 1, got {epochs!r}",
                         f"give e.g. {flag} 200 on the CLI ({keyword}=200 in Python)")
    return int(epochs)


def check_patience(patience, keyword: str = "patience", flag: str = "--patience") -> int | None:
    """``patience`` as None (no early stopping) or an int >= 1; an InputError naming ``flag`` /
    ``keyword`` for anything else. 0 means no early stopping, as ``--patience 0`` on the CLI, and
    is returned as None."""
    if patience is None:
        return None
    if not is_whole(patience) or patience < 0:
        raise InputError("<arguments>", keyword,
                         f"early stopping's patience must be a whole number of stalled epochs >= 1, or "
                         f"None / 0 for no early stopping, got {patience!r}",
                         f"give e.g. {flag} 20 on the CLI ({keyword}=20 in Python), or {flag} 0 "
                         f"({keyword}=None) to train every epoch")
    return int(patience) or None


@dataclass
class EarlyStopping:
    """Stop a stage once its loss has stalled for ``patience`` consecutive epochs and the
    watched parameters have settled.

    An epoch *stalls* when the monitored per-cell loss did not improve on the stage's best by
    more than ``min_delta`` (relative). The watched parameters (e.g. the donor factors
    ``D_loc``, ``V_loc``; rows = donors, columns = factors) have *settled* when their columns
    point the same way in the last ``patience`` epochs as in the ``patience`` epochs before:
    with m and m' the two windows' means of a parameter, the change is the mean over columns k
    of 1 - |corr(m_k, m'_k)|, weighted by the variance of m_k across rows (see
    :func:`direction_change`), and must stay below ``factor_tol`` for every watched parameter.
    The measure ignores each factor's scale (traded freely against its loadings, and irrelevant
    to association tests) and the epoch-to-epoch jitter of stochastic optimisation (averaged
    over the windows), and collapsed factors, whose direction is noise, carry little weight.
    Watching the factors keeps a stage going while the donor embeddings still turn under a flat
    loss; with watched parameters a stage runs at least ``2 * patience`` epochs.
    ``monitor``: the loss watched, ``"validation_loss"`` (the held-out cells' loss),
    ``"loss"`` (the training loss) or ``"auto"`` (the held-out loss when the trainer has
    held-out cells, as scvi-tools, else the training loss).
    """

    patience: int = 20
    min_delta: float = 1e-4
    watch: tuple[str, ...] = ()
    factor_tol: float = 1e-3
    monitor: str = "auto"

    def __post_init__(self):
        """Raises InputError for a patience that is not a whole number >= 1 (naming ``--patience`` /
        ``patience=``: no early stopping is no EarlyStopping), or a negative or non-finite
        ``min_delta`` / ``factor_tol``."""
        if not is_whole(self.patience) or self.patience < 1:
            raise InputError("<arguments>", "patience",
                             f"early stopping's patience must be a whole number of stalled epochs >= 1, "
                             f"got {self.patience!r}",
                             "give e.g. --patience 20 on the CLI (patience=20 in Python), or --patience 0 "
                             "(patience=None) to train every epoch")
        for name in ("min_delta", "factor_tol"):
            value = getattr(self, name)
            if not is_real(value) or value < 0:
                raise InputError("<arguments>", f"EarlyStopping.{name}", f"must be a number >= 0, got {value!r}",
                                 "give a non-negative tolerance")


def direction_change(new, old) -> float:
    """How far the columns of ``new`` turned from those of ``old`` (both (rows, columns); a
    1-D tensor is one column): sum_k v_k (1 - |r_k|) / sum_k v_k, with r_k the Pearson
    correlation across rows of column k of ``new`` and ``old`` and v_k the variance of column
    k of ``new``. 0 when every column is an affine rescaling of the old one; at most 1.
    A parameter with fewer than two rows has no direction across rows: its relative change
    ||new - old|| / ||new|| is returned instead."""
    if new.dim() == 0 or new.shape[0] < 2:
        return float((new - old).norm() / new.norm().clamp_min(1e-12))
    new, old = new.reshape(new.shape[0], -1), old.reshape(old.shape[0], -1)
    a, b = new - new.mean(0), old - old.mean(0)
    v = (a * a).sum(0)
    r = (a * b).sum(0) / (v * (b * b).sum(0)).sqrt().clamp_min(1e-30)
    return float((v * (1 - r.abs())).sum() / v.sum().clamp_min(1e-30))


@dataclass
class KLWarmup:
    """KL annealing: the weight of every ``kl_*`` term of the loss rises linearly from
    ``beta_min`` to ``beta_max`` over the first ``steps`` optimiser steps of a stage (totalVI:
    0.75 x n_cells steps) or its first ``epochs`` epochs (seed 004, eq. 3.36), then stays at
    ``beta_max``. Give exactly one of ``steps`` and ``epochs``."""

    steps: int | None = None
    epochs: int | None = None
    beta_min: float = 0.0
    beta_max: float = 1.0

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("KLWarmup: give exactly one of steps and epochs")
        if (self.steps or self.epochs) < 1:
            raise ValueError("KLWarmup: steps or epochs must be >= 1")

    def weight(self, step: int, epoch: int) -> float:
        """The KL weight at optimiser step ``step`` of epoch ``epoch`` (both counted from 0
        within the stage)."""
        progress = step / self.steps if self.steps is not None else epoch / self.epochs
        return self.beta_min + (self.beta_max - self.beta_min) * min(1.0, progress)


@dataclass
class Stage:
    """One stage of training.

    name: label in the history and progress bar.
    epochs: maximum number of epochs.
    train: parameter groups the optimiser updates; every other group is frozen (hidden from
        Pyro with ``poutine.block``, ``requires_grad`` off, never given to the optimiser).
    components: optional model parts switched on (e.g. ``("persistent", "interaction")``);
        the sample sites of parts that are off are absent from model and guide.
    early_stopping: optional rule that ends the stage before ``epochs``.
    lr_decay: the learning rates fall geometrically to ``lr_decay`` times their start value
        over ``epochs`` (1.0 keeps them constant). A decaying rate lets point estimates
        settle instead of jittering at Adam's step size.
    group_lr: learning rates of some parameter groups ({group: lr}); every other trained group
        uses the training configuration's ``lr``.
    kl_warmup: optional :class:`KLWarmup` of the KL terms in this stage.
    """

    name: str
    epochs: int
    train: tuple[str, ...]
    components: tuple[str, ...] = ()
    early_stopping: EarlyStopping | None = None
    lr_decay: float = 1.0
    group_lr: dict = field(default_factory=dict)
    kl_warmup: KLWarmup | None = None

    def __post_init__(self):
        """Raises InputError (naming the stage and the settings that set the value) for negative
        or non-whole ``epochs`` (0 is allowed here: a schedule drops the stages it leaves at 0
        epochs; :meth:`check_trainable` refuses them in training), an ``lr_decay`` outside (0, 1],
        or a negative or non-finite rate in ``group_lr`` (0 holds a trained group still)."""
        if not is_whole(self.epochs) or self.epochs < 0:
            self._refuse_epochs()
        if not is_real(self.lr_decay) or not 0.0 < self.lr_decay <= 1.0:
            raise InputError("<arguments>", f"stage '{self.name}' lr_decay",
                             f"the factor the learning rates decay to over the stage must be in (0, 1], got "
                             f"{self.lr_decay!r}",
                             "give a factor in (0, 1], 1 for constant rates (the model's schedule option, e.g. "
                             "--lr-decay / lr_decay= of mofa)")
        for group, rate in self.group_lr.items():
            if not is_real(rate) or rate < 0:
                raise InputError("<arguments>", f"stage '{self.name}' group_lr['{group}']",
                                 f"the learning rate of parameter group '{group}' must be a number >= 0 (0 holds "
                                 f"the group still), got {rate!r}",
                                 "give a rate > 0 to the model's *_lr option that sets it, e.g. --donor-lr 0.01 / "
                                 "donor_lr=0.01 of the LIVI family, --factor-lr / factor_lr= of mofa")

    def check_trainable(self) -> None:
        """Raises InputError unless the stage trains at least one epoch (called by the
        :class:`~pyro_livi.infer.Trainer` for every stage it is given)."""
        if self.epochs < 1:
            self._refuse_epochs()

    def _refuse_epochs(self):
        raise InputError("<arguments>", f"stage '{self.name}' epochs",
                         f"the number of epochs must be a whole number >= 1, got {self.epochs!r}",
                         f"give every epoch setting as a whole number >= 1: {_EPOCH_FLAGS}")

    def to_dict(self) -> dict:
        return asdict(self)
