"""What the LIVI family (LIVI, MultiSLIVI, DMLIVI) shares beside its model/guide pairs: the donor
latents D and V, the options every member takes, and the staged training schedule with its
per-group learning rates (DESIGN section 3)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ..infer.stages import EarlyStopping, Stage
from ._base import DataNeeds, Option

LIVI_OUTPUTS = ("latent", "donor_factors", "assignment", "loadings", "dispersions")

#: options of every member of the family: the donor terms and the staged schedule
LIVI_OPTIONS = {
    "n_dxc": Option(100, "K_DxC, number of donor x cell-state interaction factors D", type=int),
    "n_persistent": Option(5, "K_V, number of persistent donor factors V", type=int),
    "donor_guide": Option("delta", "point estimates (delta) or a Normal posterior for D and V",
                          choices=("delta", "normal")),
    "l1_weight": Option(1e-3, "lambda_DxC, L1 weight on the interaction loadings W_DxC (per cell)", type=float),
    "a_weight": Option(1e-3, "lambda_A, weight of the penalty pushing A = sigmoid(A_logits) to 0/1 (per cell)",
                       type=float),
    "encoder_input": Option("log1p", "what the encoders read: log1p(counts) or raw counts",
                            choices=("log1p", "raw")),
    "epochs_vae": Option(60, "epochs of the VAE stage (stage 1)", type=int, schedule=True),
    "warmup_epochs_G": Option(0, "epochs of V alone (VAE frozen) before D joins; 0 skips the stage", type=int,
                              schedule=True),
    "persistent_in_vae_stage": Option(
        False, "train V and W_V jointly with the VAE in stage 1, so that the cell state does not absorb "
        "persistent donor effects (recommended; the paper trains the VAE alone)", schedule=True),
    "donor_lr": Option(1e-2, "Adam learning rate of the donor parts (D, V, A, W_DxC, W_V)", type=float,
                       schedule=True),
}


def livi_stages(
    epochs_vae: int,
    epochs: int,
    *,
    warmup_epochs_G: int = 0,
    patience: int | None = 20,
    min_delta: float = 1e-4,
    factor_tol: float = 1e-3,
    lr_decay: float = 0.1,
    persistent_in_vae_stage: bool = False,
    donor_lr: float = 1e-2,
) -> list[Stage]:
    """The staged schedule of LIVI (DESIGN section 3).

    1. ``vae``: encoder and cell-state decoder (with dispersions and covariate offsets) train;
       the donor parts are absent (the paper), or, with ``persistent_in_vae_stage``, V and W_V
       train jointly with the VAE. A VAE without V has no cheaper way to explain what every
       cell of a donor shares than to write it into each cell's state, and the frozen cell
       state then keeps it; with V present, a donor-level shift costs one point per donor
       instead of a KL term per cell, and the cell state is left to the cells.
    2. ``persistent``: VAE parts frozen; V and W_V train, for ``warmup_epochs_G`` epochs
       (skipped when 0, as in the paper).
    3. ``donor``: V, W_V, D, A and W_DxC train together for up to ``epochs`` epochs, with early
       stopping that watches the donor factors (after ``patience`` stalled epochs; None: never)
       and learning rates decaying to ``lr_decay`` times their start over ``epochs``.

    The donor groups ("persistent", "interaction") train at ``donor_lr``: donor embeddings get
    one update per minibatch from few cells each, and at the VAE's rate they barely leave their
    initialisation.
    """
    stop = (EarlyStopping(patience=patience, min_delta=min_delta, watch=("D_loc", "V_loc"),
                          factor_tol=factor_tol) if patience else None)
    group_lr = {"persistent": donor_lr, "interaction": donor_lr}
    joint = ("persistent",) if persistent_in_vae_stage else ()
    stages = [Stage("vae", epochs_vae, train=("encoder", "cell_state") + joint, components=joint,
                    group_lr=group_lr)]
    if warmup_epochs_G > 0:
        stages.append(Stage("persistent", warmup_epochs_G, train=("persistent",),
                            components=("persistent",), group_lr=group_lr))
    stages.append(Stage("donor", epochs, train=("persistent", "interaction"),
                        components=("persistent", "interaction"), early_stopping=stop,
                        lr_decay=lr_decay, group_lr=group_lr))
    return [s for s in stages if s.epochs > 0]


def livi_default_stages(cls, *, epochs: int, patience: int | None = 20, epochs_vae: int = 60,
                        warmup_epochs_G: int = 0, persistent_in_vae_stage: bool = False,
                        donor_lr: float = 1e-2) -> list[Stage]:
    """The family's ``default_stages``: :func:`livi_stages` with ``epochs`` for the donor stage."""
    return livi_stages(epochs_vae, epochs, warmup_epochs_G=warmup_epochs_G, patience=patience,
                       persistent_in_vae_stage=persistent_in_vae_stage, donor_lr=donor_lr)


