"""CMC-VAE: a causal VAE of RNA and surface protein (CITE-seq) whose latent space is a linear
structural causal model over RNA and protein nodes, kept acyclic by DAGMA's log-determinant
penalty (seed 003, CrossModal-CausalVAE, eq. 1; acyclicity: Bello et al. 2022, DAGMA, see
:mod:`pyro_livi.acyclicity`).

Latent nodes. K = K_R + K_P latent *factor* nodes: K_R RNA nodes that decode only to the genes
and K_P protein nodes that decode only to the proteins (the nodes are factors mapped to the
features through the linear decoders, not the features themselves: a (G + P)^2 graph over
thousands of genes would be neither estimable per cell nor cheap to keep acyclic).

Generative model, for cell n with RNA x_n (G features), protein y_n (P features) and
categorical covariates s_n (one-hot c_n)::

    eps_n ~ Normal(0, I_K)                            exogenous noise
    z_n   = (I - A^T)^{-1} eps_n                      i.e. z_nj = sum_i A_ij z_ni + eps_nj
          ~ Normal(0, ((I - A)(I - A)^T)^{-1})        site "z" (KL weight beta)
    eta_n^R = z_n^R W_R + b_R + c_n C_R               W_R (K_R, G): linear RNA decoder
    eta_n^P = z_n^P W_P + b_P + c_n C_P               W_P (K_P, P): linear protein decoder
    x_n ~ Lik_R(mean_R), y_n ~ Lik_P(mean_P)          sites obs_<rna>, obs_<prot>
    mean = eta (``normal``: preprocessed values, the poster's squared-error reconstruction)
         = l_n softmax(eta)  (any count likelihood, ``nb`` by default; l_n the cell's total
                              count in that modality)

For a count likelihood the softmax ignores a shift common to all features, so the decoder rows
are centred over the features (:meth:`CMCVAE.decoders`; W below means the centred rows): the
likelihood, the penalties and the effects all see only the identifiable part.

The sample site is the endogenous z, whose prior is the distribution of (I - A^T)^{-1} eps:
the same model as sampling eps, with a guide over z (next paragraph), so that the KL term is,
for A, the Gaussian linear-SEM score of the posterior z (0.5 ||z - z A||^2 per cell, the
score DAGMA minimises) and A is learned without the encoder having to follow it. The
exogenous noise of a cell is recovered as eps = z (I - A) (:meth:`CMCVAE.exogenous`).

A (K, K), A[i, j] the weight of the edge node i -> node j, has four blocks::

    A = [[A_RR, A_RP],        A_RR gene-program -> gene-program,  A_RP RNA -> protein,
         [A_PR, A_PP]]        A_PR protein -> RNA (feedback),     A_PP protein -> protein

with zero diagonal; ``cross_edges`` may switch off a cross block (default: both are free, so
that the direction between the modalities is learned, not imposed).

Penalties (eq. 1), each a ``pyro.factor`` site in per-cell units (times the number of cells, so
that they weigh against the per-cell ELBO terms as in the poster's loss):

- ``penalty_dag``: lambda_dag dag_factor^t h_s(A) (:func:`~pyro_livi.acyclicity.acyclicity`),
  t the path-following round (training stage ``dag_round_<t>``, :meth:`CMCVAE.default_stages`;
  the weight of h rises dag_factor-fold per round as DAGMA's mu falls), s = ``dag_s[t]``
  enlarged by ``s_step`` whenever A lies outside the domain of h_s
  (:func:`~pyro_livi.acyclicity.acyclicity_penalty`). ``acyclic="all"`` (default) constrains the
  whole graph, which is then a DAG across modalities as well (a gene program cannot both cause
  and be caused by a protein program); ``acyclic="within"`` constrains A_RR and A_PP only
  (h(A_RR) + h(A_PP), as the poster's "DAGs within modalities"), leaving feedback loops
  through the cross blocks unconstrained.
- ``penalty_sparse``: lambda_sparse |A|_1.
- ``penalty_decoder``: lambda_dec (|W_R|_1 + |W_P|_1).
- ``penalty_ortho``: lambda_ortho (||W_R W_R^T - I||_F^2 + ||W_P W_P^T - I||_F^2) (the poster's
  ||W^T W - I||_F^2 with W stored nodes x features): orthonormal decoders fix the scale of
  the nodes, so that exogenous noises of unit variance make the direction of an edge
  identifiable (equal-variance linear SEMs), and fix the rotation within a modality together
  with the decoder sparsity.
- ``penalty_prior``: lambda_prior mean_e max(0, margin - (f_e - |E_ts|)) over the user's prior
  edges e = (s -> t, sign) between features (:func:`pyro_livi.analysis.causal.read_edge_table`),
  f_e = sign E_st (|E_st| for unsigned edges), E the feature-level effects below: listed edges
  are rewarded over their reverse.

Identifiability. Within a modality, the decoder sparsity and orthonormality fix the rotation of
the nodes; the direction of an edge is identified, as in equal-variance linear SEMs (Peters &
Buhlmann 2014), by the latent variances: every exogenous noise has unit variance, so a node's
variance beyond 1 must come from its parents. Between the RNA and the protein block this is the
only signal of direction. On real data the variance a block's nodes need depends on the scale
and number of its features (a node spread over many genes needs a larger z for the same change
per gene), so the learned direction between modalities reflects these scales as well as any
causal order (the "varsortability" of Reisach et al. 2021); read the asymmetry with that in mind.

Feature-level effects (the read-out of a gene-level effect). A shift of the exogenous noise by
delta_i, the least-norm node vector that moves feature i's linear predictor by one unit
(row i of the decoder's pseudo-inverse), changes the nodes by delta_i (I - A)^{-1}; through at
least one edge by delta_i N with N = (I - A)^{-1} - I (entries: the summed path products,
the total causal effect of node on node in a linear SEM). The effect of feature i on feature j
is then E_ij = delta_i N W_{:, j}, on the linear-predictor scale of j (centred log proportion
for count likelihoods, data units for ``normal``) per unit of i's. RNA -> protein for a matched pair
(g, p) is E_gp, protein -> RNA is E_pg (:mod:`pyro_livi.analysis.causal`).

Guide: q(z_n | x_n, y_n, s_n) = Normal(mu, diag(sigma^2)), an MLP on [log1p(1e4 x / l),
log1p(1e4 y / l)] (continuous modalities as they are) and the one-hot covariates;
sigma^2 = exp(.) + 1e-4. KL(q || p) is analytic (two multivariate normals).

Initialisation (``init``): the decoders start at the principal axes of each modality rotated
by varimax (sparse, orthonormal; a sparse start lets the decoder sparsity settle the rotation
within a modality before the graph's directions are fixed), A at 0 (the reference's start),
the intercepts at the feature means.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.nn import PyroModule, PyroParam, pyro_method
from torch import nn

from ..acyclicity import PathSchedule, acyclicity_penalty
from ..data.batch import Batch
from ..infer.stages import EarlyStopping, Stage
from ..likelihoods import get_likelihood
from ..nn import FCLayers, one_hot_covariates
from ._base import DataNeeds, Option, ZooModel

#: most path-following rounds a schedule may have (components ``dag_round_0`` .. ``dag_round_7``)
MAX_DAG_ROUNDS = 8
ACYCLIC = ("all", "within")
CROSS_EDGES = ("both", "rna_to_prot", "prot_to_rna")
INITS = ("varimax", "pca", "random")
DEFAULT_S = (1.0, 0.9, 0.8, 0.7, 0.6)


class CMCVAE(ZooModel):
    """CMC-VAE (see the module docstring for the equations).

    Parameters
    ----------
    n_genes, n_proteins : G and P.
    n_rna_nodes, n_prot_nodes : K_R and K_P, latent nodes of each block.
    n_covariate_categories : categories of each categorical covariate (one-hot into the encoder,
        additive offsets C on each decoder's linear predictor).
    n_hidden, n_layers, dropout_rate : the encoder MLP (LayerNorm).
    beta : weight of the KL term of z.
    lambda_dag : weight of h(A) per cell in the first path-following round; dag_factor : its
        increase per round; dag_s : s of each round (DAGMA's 1.0, 0.9, ..., 0.6); s_step : the
        increase of s when A leaves the domain of h_s.
    lambda_sparse, lambda_dec, lambda_ortho, lambda_prior : weights (per cell) of |A|_1,
        |W|_1, ||W W^T - I||_F^2 and the prior margin loss; prior_margin : the margin, on the
        effects' scale.
    acyclic : ``"all"`` (h on the whole A) or ``"within"`` (h on A_RR and A_PP).
    cross_edges : ``"both"``, ``"rna_to_prot"`` (A_PR = 0) or ``"prot_to_rna"`` (A_RP = 0).
    edge_threshold : |A| below which an edge is dropped from the reported graph (DAGMA: 0.3).
    prior_edges : resolved prior edges, [[source feature, target feature, sign], ...] with
        features indexed over [genes, proteins] (0..G-1 genes, G..G+P-1 proteins); see
        :meth:`from_dataset` for reading them from a table.
    likelihoods : {modality: registered likelihood}; default ``nb`` for counts, ``normal`` for
        continuous modalities.
    modalities : (RNA name, protein name); sites ``obs_<name>``.
    continuous_modalities : modalities holding preprocessed values (fed to the encoder as
        they are; counts are library-normalised and log1p-transformed).
    counts_sample : {modality: (n, features) counts} for data-based likelihood initialisation.

    Raises ValueError on unknown choices or sizes < 1.
    """

    summary = ("CMC-VAE: linear decoders from a latent linear SCM over RNA and protein nodes, "
               "DAGMA-acyclic graph, RNA <-> protein effects")
    reference = "seed 003 (CrossModal-CausalVAE, eq. 1); Bello et al. 2022 (DAGMA)"
    data_needs = DataNeeds(modalities=(2, 2), inputs="any", donors="unused", missing_modalities=False,
                           preferred_inputs=("counts", "counts"))
    options = {
        "n_rna_nodes": Option(10, "K_R, latent nodes decoding to the RNA", type=int, at_least=1),
        "n_prot_nodes": Option(5, "K_P, latent nodes decoding to the proteins", type=int, at_least=1),
        "n_hidden": Option(128, "width of the encoder's hidden layers", type=int, at_least=1),
        "n_layers": Option(1, "hidden layers of the encoder (0: a linear map)", type=int, at_least=0),
        "dropout_rate": Option(0.1, "dropout probability in the encoder", type=float, at_least=0, below=1),
        "beta": Option(1.0, "weight of the KL divergence of the latent nodes z (> 0)", type=float, above=0),
        "lambda_dag": Option(1.0, "weight of the acyclicity h(A) per cell in the first path-following "
                             "round", type=float, at_least=0),
        "dag_factor": Option(10.0, "increase of the acyclicity weight per path-following round", type=float,
                             at_least=1),
        "dag_s": Option(list(DEFAULT_S), "s of h_s in each path-following round (the last repeats)",
                        type=float, nargs="+", above=0),
        "s_step": Option(0.1, "increase of s while A lies outside the domain of h_s", type=float, above=0),
        "lambda_sparse": Option(0.01, "weight of |A|_1 per cell", type=float, at_least=0),
        "lambda_dec": Option(0.01, "weight of the decoders' |W|_1 per cell", type=float, at_least=0),
        "lambda_ortho": Option(1.0, "weight of ||W W^T - I||_F^2 per cell", type=float, at_least=0),
        "lambda_prior": Option(1.0, "weight of the prior-edge margin loss per cell", type=float, at_least=0),
        "prior_margin": Option(0.1, "margin of a prior edge's effect over its reverse (linear-predictor "
                               "units)", type=float, at_least=0),
        "acyclic": Option("all", "acyclicity on the whole graph, or within each modality only",
                          choices=ACYCLIC),
        "cross_edges": Option("both", "allowed cross-modality edges", choices=CROSS_EDGES),
        "edge_threshold": Option(0.3, "|A| below which an edge is left out of the reported graph",
                                 type=float, at_least=0),
        "prior": Option(None, "TSV/CSV of prior edges between features (columns source, target, "
                        "optional sign); names are gene or protein names, 'rna:NAME' / 'prot:NAME' "
                        "when both modalities have the name", type=str),
        "prior_unknown": Option("error", "prior edges naming a feature absent from the data: refuse "
                                "(error) or leave them out (drop)", choices=("error", "drop")),
        "init": Option("varimax", "initial decoders: principal axes of a cell sample rotated by varimax "
                       "(sparse), the principal axes themselves, or random orthonormal rows", choices=INITS),
        "dag_rounds": Option(3, "path-following rounds (training stages, the acyclicity weight rising "
                             "dag_factor-fold per round)", type=int, schedule=True, at_least=1,
                             at_most=MAX_DAG_ROUNDS),
        "warm_fraction": Option(0.5, "epochs of each round but the last, as a fraction of --epochs "
                                "(the last round runs --epochs)", type=float, schedule=True, at_least=0),
    }
    outputs = ("latent", "loadings", "dispersions")
    latent_name = "latent"
    latent_site = "z"
    components_all = tuple(f"dag_round_{t}" for t in range(MAX_DAG_ROUNDS))

    def __init__(self, n_genes: int, n_proteins: int, *, n_rna_nodes: int = 10, n_prot_nodes: int = 5,
                 n_covariate_categories: Sequence[int] = (), n_hidden: int = 128, n_layers: int = 1,
                 dropout_rate: float = 0.1, beta: float = 1.0, lambda_dag: float = 1.0,
                 dag_factor: float = 10.0, dag_s: Sequence[float] = DEFAULT_S, s_step: float = 0.1,
                 lambda_sparse: float = 0.01, lambda_dec: float = 0.01, lambda_ortho: float = 1.0,
                 lambda_prior: float = 1.0, prior_margin: float = 0.1, acyclic: str = "all",
                 cross_edges: str = "both", edge_threshold: float = 0.3, prior_edges=None,
                 init: str = "varimax", likelihoods: dict | None = None, modalities: Sequence[str] = ("rna", "prot"),
                 continuous_modalities: Sequence[str] = (), counts_sample=None, name: str | None = None):
        super().__init__(name=name)
        if acyclic not in ACYCLIC:
            raise ValueError(f"acyclic must be one of {ACYCLIC}, got {acyclic!r}")
        if cross_edges not in CROSS_EDGES:
            raise ValueError(f"cross_edges must be one of {CROSS_EDGES}, got {cross_edges!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if min(int(n_rna_nodes), int(n_prot_nodes), int(n_genes), int(n_proteins)) < 1:
            raise ValueError("CMCVAE needs at least one gene, protein and node of each block")
        rna, prot = map(str, modalities)
        continuous = [m for m in map(str, continuous_modalities) if m in (rna, prot)]
        lik_names = {m: "normal" if m in continuous else "nb" for m in (rna, prot)}
        lik_names.update({m: (v if isinstance(v, str) else v.name) for m, v in (likelihoods or {}).items()
                          if m in lik_names})
        dag_s = [float(v) for v in np.atleast_1d(dag_s)]
        edges = [[int(i), int(j), int(np.sign(sg))] for i, j, sg in (prior_edges or [])]
        for i, j, _ in edges:
            if not (0 <= i < n_genes + n_proteins and 0 <= j < n_genes + n_proteins) or i == j:
                raise ValueError(f"prior edge ({i}, {j}) does not join two features of 0..{n_genes + n_proteins - 1}")
        self.config = dict(n_genes=int(n_genes), n_proteins=int(n_proteins), n_rna_nodes=int(n_rna_nodes),
                           n_prot_nodes=int(n_prot_nodes),
                           n_covariate_categories=[int(n) for n in n_covariate_categories],
                           n_hidden=int(n_hidden), n_layers=int(n_layers), dropout_rate=float(dropout_rate),
                           beta=float(beta), lambda_dag=float(lambda_dag), dag_factor=float(dag_factor),
                           dag_s=dag_s, s_step=float(s_step), lambda_sparse=float(lambda_sparse),
                           lambda_dec=float(lambda_dec), lambda_ortho=float(lambda_ortho),
                           lambda_prior=float(lambda_prior), prior_margin=float(prior_margin), acyclic=acyclic,
                           cross_edges=cross_edges, edge_threshold=float(edge_threshold), prior_edges=edges,
                           init=init, likelihoods=dict(lik_names), modalities=[rna, prot],
                           continuous_modalities=continuous)
        for key in ("beta", "lambda_dag", "dag_factor", "s_step", "lambda_sparse", "lambda_dec", "lambda_ortho",
                    "lambda_prior", "prior_margin", "acyclic", "cross_edges", "edge_threshold"):
            setattr(self, key, self.config[key])
        self.modalities = (rna, prot)
        self.continuous = set(continuous)
        self.n_genes, self.n_proteins = int(n_genes), int(n_proteins)
        self.K_R, self.K_P = int(n_rna_nodes), int(n_prot_nodes)
        self.K = self.K_R + self.K_P
        self.n_categories = [int(n) for n in n_covariate_categories]
        self.path = PathSchedule(rounds=MAX_DAG_ROUNDS, mu_factor=1.0 / self.dag_factor, s=tuple(dag_s),
                                 s_step=self.s_step)
        n_cov = sum(self.n_categories)

        # the structural causal model
        mask = torch.ones(self.K, self.K)
        mask.fill_diagonal_(0.0)
        if cross_edges == "rna_to_prot":
            mask[self.K_R:, :self.K_R] = 0.0
        elif cross_edges == "prot_to_rna":
            mask[:self.K_R, self.K_R:] = 0.0
        self.register_buffer("A_mask", mask)
        self.A_raw = PyroParam(torch.zeros(self.K, self.K))
        #: the path-following round reached in training (used when no single round is active)
        self.register_buffer("dag_round", torch.zeros((), dtype=torch.long))
        #: s used by the last evaluation of the acyclicity penalty (after any enlargement)
        self.last_s: float = dag_s[0]
        self.register_buffer("prior_index", torch.as_tensor([e[:2] for e in edges], dtype=torch.long).reshape(-1, 2))
        self.register_buffer("prior_sign", torch.as_tensor([e[2] for e in edges], dtype=torch.float32))

        # linear decoders, orthonormal rows at the start
        gen = torch.Generator().manual_seed(0)
        self.W_R = PyroParam(_orthonormal_rows(self.K_R, self.n_genes, gen))
        self.W_P = PyroParam(_orthonormal_rows(self.K_P, self.n_proteins, gen))
        self.b_R = PyroParam(torch.zeros(self.n_genes))
        self.b_P = PyroParam(torch.zeros(self.n_proteins))
        if n_cov:
            self.C_R = PyroParam(torch.zeros(n_cov, self.n_genes))
            self.C_P = PyroParam(torch.zeros(n_cov, self.n_proteins))

        # observation models
        counts_sample = counts_sample or {}
        self.likelihoods = {m: get_likelihood(n) for m, n in lik_names.items()}
        self._init_likelihood_params(rna, self.n_genes, self.K_R, counts_sample.get(rna))
        self._init_likelihood_params(prot, self.n_proteins, self.K_P, counts_sample.get(prot))

        # inference network q(z | x, y, s)
        hidden = [int(n_hidden)] * int(n_layers)
        width = hidden[-1] if hidden else self.n_genes + self.n_proteins + n_cov
        self.encoder = FCLayers(self.n_genes + self.n_proteins, hidden, n_cov, "layer", dropout_rate)
        self.z_loc = PyroModule[nn.Linear](width, self.K)
        self.z_log_var = PyroModule[nn.Linear](width, self.K)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_dataset(cls, dataset, *, likelihoods=None, counts_sample=None, prior=None, prior_unknown: str = "error",
                     init: str = "varimax", **options) -> "CMCVAE":
        """CMCVAE sized for ``dataset`` (two modalities: RNA first, protein second).

        ``prior``: a path to a TSV/CSV (or a DataFrame) of prior edges between features, read by
        :func:`pyro_livi.analysis.causal.read_edge_table` (``prior_unknown``: ``"error"`` or
        ``"drop"`` for rows naming absent features). With ``init="varimax"`` (or ``"pca"``) the
        decoders start at the (varimax-rotated) principal axes of up to 5000 cells
        (:meth:`initialise_from`)."""
        rna, prot = dataset.modalities
        edges = None
        if prior is not None:
            from ..analysis.causal import read_edge_table

            table = read_edge_table(prior, dataset.feature_names, modalities=(rna, prot), unknown=prior_unknown)
            edges = table[["source_index", "target_index", "sign"]].to_numpy().tolist()
        model = cls(dataset.n_features[rna], dataset.n_features[prot],
                    n_covariate_categories=[len(c) for c in dataset.covariate_categories.values()],
                    likelihoods=likelihoods, modalities=(rna, prot),
                    continuous_modalities=[m for m in dataset.spec.continuous_modalities if m in (rna, prot)],
                    prior_edges=edges, init=init, counts_sample=counts_sample, **options)
        if init in ("varimax", "pca"):
            model.initialise_from(dataset)
        return model

    @torch.no_grad()
    def initialise_from(self, dataset, *, n_cells: int = 5000, seed: int = 0) -> None:
        """Start each decoder at the top principal axes of its modality (rows of W orthonormal,
        so the orthogonality penalty starts at 0) and its intercept at the feature means, on
        the working scale of its likelihood: data values for ``normal``, log proportions
        (log of mean x / l) for count likelihoods. The principal axes are computed on the
        encoder's input scale (log1p of library-normalised counts), centred, and rotated by
        varimax with ``init="varimax"``."""
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(dataset.n_cells, size=min(dataset.n_cells, int(n_cells)), replace=False))
        batch = dataset.batch(idx)
        for m, W, b, k in ((self.modalities[0], self.W_R, self.b_R, self.K_R),
                           (self.modalities[1], self.W_P, self.b_P, self.K_P)):
            x = batch.x[m].double()
            y = self._encoder_scale(m, x, batch.size_factor[m].double())
            y = y - y.mean(0)
            q = min(k, *y.shape)
            if min(y.shape) > 3 * (q + 10):  # randomised SVD of the top axes (Halko et al. 2011)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    _, _, V = torch.svd_lowrank(y, q=q + 10, niter=4)
                Vh = V.T
            else:
                _, _, Vh = torch.linalg.svd(y, full_matrices=False)
            axes = torch.zeros(k, W.shape[1], dtype=torch.float64)
            axes[:q] = Vh[:q]
            if q < k:  # more nodes than principal axes: complete with orthonormal random rows
                rest = _orthonormal_rows(k, W.shape[1], torch.Generator().manual_seed(seed)).double()
                axes[q:] = rest[q:]
            if self.config["likelihoods"][m] != "normal":  # softmax link: rows centred (decoders())
                axes = axes - axes.mean(1, keepdim=True)
                U, _, Vh = torch.linalg.svd(axes, full_matrices=False)
                axes = U @ Vh  # the nearest matrix with orthonormal rows, still centred
            if self.config["init"] == "varimax":
                axes = _varimax(axes)
            W.copy_(axes.float())
            if self.config["likelihoods"][m] == "normal":
                b.copy_(x.mean(0).float())
            else:
                share = (x / batch.size_factor[m].double().clamp(min=1e-8)[:, None]).mean(0).clamp(min=1e-8)
                b.copy_(share.log().float())

    @classmethod
    def default_stages(cls, *, epochs: int, patience: int | None = 20, dag_rounds: int = 3,
                       warm_fraction: float = 0.5, **schedule_options) -> list[Stage]:
        """DAGMA's path following as training stages: ``dag_rounds`` stages ``dag_round_<t>``,
        each training every parameter with the acyclicity weight lambda_dag dag_factor^t and
        s = dag_s[t]; the rounds before the last run max(1, round(warm_fraction x epochs))
        epochs, the last runs up to ``epochs`` with early stopping after ``patience`` stalled
        epochs (the reference's warm and final iteration counts, 3e4 and 6e4: warm_fraction 0.5)."""
        if schedule_options:
            raise TypeError(f"unexpected schedule options {sorted(schedule_options)}")
        if not 1 <= int(dag_rounds) <= MAX_DAG_ROUNDS:
            raise ValueError(f"dag_rounds must be in 1..{MAX_DAG_ROUNDS}, got {dag_rounds}")
        warm = max(1, round(float(warm_fraction) * epochs))
        stages = []
        for t in range(int(dag_rounds)):
            last = t == int(dag_rounds) - 1
            stop = EarlyStopping(patience=patience) if (last and patience) else None
            stages.append(Stage(f"dag_round_{t}", epochs if last else warm, train=("all",),
                                components=(f"dag_round_{t}",), early_stopping=stop))
        return stages

    # ------------------------------------------------------------------------- building blocks
    @property
    def A(self) -> torch.Tensor:
        """Weighted adjacency (K, K) of the latent SCM, A[i, j] = edge node i -> node j (rows
        and columns: the K_R RNA nodes, then the K_P protein nodes)."""
        return self.A_raw * self.A_mask

    def node_names(self) -> list[str]:
        """``rna_node_0`` .. ``rna_node_<K_R-1>``, ``prot_node_0`` .. (the order of A's rows)."""
        return [f"rna_node_{k}" for k in range(self.K_R)] + [f"prot_node_{k}" for k in range(self.K_P)]

    def current_round(self) -> int:
        """The path-following round: the one training stage component that is on; otherwise
        (outside staged training, or every component on after it) the last round trained."""
        active = [int(c.rsplit("_", 1)[1]) for c in self.components if c.startswith("dag_round_")]
        if len(active) == 1:
            if self.training and active[0] > int(self.dag_round):
                self.dag_round.fill_(active[0])
            return active[0]
        return int(self.dag_round)

    def total_effects(self, A: torch.Tensor | None = None) -> torch.Tensor:
        """(I - A)^{-1} (K, K): entry [i, j] = total effect of node i on node j (1 on the diagonal
        for a DAG), so that the row vector of nodes is z = eps (I - A)^{-1}."""
        A = self.A if A is None else A
        return torch.linalg.inv(torch.eye(self.K, dtype=A.dtype, device=A.device) - A)

    def _encoder_scale(self, m: str, x: torch.Tensor, size_factor: torch.Tensor) -> torch.Tensor:
        if m in self.continuous:
            return x
        return torch.log1p(1e4 * x / size_factor.clamp(min=1e-8)[:, None])

    def _covariates(self, batch: Batch) -> torch.Tensor | None:
        return one_hot_covariates(batch.covariates, self.n_categories)

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and sd of the nodes z, each (B, K)."""
        rna, prot = self.modalities
        h = torch.cat([self._encoder_scale(rna, batch.x[rna], batch.size_factor[rna]),
                       self._encoder_scale(prot, batch.x[prot], batch.size_factor[prot])], dim=-1)
        cov = self._covariates(batch)
        h = self.encoder(h, cov)
        if cov is not None and not self.encoder.blocks:  # no hidden layer: the covariates join the input
            h = torch.cat([h, cov], dim=-1)
        return self.z_loc(h), torch.sqrt(self.z_log_var(h).exp() + 1e-4)

    def exogenous(self, z: torch.Tensor) -> torch.Tensor:
        """eps = z (I - A) (row form of eps = (I - A^T) z): the exogenous noise of nodes z (B, K)."""
        A = self.A
        return z @ (torch.eye(self.K, dtype=A.dtype, device=A.device) - A)

    def _mean(self, m: str, eta: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self.config["likelihoods"][m] == "normal":
            return eta
        return torch.softmax(eta, dim=-1) * batch.size_factor[m][:, None]

    def decoders(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoders as the likelihoods see them, W_R (K_R, G) and W_P (K_P, P): for a count
        likelihood (softmax link, blind to a shift common to every feature) each row is centred
        over the features, so that only the identifiable part is parameterised, penalised and
        read out (effects then are on the centred log-proportion scale); ``normal``: as stored."""
        out = []
        for m, W in zip(self.modalities, (self.W_R, self.W_P)):
            out.append(W if self.config["likelihoods"][m] == "normal" else W - W.mean(-1, keepdim=True))
        return out[0], out[1]

    def decoder_pinv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-inverses W^+ = W^T (W W^T)^{-1} of the two decoders (:meth:`decoders`):
        (G, K_R) and (P, K_P)."""
        W_R, W_P = self.decoders()
        return _pinv_rows(W_R), _pinv_rows(W_P)

    def feature_effects(self, sources: torch.Tensor, targets: torch.Tensor,
                        A: torch.Tensor | None = None) -> torch.Tensor:
        """Effects E_ij of features i = ``sources`` on features j = ``targets`` (each (n,) long,
        features indexed over [genes, proteins]): E_ij = delta_i ((I - A)^{-1} - I) W_{:, j}
        with delta_i row i of the decoder pseudo-inverse (see the module docstring). Returns (n,),
        differentiable."""
        A = self.A if A is None else A
        N = self.total_effects(A) - torch.eye(self.K, dtype=A.dtype, device=A.device)
        W_R, W_P = self.decoders()
        pinv_R, pinv_P = _pinv_rows(W_R), _pinv_rows(W_P)
        G = self.n_genes
        delta = torch.zeros(sources.shape[0], self.K, dtype=A.dtype, device=A.device)
        is_gene = sources < G
        delta[is_gene, :self.K_R] = pinv_R[sources[is_gene]]
        delta[~is_gene, self.K_R:] = pinv_P[sources[~is_gene] - G]
        col = torch.zeros(targets.shape[0], self.K, dtype=A.dtype, device=A.device)
        to_gene = targets < G
        col[to_gene, :self.K_R] = W_R[:, targets[to_gene]].T
        col[~to_gene, self.K_R:] = W_P[:, targets[~to_gene] - G].T
        return ((delta @ N) * col).sum(-1)

    def acyclicity(self, A: torch.Tensor | None = None, s: float | None = None) -> torch.Tensor:
        """h of the constrained blocks (``acyclic``), at s = dag_s of the current round enlarged
        while A lies outside the domain (records the s used in ``last_s``)."""
        A = self.A if A is None else A
        s = self.path.s_at(self.current_round()) if s is None else s
        if self.acyclic == "all":
            h, self.last_s = acyclicity_penalty(A, s, self.s_step)
            return h
        h_R, s_R = acyclicity_penalty(A[:self.K_R, :self.K_R], s, self.s_step)
        h_P, s_P = acyclicity_penalty(A[self.K_R:, self.K_R:], s, self.s_step)
        self.last_s = max(s_R, s_P)
        return h_R + h_P

    def prior_margin_loss(self, A: torch.Tensor | None = None) -> torch.Tensor:
        """mean over prior edges of max(0, margin - (f_e - |E_ts|)), f_e = sign E_st (|E_st| when
        unsigned); 0 without prior edges."""
        A = self.A if A is None else A
        if self.prior_index.shape[0] == 0:
            return A.new_zeros(())
        src, tgt = self.prior_index[:, 0], self.prior_index[:, 1]
        forward = self.feature_effects(src, tgt, A)
        reverse = self.feature_effects(tgt, src, A)
        sign = self.prior_sign.to(A.dtype)
        strength = torch.where(sign != 0, sign * forward, forward.abs())
        return torch.relu(self.prior_margin - (strength - reverse.abs())).mean()

    def _penalties(self, n_cells: int, A: torch.Tensor) -> None:
        """The penalties of eq. 1 as factor sites, in per-cell units (times ``n_cells``)."""
        t = self.current_round()
        weight = self.lambda_dag * self.dag_factor ** t
        pyro.factor("penalty_dag", -n_cells * weight * self.acyclicity(A, self.path.s_at(t)))
        pyro.factor("penalty_sparse", -n_cells * self.lambda_sparse * A.abs().sum())
        W_R, W_P = self.decoders()
        pyro.factor("penalty_decoder", -n_cells * self.lambda_dec * (W_R.abs().sum() + W_P.abs().sum()))
        ortho = sum((W @ W.T - torch.eye(W.shape[0], dtype=W.dtype, device=W.device)).pow(2).sum()
                    for W in (W_R, W_P))
        pyro.factor("penalty_ortho", -n_cells * self.lambda_ortho * ortho)
        if self.prior_index.shape[0]:
            pyro.factor("penalty_prior", -n_cells * self.lambda_prior * self.prior_margin_loss(A))

    # ----------------------------------------------------------------------- model / guide
    def prior_z(self, A: torch.Tensor | None = None) -> dist.MultivariateNormal:
        """p(z) of the SCM: z = (I - A^T)^{-1} eps with eps ~ Normal(0, I_K) is Normal with
        precision (I - A)(I - A)^T (row-vector form z = eps (I - A)^{-1}), event shape (K,)."""
        A = self.A if A is None else A
        I_A = torch.eye(self.K, dtype=A.dtype, device=A.device) - A
        return dist.MultivariateNormal(A.new_zeros(self.K), precision_matrix=I_A @ I_A.T)

    @pyro_method
    def model(self, batch: Batch, observed: bool = True):
        """CMC-VAE's eq. 1 (seed 003) for the B cells of ``batch``: ``z`` (B, K_R + K_P) from the
        linear SCM over the nodes (KL scaled by ``beta``), ``obs_<rna>`` (B, G) and ``obs_<prot>``
        (B, P) from the linear decoders, and the acyclicity / sparsity / prior penalty factors.
        ``observed=False`` draws both observation sites instead of conditioning on the data
        (posterior predictive checks; see :meth:`ZooModel.model`)."""
        rna, prot = self.modalities
        A = self.A
        W_R, W_P = self.decoders()
        cov = self._covariates(batch)
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            with poutine.scale(scale=self.beta):
                z = pyro.sample("z", self.prior_z(A))
            z_R, z_P = z[..., :self.K_R], z[..., self.K_R:]
            eta_R, eta_P = z_R @ W_R + self.b_R, z_P @ W_P + self.b_P
            if cov is not None:
                eta_R, eta_P = eta_R + cov @ self.C_R, eta_P + cov @ self.C_P
            self._observe(rna, self._mean(rna, eta_R, batch), z_R, batch, observed)
            self._observe(prot, self._mean(prot, eta_P, batch), z_P, batch, observed)
        self._penalties(batch.n_cells, A)

    @pyro_method
    def guide(self, batch: Batch, observed: bool = True):
        """q(z_i | x_i, y_i, s_i) = Normal(encoder) with a diagonal covariance, ``z`` (B, K_R + K_P);
        ``observed`` changes nothing."""
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            loc, scale = self.encode(batch)
            with poutine.scale(scale=self.beta):
                pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale)))

    # ------------------------------------------------------------------- posterior summaries
    def loadings(self) -> dict[str, torch.Tensor]:
        """Decoder weights (:meth:`decoders`) of every node on each modality's features,
        {``W__<modality>``: (K, G_m)}, zero for the nodes of the other block (rows in the order
        of A)."""
        rna, prot = self.modalities
        W_R, W_P = (W.detach() for W in self.decoders())
        W_rna = torch.cat([W_R, W_R.new_zeros(self.K_P, self.n_genes)])
        W_prot = torch.cat([W_P.new_zeros(self.K_R, self.n_proteins), W_P])
        return {f"W__{rna}": W_rna, f"W__{prot}": W_prot}


def _orthonormal_rows(k: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """(k, n) with orthonormal rows (k <= n), or the first k rows of an orthonormal basis padded
    with random rows when k > n; from a seeded Gaussian matrix."""
    G = torch.randn(n, max(k, 1), generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    Q = Q * torch.sign(torch.diagonal(R))[: Q.shape[1]]
    rows = Q.T[:k]
    if rows.shape[0] < k:
        extra = torch.randn(k - rows.shape[0], n, generator=generator, dtype=torch.float64) / np.sqrt(n)
        rows = torch.cat([rows, extra])
    return rows.float()


def _varimax(rows: torch.Tensor, n_iter: int = 500, tol: float = 1e-8) -> torch.Tensor:
    """Varimax rotation (Kaiser 1958) of the loadings ``rows`` (k, n), k orthonormal rows: the
    orthogonal R (k, k) maximising the variance of the squared loadings of each row, returned
    as R rows (rows stay orthonormal). The classic SVD iteration: with L = rows^T R,
    R <- U V^T where U S V^T = svd(rows (L^3 - L diag(mean_n L^2)))."""
    L0 = rows.T.double()
    n, k = L0.shape
    R = torch.eye(k, dtype=torch.float64)
    objective = 0.0
    for _ in range(n_iter):
        L = L0 @ R
        U, S, Vh = torch.linalg.svd(L0.T @ (L ** 3 - L * (L ** 2).mean(0, keepdim=True)))
        R = U @ Vh
        if S.sum() < objective * (1 + tol):
            break
        objective = float(S.sum())
    return (L0 @ R).T.to(rows.dtype)


def _pinv_rows(W: torch.Tensor) -> torch.Tensor:
    """W^T (W W^T)^{-1} for W (k, n) of full row rank; a tiny ridge keeps it finite otherwise."""
    gram = W @ W.T
    ridge = 1e-6 * torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
    return torch.linalg.solve(gram + ridge, W).T
