"""Training stages as data: what trains, what is frozen, which model parts are switched on."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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

    def to_dict(self) -> dict:
        return asdict(self)
