"""Training stages as data: what trains, what is frozen, which model parts are switched on."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class EarlyStopping:
    """Stop a stage once it has stalled for ``patience`` consecutive epochs.

    An epoch *stalls* when the per-cell training loss did not improve on the stage's best by
    more than ``min_delta`` (relative) **and** every watched parameter (e.g. the donor factors
    ``D_loc``, ``V_loc``) moved by less than ``factor_tol`` relative to its norm. Watching the
    factors keeps a stage going while the donor embeddings still move under a flat loss.
    """

    patience: int = 20
    min_delta: float = 1e-4
    watch: tuple[str, ...] = ()
    factor_tol: float = 1e-3


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
    """

    name: str
    epochs: int
    train: tuple[str, ...]
    components: tuple[str, ...] = ()
    early_stopping: EarlyStopping | None = None
    lr_decay: float = 1.0
    group_lr: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
