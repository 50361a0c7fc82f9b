"""Dual VAE of paired RNA + ATAC with a latent alignment term (seed 004, section 3.5,
eq. 3.22-3.35, Table 3.2).

Two modality VAEs, one for the genes x (first modality, G features) and one for the peaks y
(second modality, P features), each with its own latent, coupled by an alignment penalty on
their posteriors::

    model                                                   guide
    zR_i ~ Normal(0, I_K)                                   q(zR_i | x_i) = N(mu_R(x_i), diag sigma_R^2(x_i))   eq. 3.22
    zA_i ~ Normal(0, I_K)                                   q(zA_i | y_i) = N(mu_A(y_i), diag sigma_A^2(y_i))   eq. 3.24
    x_i  ~ Lik_x(mean(f_R(zR_i)))                obs_<x>    eq. 3.23
    y_i  ~ Lik_y(mean(f_A(zA_i)))                obs_<y>    eq. 3.25
    factor penalty_align: -lambda * L_align(i)              eq. 3.30-3.34

The latent sites are ``z_<modality>`` (e.g. ``z_rna``, ``z_atac``). The alignment is a
``pyro.factor("penalty_align", -lambda * L_align(i))`` inside the cell plate, so lambda is in
per-cell units (the minibatch is scaled to the data like every cell term). Per cell:

- ``l2`` (eq. 3.30): ||mu_R - mu_A||^2, summed over the K latent dimensions;
- ``skl`` (eq. 3.31-3.32): (KL(q_R || q_A) + KL(q_A || q_R)) / 2 between the two diagonal
  Gaussian posteriors;
- ``fusion`` (eq. 3.33-3.34): z_shared = g_psi([mu_R; mu_A]) with g_psi an MLP (one hidden layer
  of 2K units, the model's activation), ||z_shared - mu_R||^2 + ||z_shared - mu_A||^2.

The posterior means come from the encoders (deterministic functions of the data), so the
factor sits in the model with the fusion network's parameters.

Likelihoods, encoder inputs and the thesis mode are those of
:mod:`pyro_livi.models.sequential`: with ``normal`` at the MSE scale and ``kl_weight`` = beta
the negative ELBO per cell equals the thesis's eq. 3.35, MSE_x + MSE_y + beta (KL_R + KL_A) +
lambda L_align averaged over the cells, plus a constant.

**Weighted MSE of the peaks** (Table 3.2 names it for the dual VAE without defining it). Here
(``peak_loss="weighted_mse"``, for a ``normal`` peak likelihood) it is the class-balanced
squared error::

    WMSE(y^, y) = (1 / (B P)) sum_{i, p} w_ip (y^_ip - y_ip)^2,
    w_ip = 1 / (2 f)        where y_ip != 0 (accessible)
    w_ip = 1 / (2 (1 - f))  where y_ip == 0

with f the fraction of non-zero entries of the peak matrix of the training data
(``peak_nonzero_fraction``; ``from_dataset`` counts it over every cell). Zero and non-zero
entries then carry half of the total weight each, the mean weight over the data is 1, and f =
1/2 gives the plain MSE. As a likelihood it is a Normal whose scale depends on whether the
observed value is zero, sigma_ip^2 = P / (2 w_ip): a weighted regression loss rather than a
density over y; posterior predictive draws (``observed=False``) use the unweighted scale
sigma^2 = P / 2.

Table 3.2 for the dual VAE is ``preset="thesis"``: K = 256, hidden [2048], Tanh, beta_max = 0.1,
``normal`` likelihoods, weighted MSE of the peaks, L2 alignment with lambda = 1; train 100
epochs, lr 1e-4, full batch (:data:`~pyro_livi.models.sequential.THESIS_TRAINING`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.nn import PyroModule, pyro_method
from torch import nn

from ..data.batch import Batch
from ..data.loader import MinibatchLoader
from ..errors import InputError
from ._base import Option
from .sequential import _COMMON_OPTIONS, GaussianMLPEncoder, MLPDecoder, _PairedVAEBase, mlp

ALIGNMENTS = ("l2", "skl", "fusion")
PEAK_LOSSES = ("mse", "weighted_mse")


def diagonal_gaussian_kl(mu1: torch.Tensor, logvar1: torch.Tensor, mu2: torch.Tensor,
                         logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mu1, diag e^logvar1) || N(mu2, diag e^logvar2)) per cell, eq. 3.32:
    0.5 sum_j [log(s2_j / s1_j) + (s1_j + (mu1_j - mu2_j)^2) / s2_j - 1] with s = sigma^2;
    inputs (B, K) -> (B,), nats."""
    return 0.5 * (logvar2 - logvar1 + (logvar1.exp() + (mu1 - mu2).pow(2)) / logvar2.exp() - 1.0).sum(-1)


