"""What the LIVI family (LIVI, MultiSLIVI, DMLIVI) shares beside its model/guide pairs: the donor
latents D and V, the options every member takes, and the staged training schedule with its
per-group learning rates (DESIGN section 3)."""

from __future__ import annotations

import math
from dataclasses import replace

import pyro
import pyro.distributions as dist
import torch

from ..infer.stages import EarlyStopping, Stage
from ._base import DataNeeds, Option

LIVI_OUTPUTS = ("latent", "donor_factors", "assignment", "loadings", "dispersions")

#: options of every member of the family: the donor terms and the staged schedule
LIVI_OPTIONS = {
    "n_dxc": Option(100, "K_DxC, number of donor x cell-state interaction factors D", type=int, at_least=1),
    "n_persistent": Option(5, "K_V, number of persistent donor factors V", type=int, at_least=1),
    "donor_guide": Option("delta", "point estimates (delta) or a Normal posterior for D and V",
                          choices=("delta", "normal")),
    "l1_weight": Option(1e-3, "lambda_DxC, L1 weight on the interaction loadings W_DxC (per cell)", type=float,
                        at_least=0),
    "a_weight": Option(1e-3, "lambda_A, weight of the penalty pushing A = sigmoid(A_logits) to 0/1 (per cell)",
                       type=float, at_least=0),
    "encoder_input": Option("log1p", "what the encoders read: log1p(counts) or raw counts",
                            choices=("log1p", "raw")),
    "epochs_vae": Option(60, "epochs of the VAE stage (stage 1); 0 skips it", type=int, schedule=True, at_least=0),
    "warmup_epochs_G": Option(0, "epochs of V alone (VAE frozen) before D joins; 0 skips the stage", type=int,
                              schedule=True, at_least=0),
    "persistent_in_vae_stage": Option(
        False, "train V and W_V jointly with the VAE in stage 1, so that the cell state does not absorb "
        "persistent donor effects (recommended; the paper trains the VAE alone)", schedule=True),
    "donor_lr": Option(1e-2, "Adam learning rate of the donor parts (D, V, A, W_DxC, W_V)", type=float,
                       schedule=True, above=0),
}

#: the options of the multimodal members: the same, with one L1 weight per modality allowed in Python
MULTIMODAL_LIVI_OPTIONS = {
    **LIVI_OPTIONS,
    "l1_weight": replace(LIVI_OPTIONS["l1_weight"], per_modality=True),
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


#: Largest memory (bytes) a :class:`FrozenEncoderCache` may hold for one set of cells; beyond it
#: the encoder runs on every batch (about a million cells at K_C = 15)
POSTERIOR_CACHE_MAX_BYTES = 128 * 2 ** 20


class FrozenEncoderCache:
    """Each cell's encoder output while the encoder is frozen, computed once and read back.

    In the LIVI family's donor stages the encoder does not train: each cell's posterior
    (loc, scale) of the cell state is a constant of the stage, so the first epoch computes it
    and later epochs read it (the same values, without the encoder's forward pass).

    ``cache(encoder, x, index, n_cells)`` returns ``encoder(x)`` (a tuple of (B, K) tensors) for
    the cells ``index`` (B,) of a set of ``n_cells`` cells with inputs ``x`` (B, G). Entries are
    used only while (a) no encoder parameter requires a gradient (otherwise the encoder runs and
    the cache is emptied), (b) the parameters are the same tensors with the same values (their
    identities, version counters and norms are compared on every call; any change empties the
    cache), in the same train/eval mode, and (c) the cell's stored input fingerprint (its total
    and a fixed weighted sum of its row of ``x``) equals the batch's, so that another data set
    of the same size never reads the entries of the first. Misses are computed and stored.
    Memory: (2 K + 2) numbers per cell, and nothing when the storage would exceed
    :data:`POSTERIOR_CACHE_MAX_BYTES` (the encoder then runs on every batch).
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._token = None
        self._norms = None
        self._store = None

    def __call__(self, encoder, x: torch.Tensor, index: torch.Tensor, n_cells: int):
        params = list(encoder.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            self.clear()
            return encoder(x)
        with torch.no_grad():
            return self._lookup(encoder, params, x, index, n_cells)

    def _lookup(self, encoder, params, x, index, n_cells):
        token = (n_cells, x.device, x.dtype, x.shape[1:], encoder.training,
                 tuple((id(p), p._version) for p in params))
        norms = torch.stack(torch._foreach_norm([p.detach() for p in params])) if params else None
        if token != self._token or (norms is not None and not torch.equal(norms, self._norms)):
            self.clear()
            self._token, self._norms = token, norms
        weights = 1.0 + torch.arange(x.shape[-1], device=x.device, dtype=x.dtype) % 7
        fingerprint = torch.stack([x.sum(-1), x @ weights], dim=-1)  # (B, 2); exact for counts
        if self._store is None:
            loc, scale = encoder(x)
            n_bytes = n_cells * (loc.shape[-1] + scale.shape[-1] + 2) * loc.element_size()
            if n_bytes > POSTERIOR_CACHE_MAX_BYTES:
                return loc, scale
            self._store = {"loc": loc.new_zeros(n_cells, loc.shape[-1]),
                           "scale": scale.new_zeros(n_cells, scale.shape[-1]),
                           "fingerprint": torch.full((n_cells, 2), math.nan, dtype=x.dtype, device=x.device)}
            self._put(index, fingerprint, loc, scale)
            return loc, scale
        store = self._store
        hit = (store["fingerprint"][index] == fingerprint).all(-1)
        if not bool(hit.all()):
            miss = ~hit
            loc, scale = encoder(x[miss])
            self._put(index[miss], fingerprint[miss], loc, scale)
        return store["loc"][index], store["scale"][index]

    def _put(self, index, fingerprint, loc, scale) -> None:
        self._store["loc"][index] = loc
        self._store["scale"][index] = scale
        self._store["fingerprint"][index] = fingerprint


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
