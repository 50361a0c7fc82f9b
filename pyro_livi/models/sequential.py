"""Sequential cross-modal VAEs of paired RNA + ATAC: Gene -> Peak -> Gene (GPG) and
Peak -> Gene -> Peak (PGP) (seed 004, sections 3.3-3.4, eq. 3.1-3.21, Table 3.2).

The thesis trains two chained VAEs with a regression loss. Written as a Pyro model/guide pair
the chain lives in the guide; for GPG, with x the gene-expression values (G genes, the first
modality) and y the peak values (P peaks, the second modality) of cell i::

    model                                      guide
    z1_i ~ Normal(0, I_K)                      q(z1_i | x_i)  = N(mu_1(x_i), diag sigma_1^2(x_i))    eq. 3.1-3.4
    z2_i ~ Normal(0, I_K)                      y^_i = f_dec1(z1_i)   (predicted peaks, Gene -> Peak)
    y_i  ~ Lik_y(mean(f_dec1(z1_i))) obs_<y>   q(z2_i | y^_i) = N(mu_2(y^_i), diag sigma_2^2(y^_i))  eq. 3.5-3.8
    x_i  ~ Lik_x(mean(f_dec2(z2_i))) obs_<x>

PGP is the mirror image: its guide encodes the peaks, Decoder 1 predicts the genes (Peak ->
Gene) and Decoder 2 reconstructs the peaks from z2 (eq. 3.12-3.19). Encoders and decoders are
MLPs (``Linear -> activation`` per hidden width; decoders mirror the encoder widths); the
encoders' heads give mu and log sigma^2 (eq. 3.2-3.3), sigma = exp(log sigma^2 / 2), with
log sigma^2 clipped to [-30, 20] against overflow.

Likelihoods, by name from :mod:`pyro_livi.likelihoods` (``likelihoods={"rna": ..., "atac": ...}``):

- ``normal`` on preprocessed values (log1p of median-normalised RNA, log1p peaks; see
  ``pyro-livi preprocess``) with a fixed scale sigma_m^2 = F_m / 2 for a modality of F_m
  features (``normal_scale="mse"``, the default). Then -log N(v; m, sigma_m) summed over the
  modality's features is (1/F_m) sum_f (v_f - m_f)^2 + (F_m / 2) log(pi F_m): the per-cell mean
  squared error plus a constant. With the KL sites scaled by ``kl_weight`` = beta (a
  ``poutine.scale`` in model and guide), the negative ELBO per cell is the thesis's loss eq. 3.11
  (GPG) / 3.21 (PGP), MSE_x + MSE_y + beta (KL_1 + KL_2) averaged over the cells, plus
  (G/2) log(pi G) + (P/2) log(pi P): this is the **thesis mode**. ``normal_scale="learned"``
  learns one scale per feature instead.
- ``nb`` (any count likelihood) on raw counts: mean = softmax(decoder output) * l_i, l_i the cell's
  observed total count in the modality.
- ``bernoulli`` on peaks: raw counts are binarised at the site (x > 0 is observed); mean =
  softplus(decoder output), so P(open) = sigmoid(decoder output).

Default likelihoods: ``normal`` for modalities the dataset declares continuous; for raw counts
``nb`` for the first modality (genes) and ``bernoulli`` for the second (peaks).

What the second encoder reads: the thesis feeds Decoder 1's raw output. Here it reads Decoder
1's expected value in the same representation as the data that the first encoder reads:
continuous values as they are (identical to the thesis); for count likelihoods log1p of the
expected counts at the library size L_m (the median total count of the modality; the first
encoder reads log1p(x / l_i * L_m)); for ``bernoulli`` P(open) (the first encoder reads the
binarised peaks).

KL warm-up (eq. 3.36): the trainer multiplies every ``kl_*`` term by a weight rising from
``kl_warmup_start`` to 1 over ``kl_warmup_epochs`` epochs (:class:`~pyro_livi.infer.KLWarmup`),
so the KL weight is beta(e) = kl_weight * (start + (1 - start) e / T), i.e. eq. 3.36 with
beta_max = ``kl_weight`` and beta_min = ``kl_weight * kl_warmup_start``.

The Table 3.2 settings are the preset ``preset="thesis"``: K = 256, hidden [1024], Tanh,
beta_max = 0.1, ``normal`` likelihoods at the MSE scale (continuous inputs), warm-up over 20
epochs from 0; train with :data:`THESIS_TRAINING` (GPG: 30 epochs, lr 1e-4, batch 512; PGP: 30
epochs, lr 2e-4, full batch): ``pyro-livi fit --model gpg --preset thesis --epochs 30 --lr 1e-4
--batch-size 512 --patience 0 --continuous-modalities rna,atac``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.nn import PyroModule, pyro_method
from torch import nn

from ..data.batch import Batch
from ..errors import InputError
from ..infer.stages import EarlyStopping, KLWarmup, Stage
from ..likelihoods import get_likelihood
from ._base import DataNeeds, Option, ZooModel

#: activation functions of the MLPs (seed 004, section 3.3.1, "Network Parametrization")
ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "gelu": nn.GELU, "tanh": nn.Tanh}
#: likelihoods whose mean is the decoder output as it is (real values)
REAL_LIKELIHOODS = ("normal",)
#: likelihoods of binarised values, mean softplus(decoder output) so that P(x = 1) = sigmoid(output)
BINARY_LIKELIHOODS = ("bernoulli",)
NORMAL_SCALES = ("mse", "learned")
PRESETS = ("none", "thesis")
#: log sigma^2 of the encoders is clipped to this range (exp overflows beyond)
LOGVAR_RANGE = (-30.0, 20.0)

#: training settings of Table 3.2 (seed 004), arguments of :func:`pyro_livi.run.fit`;
#: ``batch_size=None`` means full batch (every cell in one minibatch)
THESIS_TRAINING = {
    "gpg": dict(epochs=30, lr=1e-4, batch_size=512),
    "pgp": dict(epochs=30, lr=2e-4, batch_size=None),
    "dualvae": dict(epochs=100, lr=1e-4, batch_size=None),
}


def mlp(n_in: int, widths: Sequence[int], activation: str) -> PyroModule:
    """Blocks ``Linear -> activation``, one per width in ``widths`` (the identity when empty);
    input (B, n_in), output (B, widths[-1])."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    for width in widths:
        layers += [PyroModule[nn.Linear](n_in, int(width)), ACTIVATIONS[activation]()]
        n_in = int(width)
    return PyroModule[nn.Sequential](*layers)