def peak_weights(y: torch.Tensor, nonzero_fraction: float) -> torch.Tensor:
    """Class-balanced weights of the weighted MSE (see the module docstring): 1 / (2 f) where
    ``y`` != 0, 1 / (2 (1 - f)) where ``y`` == 0; y (B, P) -> (B, P)."""
    f = float(nonzero_fraction)
    return torch.where(y != 0, y.new_tensor(0.5 / f), y.new_tensor(0.5 / (1.0 - f)))


class DualVAE(_PairedVAEBase):
    """Dual VAE with latent alignment (see the module docstring).

    Parameters
    ----------
    n_features : {modality: number of features}, genes first, then peaks.
    continuous, likelihoods, library_target, preset, n_latent, hidden, activation, kl_weight,
    normal_scale, counts_sample : as :class:`~pyro_livi.models.sequential.GPG` (the thesis
        preset's hidden width is 2048); both branches have the same widths and activation.
    alignment : ``"l2"``, ``"skl"`` or ``"fusion"`` (eq. 3.30, 3.31, 3.34).
    align_weight : lambda >= 0, per cell (Table 3.2: 1.0).
    peak_loss : ``"mse"`` or ``"weighted_mse"`` (only with a ``normal`` peak likelihood at the
        MSE scale); None: ``"weighted_mse"`` under the thesis preset, else ``"mse"``.
    peak_nonzero_fraction : f in (0, 1), the fraction of non-zero peak values (needed by the
        weighted MSE; ``from_dataset`` counts it).

    Raises ValueError on bad modalities, likelihoods, alignment, weights or fractions.
    """

    summary = ("Dual VAE of paired RNA + ATAC: one VAE per modality, latents coupled by an L2, symmetric-KL "
               "or learned-fusion alignment penalty")
    reference = "seed 004 (section 3.5, eq. 3.22-3.35, Table 3.2); Yousefi Razin 2026 (MSc thesis, Politecnico di Torino), dual VAE"
    outputs = ("latent", "modality_latent", "dispersions")
    thesis_preset = dict(n_latent=256, hidden=[2048], activation="tanh", kl_weight=0.1)
    options = {
        **_COMMON_OPTIONS,
        "hidden": Option([256], "hidden widths of every encoder of both branches; decoders mirror them (thesis "
                         "preset: 2048)", type=int, nargs="+", at_least=1, nullable=True),
        "alignment": Option("l2", "latent alignment: l2 (posterior means), skl (symmetric KL of the posteriors) "
                            "or fusion (learned shared latent)", choices=ALIGNMENTS),
        "align_weight": Option(1.0, "lambda, weight of the alignment penalty per cell", type=float, at_least=0),
        "peak_loss": Option(None, "with a normal peak likelihood: mse, or weighted_mse (zero and non-zero peak "
                            "values weighted to equal total weight; default under the thesis preset)",
                            type=str, choices=PEAK_LOSSES),
    }

    def __init__(self, n_features: Mapping[str, int], *, continuous: Sequence[str] = (),
                 likelihoods: Mapping[str, str] | str | None = None,
                 library_target: Mapping[str, float] | None = None, preset: str = "none",
                 n_latent: int | None = None, hidden: Sequence[int] | None = None, activation: str | None = None,
                 kl_weight: float | None = None, normal_scale: str = "mse", alignment: str = "l2",
                 align_weight: float = 1.0, peak_loss: str | None = None,
                 peak_nonzero_fraction: float | None = None, counts_sample=None, name: str | None = None):
        super().__init__(name=name)
        self._setup_modalities(n_features, continuous, likelihoods, library_target, normal_scale, preset)
        self._set_sizes(preset, n_latent=n_latent, hidden=hidden, activation=activation, kl_weight=kl_weight)
        if alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
        if align_weight < 0:
            raise ValueError(f"align_weight must be >= 0, got {align_weight}")
        rna, atac = self.modalities
        if peak_loss is None:
            peak_loss = "weighted_mse" if (preset == "thesis" and self.likelihood_names[atac] == "normal"
                                           and normal_scale == "mse") else "mse"
        if peak_loss not in PEAK_LOSSES:
            raise ValueError(f"peak_loss must be one of {PEAK_LOSSES}, got {peak_loss!r}")
        if peak_loss == "weighted_mse":
            if self.likelihood_names[atac] != "normal" or normal_scale != "mse":
                raise ValueError("peak_loss='weighted_mse' needs the 'normal' peak likelihood at the MSE scale "
                                 f"(got {self.likelihood_names[atac]!r}, normal_scale={normal_scale!r})")
            if peak_nonzero_fraction is None or not 0.0 < float(peak_nonzero_fraction) < 1.0:
                raise ValueError("peak_loss='weighted_mse' needs peak_nonzero_fraction in (0, 1), the fraction "
                                 f"of non-zero peak values; got {peak_nonzero_fraction}")
        self.alignment, self.align_weight, self.peak_loss = alignment, float(align_weight), peak_loss
        self.peak_nonzero_fraction = None if peak_nonzero_fraction is None else float(peak_nonzero_fraction)
        self.latent_site = f"z_{rna}"
        for m in self.modalities:
            setattr(self, f"encoder_{m}",
                    GaussianMLPEncoder(self.n_features[m], self.n_latent, self.hidden, self.activation))
            setattr(self, f"decoder_{m}",
                    MLPDecoder(self.n_latent, self.n_features[m], self.hidden, self.activation))
        if alignment == "fusion":
            width = 2 * self.n_latent
            self.fusion = PyroModule[nn.Sequential](mlp(2 * self.n_latent, [width], self.activation),
                                                    PyroModule[nn.Linear](width, self.n_latent))
        counts_sample = counts_sample or {}
        for m in self.modalities:
            self._init_observation(m, getattr(self, f"decoder_{m}").width, counts_sample.get(m))
        self.config = dict(n_features=dict(self.n_features), continuous=list(self.continuous),
                           likelihoods=dict(self.likelihood_names), library_target=dict(self.library_target),
                           preset=preset, n_latent=self.n_latent, hidden=list(self.hidden),
                           activation=self.activation, kl_weight=self.kl_weight, normal_scale=normal_scale,
                           alignment=alignment, align_weight=self.align_weight, peak_loss=peak_loss,
                           peak_nonzero_fraction=self.peak_nonzero_fraction)

    @classmethod
    def from_dataset(cls, dataset, *, likelihoods=None, counts_sample=None, peak_nonzero_fraction=None,
                     **options) -> "DualVAE":
        """The dual VAE sized for ``dataset`` (genes first, peaks second); with the weighted
        MSE, ``peak_nonzero_fraction`` is counted over every cell of the dataset unless given."""
        args = cls._dataset_arguments(dataset, likelihoods, options)
        atac = dataset.modalities[1]
        wants_weights = options.get("peak_loss") == "weighted_mse" or (
            options.get("peak_loss") is None and options.get("preset") == "thesis"
            and args["likelihoods"][atac] == "normal" and options.get("normal_scale", "mse") == "mse")
        if wants_weights and peak_nonzero_fraction is None:
            peak_nonzero_fraction = nonzero_fraction(dataset, atac)
            if not 0.0 < peak_nonzero_fraction < 1.0:
                raise InputError(dataset.source, f"modalities['{atac}']",
                                 f"the weighted MSE needs zero and non-zero peak values; the fraction of "
                                 f"non-zero values is {peak_nonzero_fraction}", "use --peak-loss mse")
        return cls(**args, counts_sample=counts_sample, peak_nonzero_fraction=peak_nonzero_fraction, **options)

    # ------------------------------------------------------------------------- pieces
    def posteriors(self, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{modality: (mu, log sigma^2)} of each branch's encoder, each (B, K)."""
        return {m: getattr(self, f"encoder_{m}")(self.encoder_input(m, batch)) for m in self.modalities}

    def alignment_penalty(self, post: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """L_align per cell (B,) (eq. 3.30, 3.31 or 3.34) from the branches' (mu, log sigma^2)."""
        (mu_r, lv_r), (mu_a, lv_a) = (post[m] for m in self.modalities)
        if self.alignment == "l2":
            return (mu_r - mu_a).pow(2).sum(-1)
        if self.alignment == "skl":
            return 0.5 * (diagonal_gaussian_kl(mu_r, lv_r, mu_a, lv_a) + diagonal_gaussian_kl(mu_a, lv_a, mu_r, lv_r))
        shared = self.fusion(torch.cat([mu_r, mu_a], dim=-1))
        return (shared - mu_r).pow(2).sum(-1) + (shared - mu_a).pow(2).sum(-1)

    def observation(self, m: str, out: torch.Tensor, h: torch.Tensor, batch: Batch, observed: bool):
        """As the sequential models; the peaks under the weighted MSE get the per-element scale
        sigma_ip^2 = P / (2 w_ip) (observed) or P / 2 (``observed=False``)."""
        if m != self.modalities[1] or self.peak_loss != "weighted_mse" or not observed:
            return super().observation(m, out, h, batch, observed)
        y = batch.x[m]
        log_scale = getattr(self, f"lik_{m}_log_scale") - 0.5 * torch.log(peak_weights(y, self.peak_nonzero_fraction))
        return self.likelihoods[m](out, log_scale=log_scale).to_event(1)

    # ---------------------------------------------------------------------- model / guide
    @pyro_method
    def model(self, batch: Batch, observed: bool = True):
        """The dual VAE of seed 004 (eq. 3.22-3.35) for the B cells of ``batch``: ``z_<m>`` (B, K)
        ~ N(0, I) per branch (KL scaled by ``kl_weight``), ``obs_<m>`` (B, F_m) from each branch's
        decoder, and the alignment factor. ``observed=False`` draws both observation sites instead
        of conditioning on the data (posterior predictive checks; see :meth:`ZooModel.model`)."""
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            z = {}
            with poutine.scale(scale=self.kl_weight):
                for m in self.modalities:
                    z[m] = pyro.sample(f"z_{m}", self._prior(batch))
            for m in self.modalities:
                out, h = getattr(self, f"decoder_{m}")(z[m])
                self._observe_output(m, out, h, batch, observed)
            if self.align_weight > 0:
                pyro.factor("penalty_align", -self.align_weight * self.alignment_penalty(self.posteriors(batch)))

    @pyro_method
    def guide(self, batch: Batch, observed: bool = True):
        """q(z_<m> | x^m) = Normal(encoder m) for each branch, each (B, K); ``observed`` changes
        nothing."""
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            post = self.posteriors(batch)
            with poutine.scale(scale=self.kl_weight):
                for m in self.modalities:
                    mu, logvar = post[m]
                    pyro.sample(f"z_{m}", dist.Normal(mu, torch.exp(0.5 * logvar)).to_event(1))

    # ------------------------------------------------------------------- posterior summaries
    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (loc, scale) of the gene branch's latent z_<genes>, each (B, K)."""
        m = self.modalities[0]
        mu, logvar = getattr(self, f"encoder_{m}")(self.encoder_input(m, batch))
        return mu, torch.exp(0.5 * logvar)

    def encode_latents(self, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{"z_<modality>": (loc, scale)} of each branch, each (B, K)."""
        return {f"z_{m}": (mu, torch.exp(0.5 * logvar)) for m, (mu, logvar) in self.posteriors(batch).items()}


@torch.no_grad()
def nonzero_fraction(dataset, modality: str, batch_size: int = 1024) -> float:
    """Fraction of non-zero values of ``modality`` over every cell of ``dataset`` (read in
    minibatches of ``batch_size`` cells)."""
    nonzero = total = 0
    for batch in MinibatchLoader(dataset, batch_size=batch_size, shuffle=False):
        x = batch.x[modality]
        nonzero += int((x != 0).sum())
        total += x.numel()
    return nonzero / max(total, 1)
