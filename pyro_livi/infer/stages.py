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
    """

    name: str
    epochs: int
    train: tuple[str, ...]
    components: tuple[str, ...] = ()
    early_stopping: EarlyStopping | None = None
    lr_decay: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def livi_stages(
    epochs_vae: int,
    epochs: int,
    *,
    warmup_epochs_G: int = 0,
    patience: int = 20,
    min_delta: float = 1e-4,
    factor_tol: float = 1e-3,
    lr_decay: float = 0.1,
    persistent_in_vae_stage: bool = False,
) -> list[Stage]:
    """The two-stage schedule of LIVI (DESIGN section 3).

    1. ``vae``: encoder and cell-state decoder (with dispersions and covariate offsets) train;
       the donor parts are absent (the paper), or, with ``persistent_in_vae_stage``, V and W_V
       train jointly with the VAE. A VAE without V has no cheaper way to explain what every
       cell of a donor shares than to write it into each cell's state, and the frozen cell
       state then keeps it; with V present, a donor-level shift costs one point per donor
       instead of a KL term per cell, and the cell state is left to the cells.
    2. ``persistent``: VAE parts frozen; V and W_V train, for ``warmup_epochs_G`` epochs
       (skipped when 0, as in the paper).
    3. ``donor``: V, W_V, D, A and W_DxC train together for up to ``epochs`` epochs, with early
       stopping that watches the donor factors and learning rates decaying to ``lr_decay``
       times their start over ``epochs``.
    """
    stop = EarlyStopping(patience=patience, min_delta=min_delta, watch=("D_loc", "V_loc"),
                         factor_tol=factor_tol)
    joint = ("persistent",) if persistent_in_vae_stage else ()
    stages = [Stage("vae", epochs_vae, train=("encoder", "cell_state") + joint, components=joint)]
    if warmup_epochs_G > 0:
        stages.append(Stage("persistent", warmup_epochs_G, train=("persistent",),
                            components=("persistent",)))
    stages.append(Stage("donor", epochs, train=("persistent", "interaction"),
                        components=("persistent", "interaction"), early_stopping=stop,
                        lr_decay=lr_decay))
    return [s for s in stages if s.epochs > 0]