class GaussianMLPEncoder(PyroModule):
    """q(z | v) = N(mu(v), diag exp(log sigma^2(v))) with an MLP body (eq. 3.1-3.3).

    ``forward(v)``: v (B, n_in) -> (mu, log sigma^2), each (B, n_latent); log sigma^2 clipped to
    :data:`LOGVAR_RANGE`."""

    def __init__(self, n_in: int, n_latent: int, hidden: Sequence[int], activation: str):
        super().__init__()
        self.body = mlp(n_in, hidden, activation)
        width = int(hidden[-1]) if len(hidden) else n_in
        self.mu = PyroModule[nn.Linear](width, n_latent)
        self.logvar = PyroModule[nn.Linear](width, n_latent)

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(v)
        return self.mu(h), self.logvar(h).clamp(*LOGVAR_RANGE)


class MLPDecoder(PyroModule):
    """z (B, K) -> (output (B, n_out), last hidden layer (B, H)): an MLP with the mirrored
    widths, then a linear output layer (real values; the observation site turns them into the
    likelihood's mean)."""

    def __init__(self, n_latent: int, n_out: int, hidden: Sequence[int], activation: str):
        super().__init__()
        self.body = mlp(n_latent, list(hidden)[::-1], activation)
        self.width = int(hidden[0]) if len(hidden) else n_latent
        self.out = PyroModule[nn.Linear](self.width, n_out)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(z)
        return self.out(h), h


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per cell, eq. 3.10: 0.5 sum_j (mu^2 + sigma^2 -
    log sigma^2 - 1); mu, logvar (B, K) -> (B,), nats."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(-1)


def _count_likelihood(name: str) -> bool:
    return name not in REAL_LIKELIHOODS + BINARY_LIKELIHOODS