class LIVIFamily:
    """Declarations shared by the family (mixed into each member)."""

    data_needs = DataNeeds(modalities=(1, None), inputs="counts", donors="required")
    outputs = LIVI_OUTPUTS
    latent_name = "cell_state"
    latent_site = "c"
    #: the donor factors use every cell (the paper trains on all cells)
    default_train_size = 1.0
    default_stages = classmethod(livi_default_stages)


class DonorFactorsMixin(LIVIFamily):
    """The donor latents shared by the LIVI family: D (N_y, K_DxC) and V (N_y, K_V).

    Model: ``D``, ``V`` ~ Normal(0, I) in the ``donors`` plate, each present only while its
    component ("interaction", "persistent") is on. Guide: a point mass at ``D_loc`` / ``V_loc``
    (``donor_guide="delta"``) or Normal(loc, scale) (``"normal"``). Expects the attributes
    ``n_donors``, ``n_dxc``, ``n_persistent``, ``donor_guide``, ``D_loc``, ``V_loc`` (and
    ``D_scale``, ``V_scale`` for the Normal guide).
    """

    def _donor_sites(self):
        """Model side: returns (D, V), each None while its component is off."""
        D = V = None
        with pyro.plate("donors", self.n_donors):
            if "persistent" in self.components:
                V = pyro.sample("V", dist.Normal(self.V_loc.new_zeros(self.n_persistent), 1.0).to_event(1))
            if "interaction" in self.components:
                D = pyro.sample("D", dist.Normal(self.D_loc.new_zeros(self.n_dxc), 1.0).to_event(1))
        return D, V

    def _donor_guide_sites(self) -> None:
        """Guide side of :meth:`_donor_sites`."""
        with pyro.plate("donors", self.n_donors):
            if "persistent" in self.components:
                pyro.sample("V", self._donor_posterior("V"))
            if "interaction" in self.components:
                pyro.sample("D", self._donor_posterior("D"))

    def _donor_posterior(self, name: str):
        loc = getattr(self, f"{name}_loc")
        if self.donor_guide == "delta":
            return dist.Delta(loc).to_event(1)
        return dist.Normal(loc, getattr(self, f"{name}_scale")).to_event(1)

    def _interaction_penalties(self, n_cells: int, l1_terms: dict) -> None:
        """The penalties of LIVI's eq. 4 as factor sites, in per-cell units (times ``n_cells``):
        ``l1_terms`` {site name: (W_DxC, lambda_DxC)} give lambda_DxC sum |W_DxC| each, and
        ``penalty_A`` is lambda_A sum (A (1 - A))^2."""
        for site, (W, weight) in l1_terms.items():
            pyro.factor(site, -n_cells * weight * W.abs().sum())
        A = self.A
        pyro.factor("penalty_A", -n_cells * self.a_weight * ((A * (1 - A)) ** 2).sum())

    def donor_factors(self) -> dict[str, torch.Tensor]:
        """Posterior means of the donor factors: {"D": (N_y, K_DxC), "V": (N_y, K_V)}."""
        return {"D": self.D_loc.detach(), "V": self.V_loc.detach()}