class _PairedVAEBase(ZooModel):
    """What the GPG, PGP and dual VAE share: two modalities (genes first, peaks second), their
    likelihoods and observation sites, the representation an encoder reads, the mean of each
    likelihood from a decoder output, and the fixed MSE-scale ``normal``."""

    data_needs = DataNeeds(modalities=(2, 2), inputs="any", donors="unused", missing_modalities=False,
                           preferred_inputs=("counts", "counts"))
    outputs = ("latent", "dispersions")
    latent_name = "latent"
    #: ``bernoulli`` observes the binarised values x > 0 (:meth:`observed_values`)
    binarises_data = True

    #: settings of Table 3.2 that ``preset="thesis"`` gives (subclasses fill it)
    thesis_preset: dict = {}
    #: settings without a preset
    plain_defaults: dict = dict(n_latent=20, hidden=[256], activation="relu", kl_weight=1.0)

    # ------------------------------------------------------------------------ construction
    def _setup_modalities(self, n_features: Mapping[str, int], continuous, likelihoods, library_target,
                          normal_scale: str, preset: str) -> None:
        if len(n_features) != 2:
            raise ValueError(f"n_features must name two modalities (genes, then peaks); got {list(n_features)}")
        modalities = tuple(str(m) for m in n_features)
        for m in modalities:
            if not m.isidentifier():
                raise ValueError(f"modality name {m!r} must be a Python identifier (it names parameters)")
        if normal_scale not in NORMAL_SCALES:
            raise ValueError(f"normal_scale must be one of {NORMAL_SCALES}, got {normal_scale!r}")
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
        continuous = tuple(m for m in modalities if m in set(continuous))
        if isinstance(likelihoods, str):
            likelihoods = {m: likelihoods for m in modalities}
        unknown = (set(likelihoods or {}) | set(continuous) | set(library_target or {})) - set(modalities)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; the model has {list(modalities)}")
        names = default_likelihoods(modalities, continuous, preset)
        names.update(likelihoods or {})
        for m, name in names.items():
            name = get_likelihood(name).name
            names[m] = name
            if name in REAL_LIKELIHOODS and m not in continuous:
                raise ValueError(f"likelihood {name!r} of modality {m!r} models preprocessed values, but {m!r} "
                                 "holds raw counts; preprocess it and declare it continuous")
            if _count_likelihood(name) and m in continuous:
                raise ValueError(f"likelihood {name!r} of modality {m!r} models counts, but {m!r} holds "
                                 "continuous values")
        self.modalities = modalities
        self.n_features = {m: int(n_features[m]) for m in modalities}
        self.continuous = continuous
        self.likelihood_names = names
        self.likelihoods = {m: get_likelihood(n) for m, n in names.items()}
        self.normal_scale = normal_scale
        target = dict(library_target or {})
        self.library_target = {m: float(target.get(m, 1.0)) for m in modalities}

    def _init_observation(self, m: str, width: int, counts_sample=None) -> None:
        """Per-feature likelihood parameters of modality ``m``: a fixed buffer
        log sigma = 0.5 log(F / 2) for ``normal`` at the MSE scale, else learned ones."""
        if self.likelihood_names[m] == "normal" and self.normal_scale == "mse":
            n = self.n_features[m]
            self.register_buffer(f"lik_{m}_log_scale", torch.full((n,), 0.5 * float(np.log(n / 2.0))))
            return
        self._init_likelihood_params(m, self.n_features[m], width, counts_sample)

    @classmethod
    def _dataset_arguments(cls, dataset, likelihoods, options) -> dict:
        """Constructor arguments read from ``dataset``: feature counts, continuous modalities,
        library targets (median total count of each count modality); an InputError names a
        likelihood that does not fit the data and the fix."""
        continuous = [m for m in dataset.modalities if m in set(dataset.spec.continuous_modalities)]
        preset = options.get("preset", "none")
        names = default_likelihoods(tuple(dataset.modalities), continuous, preset)
        names.update(likelihoods or {})
        for m, name in names.items():
            name = get_likelihood(name).name
            if name in REAL_LIKELIHOODS and m not in continuous:
                raise InputError(dataset.source, f"modalities['{m}']",
                                 f"likelihood '{name}' (the thesis's MSE) models preprocessed values, but "
                                 f"modality '{m}' was read as raw counts",
                                 "preprocess the data (`pyro-livi preprocess --rna lognorm_median --atac "
                                 "log1p`) and declare both continuous (--continuous-modalities rna,atac), or "
                                 "choose a count likelihood (nb, bernoulli)")
            if _count_likelihood(name) and m in continuous:
                raise InputError(dataset.source, f"modalities['{m}']",
                                 f"likelihood '{name}' models raw counts, but modality '{m}' was declared "
                                 "continuous",
                                 f"read the raw counts of '{m}' (e.g. --modalities {m}:counts, not listed in "
                                 "--continuous-modalities), or choose 'normal' (or 'bernoulli' for binarised "
                                 "peaks)")
        targets = {m: float(np.median(dataset.size_factors[m])) for m in dataset.modalities if m not in continuous}
        return dict(n_features={m: dataset.n_features[m] for m in dataset.modalities}, continuous=continuous,
                    likelihoods=names, library_target=targets)

    def _set_sizes(self, preset: str, **given) -> None:
        """Set n_latent, hidden, activation and kl_weight: those given, else the preset's (Table
        3.2), else :attr:`plain_defaults`. Raises ValueError for kl_weight <= 0 or n_latent < 1."""
        base = dict(self.plain_defaults)
        if preset == "thesis":
            base.update(self.thesis_preset)
        values = {k: (base[k] if v is None else v) for k, v in given.items()}
        self.n_latent = int(values["n_latent"])
        self.hidden = [int(w) for w in np.atleast_1d(values["hidden"])]
        self.activation = str(values["activation"])
        self.kl_weight = float(values["kl_weight"])
        if self.kl_weight <= 0:
            raise ValueError(f"kl_weight must be > 0, got {self.kl_weight} (the warm-up starts the KL at 0)")
        if self.n_latent < 1:
            raise ValueError(f"n_latent must be >= 1, got {self.n_latent}")

    @classmethod
    def default_stages(cls, *, epochs: int, patience: int | None = 20, kl_warmup_epochs: int = 20,
                       kl_warmup_start: float = 0.0, **schedule_options) -> list[Stage]:
        """The KL warm-up of eq. 3.36 (:class:`~pyro_livi.infer.KLWarmup` over epochs), then
        training at full KL weight.

        ``epochs`` counts every epoch. With ``epochs > kl_warmup_epochs`` (T): a stage
        "kl_warmup" of T epochs whose KL weight (a factor on top of the model's ``kl_weight``)
        rises linearly from ``kl_warmup_start`` at epoch 0 (beta_min / beta_max) by (1 - start) /
        T per epoch, then a stage "train" of the remaining epochs at weight 1, stopped early
        after ``patience`` stalled epochs (None: never; early stopping waits for the end of the
        warm-up, whose rising KL would read as a stalled loss). Otherwise one stage of
        ``epochs`` epochs on the same rising weight (eq. 3.36 cut at ``epochs``)."""
        if schedule_options:
            raise TypeError(f"unexpected schedule options {sorted(schedule_options)}")
        if kl_warmup_epochs < 1:
            raise ValueError(f"kl_warmup_epochs must be >= 1, got {kl_warmup_epochs}")
        if not 0.0 <= kl_warmup_start <= 1.0:
            raise ValueError(f"kl_warmup_start must be in [0, 1], got {kl_warmup_start}")
        warm = KLWarmup(epochs=int(kl_warmup_epochs), beta_min=float(kl_warmup_start), beta_max=1.0)
        stop = EarlyStopping(patience=patience) if patience else None
        if epochs <= kl_warmup_epochs:
            return [Stage("kl_warmup", int(epochs), train=("all",), kl_warmup=warm)]
        return [Stage("kl_warmup", int(kl_warmup_epochs), train=("all",), kl_warmup=warm),
                Stage("train", int(epochs) - int(kl_warmup_epochs), train=("all",), early_stopping=stop)]

    # ------------------------------------------------------------------------ data <-> networks
    def encoder_input(self, m: str, batch: Batch) -> torch.Tensor:
        """What an encoder reads of modality ``m`` (B, F_m): continuous values as they are,
        binarised values (x > 0) for ``bernoulli``, log1p(x / l_i * L_m) for count likelihoods."""
        x = batch.x[m]
        name = self.likelihood_names[m]
        if name in REAL_LIKELIHOODS:
            return x
        if name in BINARY_LIKELIHOODS:
            return (x > 0).to(x.dtype)
        return torch.log1p(x / batch.size_factor[m][:, None] * self.library_target[m])

    def decoded_input(self, m: str, out: torch.Tensor) -> torch.Tensor:
        """A decoder output for modality ``m`` in the representation of :meth:`encoder_input`:
        the output itself (``normal``), sigmoid(output) = P(open) (``bernoulli``), or log1p of
        the expected counts at library size L_m (count likelihoods)."""
        name = self.likelihood_names[m]
        if name in REAL_LIKELIHOODS:
            return out
        if name in BINARY_LIKELIHOODS:
            return torch.sigmoid(out)
        return torch.log1p(torch.softmax(out, dim=-1) * self.library_target[m])

    def likelihood_mean(self, m: str, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The ``mean`` argument of modality ``m``'s likelihood from a decoder output (B, F_m):
        the output (``normal``), softplus(output) (``bernoulli``: P(x = 1) = sigmoid(output)),
        softmax(output) * l_i (count likelihoods, l_i the cell's total count)."""
        name = self.likelihood_names[m]
        if name in REAL_LIKELIHOODS:
            return out
        if name in BINARY_LIKELIHOODS:
            return nn.functional.softplus(out)
        return torch.softmax(out, dim=-1) * batch.size_factor[m][:, None]

    def observed_values(self, m: str, batch: Batch) -> torch.Tensor:
        """The values observed at ``obs_<m>``: binarised (x > 0) for ``bernoulli``, else x."""
        x = batch.x[m]
        return (x > 0).to(x.dtype) if self.likelihood_names[m] in BINARY_LIKELIHOODS else x

    def observation(self, m: str, out: torch.Tensor, h: torch.Tensor, batch: Batch, observed: bool):
        """Distribution of ``obs_<m>`` (batch (B,), event (F_m,)) from a decoder output and its
        last hidden layer."""
        lik = self.likelihoods[m]
        params = self.likelihood_params(m, h)
        return lik(self.likelihood_mean(m, out, batch), **params).to_event(1)

    def _observe_output(self, m: str, out: torch.Tensor, h: torch.Tensor, batch: Batch, observed: bool):
        fn = self.observation(m, out, h, batch, observed).mask(batch.present[m])
        return pyro.sample(f"obs_{m}", fn, obs=self.observed_values(m, batch) if observed else None)

    def _prior(self, batch: Batch) -> dist.Distribution:
        ref = batch.x[self.modalities[0]]
        return dist.Normal(ref.new_zeros(self.n_latent), 1.0).to_event(1)


def default_likelihoods(modalities: tuple[str, ...], continuous, preset: str = "none") -> dict[str, str]:
    """Default likelihood of each modality: ``normal`` (MSE scale) for continuous ones or under
    the thesis preset, else ``nb`` for the first (genes) and ``bernoulli`` for the second
    (peaks)."""
    out = {}
    for k, m in enumerate(modalities):
        if m in set(continuous) or preset == "thesis":
            out[m] = "normal"
        else:
            out[m] = "nb" if k == 0 else "bernoulli"
    return out


_COMMON_OPTIONS = {
    "preset": Option("none", "'thesis': the settings of Table 3.2 of Yousefi Razin 2026 (K 256, hidden [1024] (dual: "
                     "[2048]), tanh, kl_weight 0.1, normal likelihoods at the MSE scale on preprocessed "
                     "values); options given explicitly override it", choices=PRESETS),
    "n_latent": Option(20, "K, dimension of each latent (thesis preset: 256)", type=int, at_least=1, nullable=True),
    "hidden": Option([256], "hidden widths of every encoder; decoders mirror them (thesis preset: 1024)",
                     type=int, nargs="+", at_least=1, nullable=True),
    "activation": Option("relu", "activation of the MLPs (thesis preset: tanh)", choices=tuple(ACTIVATIONS),
                         nullable=True),
    "kl_weight": Option(1.0, "beta_max, weight of the KL terms per cell after the warm-up (> 0; 1 gives the "
                        "ELBO; thesis preset: 0.1)", type=float, above=0, nullable=True),
    "normal_scale": Option("mse", "scale of 'normal' likelihoods: 'mse' fixes sigma^2 = n_features / 2 so the "
                           "loss is the thesis's MSE; 'learned' learns one scale per feature", choices=NORMAL_SCALES),
    "kl_warmup_epochs": Option(20, "T of eq. 3.36: epochs over which the KL weight rises to kl_weight",
                               type=int, schedule=True, at_least=1),
    "kl_warmup_start": Option(0.0, "KL weight at epoch 0 as a fraction of kl_weight (beta_min / beta_max)",
                              type=float, schedule=True, at_least=0, at_most=1),
}


class _SequentialVAE(_PairedVAEBase):
    """Two chained VAEs (see the module docstring). ``source`` is the position (0 genes,
    1 peaks) of the modality the first encoder reads; Decoder 1 predicts the other one
    (``middle``), Decoder 2 reconstructs ``source`` from z2.

    Parameters
    ----------
    n_features : {modality: number of features}, genes first, then peaks, e.g.
        ``{"rna": 2000, "atac": 20000}``; names must be Python identifiers.
    continuous : modalities holding preprocessed (continuous) values; the others hold counts.
    likelihoods : {modality: registered likelihood name} (a single name: both); default
        :func:`default_likelihoods`.
    library_target : {count modality: L_m}, the library size of the encoders' log1p(x / l * L)
        (``from_dataset``: the median total count); 1.0 when absent.
    preset : ``"none"`` or ``"thesis"`` (Table 3.2: n_latent 256, hidden [1024], tanh,
        kl_weight 0.1, ``normal`` likelihoods).
    n_latent, hidden, activation : K (of z1 and z2), hidden widths of every encoder (decoders
        mirror them), activation (one of :data:`ACTIVATIONS`); None takes the preset's value.
    kl_weight : beta_max (> 0), scale of the KL sites of z1 and z2; None takes the preset's.
    normal_scale : ``"mse"`` (sigma^2 = F / 2, the thesis's MSE) or ``"learned"``.
    counts_sample : optional {modality: dense (n, F) counts} for likelihood initialisation.

    Raises ValueError on bad modalities, likelihoods that do not fit the data kind, or
    kl_weight <= 0.
    """

    source: int = 0
    latent_site = "z1"
    options = dict(_COMMON_OPTIONS)
    thesis_preset = dict(n_latent=256, hidden=[1024], activation="tanh", kl_weight=0.1)

    def __init__(self, n_features: Mapping[str, int], *, continuous: Sequence[str] = (),
                 likelihoods: Mapping[str, str] | str | None = None,
                 library_target: Mapping[str, float] | None = None, preset: str = "none",
                 n_latent: int | None = None, hidden: Sequence[int] | None = None, activation: str | None = None,
                 kl_weight: float | None = None, normal_scale: str = "mse", counts_sample=None,
                 name: str | None = None):
        super().__init__(name=name)
        self._setup_modalities(n_features, continuous, likelihoods, library_target, normal_scale, preset)
        self._set_sizes(preset, n_latent=n_latent, hidden=hidden, activation=activation, kl_weight=kl_weight)
        src = self.modalities[self.source]
        mid = self.modalities[1 - self.source]
        self.source_modality, self.middle_modality = src, mid
        self.encoder1 = GaussianMLPEncoder(self.n_features[src], self.n_latent, self.hidden, self.activation)
        self.decoder1 = MLPDecoder(self.n_latent, self.n_features[mid], self.hidden, self.activation)
        self.encoder2 = GaussianMLPEncoder(self.n_features[mid], self.n_latent, self.hidden, self.activation)
        self.decoder2 = MLPDecoder(self.n_latent, self.n_features[src], self.hidden, self.activation)
        counts_sample = counts_sample or {}
        self._init_observation(mid, self.decoder1.width, counts_sample.get(mid))
        self._init_observation(src, self.decoder2.width, counts_sample.get(src))
        self.config = dict(n_features=dict(self.n_features), continuous=list(self.continuous),
                           likelihoods=dict(self.likelihood_names), library_target=dict(self.library_target),
                           preset=preset, n_latent=self.n_latent, hidden=list(self.hidden),
                           activation=self.activation, kl_weight=self.kl_weight, normal_scale=normal_scale)

    @classmethod
    def from_dataset(cls, dataset, *, likelihoods=None, counts_sample=None, **options):
        """The model sized for ``dataset``: its two modalities (genes first, peaks second),
        continuous ones as declared by the dataset, library targets = median total counts."""
        args = cls._dataset_arguments(dataset, likelihoods, options)
        return cls(**args, counts_sample=counts_sample, **options)

    # ---------------------------------------------------------------------- model / guide
    @pyro_method
    def model(self, batch: Batch, observed: bool = True):
        """The sequential VAE of seed 004 (eq. 3.1-3.11 for GPG, 3.12-3.21 for PGP) for the B cells
        of ``batch``: ``z1``, ``z2`` (B, K) ~ N(0, I) (KL scaled by ``kl_weight``), the middle
        modality observed from z1 and the source modality from z2 (``obs_<m>``, (B, F_m)).
        ``observed=False`` draws both observation sites instead of conditioning on the data
        (posterior predictive checks; see :meth:`ZooModel.model`)."""
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            with poutine.scale(scale=self.kl_weight):
                z1 = pyro.sample("z1", self._prior(batch))
                z2 = pyro.sample("z2", self._prior(batch))
            out1, h1 = self.decoder1(z1)
            self._observe_output(self.middle_modality, out1, h1, batch, observed)
            out2, h2 = self.decoder2(z2)
            self._observe_output(self.source_modality, out2, h2, batch, observed)

    @pyro_method
    def guide(self, batch: Batch, observed: bool = True):
        """q(z1 | source) and q(z2 | Decoder 1's output at the sampled z1), each (B, K); ``observed``
        changes nothing."""
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            mu1, logvar1 = self.encoder1(self.encoder_input(self.source_modality, batch))
            with poutine.scale(scale=self.kl_weight):
                z1 = pyro.sample("z1", dist.Normal(mu1, torch.exp(0.5 * logvar1)).to_event(1))
            out1, _ = self.decoder1(z1)
            mu2, logvar2 = self.encoder2(self.decoded_input(self.middle_modality, out1))
            with poutine.scale(scale=self.kl_weight):
                pyro.sample("z2", dist.Normal(mu2, torch.exp(0.5 * logvar2)).to_event(1))

    # ------------------------------------------------------------------- posterior summaries
    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (loc, scale) of z1 given the source modality, each (B, K)."""
        mu, logvar = self.encoder1(self.encoder_input(self.source_modality, batch))
        return mu, torch.exp(0.5 * logvar)

    def encode_latents(self, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{"z1": q(z1 | source), "z2": q(z2 | Decoder 1 at the posterior mean of z1)}, each
        (loc, scale) of shape (B, K)."""
        mu1, scale1 = self.encode(batch)
        out1, _ = self.decoder1(mu1)
        mu2, logvar2 = self.encoder2(self.decoded_input(self.middle_modality, out1))
        return {"z1": (mu1, scale1), "z2": (mu2, torch.exp(0.5 * logvar2))}


class GPG(_SequentialVAE):
    """Gene -> Peak -> Gene sequential VAE (seed 004, section 3.3, eq. 3.1-3.11): the guide
    encodes the genes into z1, Decoder 1 predicts the peaks, Encoder 2 reads the predicted
    peaks into z2 and Decoder 2 reconstructs the genes (see the module docstring)."""

    summary = ("Gene -> Peak -> Gene sequential VAE of paired RNA + ATAC: genes encoded to z1, decoded to "
               "peaks, re-encoded to z2, decoded to genes")
    reference = "seed 004 (section 3.3, eq. 3.1-3.11, Table 3.2); Yousefi Razin 2026 (MSc thesis, Politecnico di Torino), GPG"
    source = 0


class PGP(_SequentialVAE):
    """Peak -> Gene -> Peak sequential VAE (seed 004, section 3.4, eq. 3.12-3.21): the mirror of
    :class:`GPG`, starting from the peaks (see the module docstring)."""

    summary = ("Peak -> Gene -> Peak sequential VAE of paired RNA + ATAC: peaks encoded to z1, decoded to "
               "genes, re-encoded to z2, decoded to peaks")
    reference = "seed 004 (section 3.4, eq. 3.12-3.21, Table 3.2); Yousefi Razin 2026 (MSc thesis, Politecnico di Torino), PGP"
    source = 1
