"""Simulate a population single-cell dataset from LIVI's own generative process.

The simulator draws donors with genotypes, plants genetic effects on the donor factors, and
then draws single-cell counts from the LIVI decoder (seed 001, eq. 2-3; DESIGN.md section 3)
with a negative-binomial likelihood. Every latent quantity is kept as the truth, so that a
fit can be scored against it.

Generative process (G genes, N_y donors, N cells, y(i) the donor of cell i)::

    genotypes     g_yk ~ Binomial(2, maf_k),  maf_k ~ Uniform(maf_min, maf_max)
    donor factors d_j = standardise( sum_s sqrt(h2_D / m) * std(g_s) + sqrt(1 - h2_D) * e_j )
                  (s over the m causal SNPs of factor j, e_j ~ N(0, I)); likewise v_j with h2_V
    cell state    c_i = mu_{type(i)} + eps_i                      (K_C)
    interaction   z_i = (softmax(c_i) @ A) * d_{y(i)}             (K_DxC; eq. 2)
    logits        l_i = b + softmax(c_i) @ W_C + z_i @ W_DxC + v_{y(i)} @ W_V   (G)
    mean          mu_i = softmax(l_i) * L_i,   L_i ~ LogNormal(log median_library, library_sigma)
    counts        x_ig ~ NB(mean mu_ig, inverse dispersion theta_g)
                  (Gamma-Poisson: lambda ~ Gamma(theta_g, mu_ig / theta_g), x ~ Poisson(lambda);
                  variance mu + mu^2 / theta)

An optional protein modality uses the same c, z and v with its own loadings, baseline,
dispersions and library size.

Randomness: one integer seed feeds :class:`numpy.random.SeedSequence`, which is split into one
independent stream per component (genotypes, genetics, cells, loadings, counts, proteins).
Hence the same seed always gives the same data, and switching the protein modality on or off
leaves the genotypes, the donor factors and the RNA counts unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyro_livi.errors import InputError
from pyro_livi.outputs import refuse_earlier_outputs, remove_outputs

#: Number of cells whose counts are drawn at once (bounds memory; fixed so that results do not
#: depend on it).
_CHUNK_CELLS = 4096

#: Names of the independent random streams split off the seed, in a fixed order.
_STREAMS = ("genotypes", "genetics", "cells", "loadings", "counts", "proteins")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass
class SimulationConfig:
    """Every parameter of the simulator, with its unit.

    Population and genetics
        n_donors: number of donors N_y (ignored when real genotypes are given: their rows).
        n_snps: number of simulated SNPs (ignored when real genotypes are given).
        maf_min, maf_max: the allele frequency of each simulated SNP is Uniform(maf_min, maf_max);
            with maf_max <= 0.5 the counted allele a1 is the minor allele.
        causal_maf_min: a SNP can be causal only if its sample minor allele frequency is at
            least this (avoids near-monomorphic causal SNPs with few donors).
        h2_d: fraction of each D factor's variance explained by its causal SNP(s), in [0, 1];
            0 plants no effect on D.
        h2_v: the same for each V factor.
        n_causal_per_factor: causal SNPs per factor (m); each explains h2 / m. All causal SNPs,
            over all factors, are distinct.

    Latent dimensions
        k_c: cell-state dimension K_C.
        k_dxc: number of donor x cell-state factors K_DxC (columns of D and of A).
        k_v: number of persistent donor factors K_V.

    Cells
        cells_per_donor: mean number of cells per donor.
        vary_cells_per_donor: True draws each donor's cell count from Poisson(cells_per_donor)
            (at least 1); False gives every donor round(cells_per_donor) cells.
        n_cell_types: number of cell types T (T <= k_c); type t is cell-state dimension t.
        cell_type_proportions: probabilities of the T types (None: equal).
        state_strength: centroid of type t has this value on dimension t, 0 elsewhere.
        centroid_jitter: sd of fixed random offsets added to every centroid entry.
        sigma_c: sd of the within-type cell-state noise on dimensions 0..T-1.
        sigma_c_continuous: sd of the cell-state noise on dimensions T..K_C-1 (within-type
            continuous variation).

    RNA decoder and counts
        n_genes: number of genes G.
        frac_genes_c, frac_genes_dxc, frac_genes_v: fraction of genes each factor of W_C,
            W_DxC, W_V loads on (at least one gene); other loadings are exactly 0.
        loading_scale_c, loading_scale_dxc, loading_scale_v: sd of the non-zero loadings
            (natural-log scale of the gene's mean per unit of the factor input).
        baseline_sd: sd of the per-gene baseline log expression b_g ~ N(0, baseline_sd^2).
        median_library: median library size (total expected counts per cell).
        library_sigma: sd of log library size (LogNormal).
        theta_median, theta_sigma: theta_g ~ LogNormal(log theta_median, theta_sigma); theta is
            the NB inverse dispersion (variance = mu + mu^2 / theta).

    Protein modality (off when n_proteins == 0)
        n_proteins: number of proteins P.
        frac_prot_c: fraction of proteins each cell-state factor loads on.
        frac_prot_donor: fraction of proteins each D or V factor loads on.
        loading_scale_prot_c: sd of the non-zero cell-state protein loadings.
        loading_scale_prot_donor: sd of the non-zero donor-factor protein loadings (smaller
            than for RNA: donor effects are weaker on proteins).
        median_library_prot: median protein library size.
    """

    n_donors: int = 120
    n_snps: int = 2000
    maf_min: float = 0.1
    maf_max: float = 0.5
    causal_maf_min: float = 0.05
    h2_d: float = 0.3
    h2_v: float = 0.3
    n_causal_per_factor: int = 1

    k_c: int = 8
    k_dxc: int = 4
    k_v: int = 2

    cells_per_donor: float = 40.0
    vary_cells_per_donor: bool = True
    n_cell_types: int = 4
    cell_type_proportions: tuple[float, ...] | None = None
    state_strength: float = 3.0
    centroid_jitter: float = 0.3
    sigma_c: float = 0.5
    sigma_c_continuous: float = 1.0

    n_genes: int = 500
    frac_genes_c: float = 0.2
    frac_genes_dxc: float = 0.1
    frac_genes_v: float = 0.1
    loading_scale_c: float = 2.0
    loading_scale_dxc: float = 1.0
    loading_scale_v: float = 1.0
    baseline_sd: float = 1.0
    median_library: float = 3000.0
    library_sigma: float = 0.3
    theta_median: float = 10.0
    theta_sigma: float = 0.5

    n_proteins: int = 0
    frac_prot_c: float = 0.5
    frac_prot_donor: float = 0.2
    loading_scale_prot_c: float = 2.0
    loading_scale_prot_donor: float = 0.5
    median_library_prot: float = 2000.0

    @classmethod
    def demo(cls) -> "SimulationConfig":
        """The built-in dataset of the demo job.

        120 donors x ~40 cells (about 4,800 cells), 500 genes, 2,000 SNPs, K_C 8 with 4 cell
        types, 4 planted D x C factors and 2 planted V factors (h2 0.3 each). At this size a
        LIVI fit on 2 CPU cores takes a few minutes, and a factor that recovers d_j well is
        detectable (expected chi2 about N_y * h2 = 36, p ~ 1e-9, beyond a Bonferroni threshold
        over 6 x 2000 tests).
        """
        return cls(n_donors=120, cells_per_donor=40.0, n_genes=500, n_snps=2000,
                   k_c=8, k_dxc=4, k_v=2, n_cell_types=4, h2_d=0.3, h2_v=0.3)

    @classmethod
    def quick(cls) -> "SimulationConfig":
        """A smaller population for a first look (``pyro-livi demo --quick``).

        80 donors x ~25 cells (about 2,000 cells), 200 genes, 500 SNPs, K_C 4 with 3 cell
        types, 2 planted D x C factors and 1 planted V factor with h2 0.5 each (expected chi2
        about N_y * h2 = 40 for a well recovered factor, beyond a Bonferroni threshold over
        3 x 500 tests).
        """
        return cls(n_donors=80, cells_per_donor=25.0, n_genes=200, n_snps=500,
                   k_c=4, k_dxc=2, k_v=1, n_cell_types=3, h2_d=0.5, h2_v=0.5)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields."""
        out = dataclasses.asdict(self)
        if out["cell_type_proportions"] is not None:
            out["cell_type_proportions"] = [float(p) for p in out["cell_type_proportions"]]
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "SimulationConfig":
        """Build a config from a dict of fields; unknown names are an :class:`InputError`.

        Also accepts the ``config.json`` written by :func:`write_simulation` (fields under
        the key ``"config"``).
        """
        if "config" in values and isinstance(values["config"], dict):
            values = values["config"]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InputError(source, unknown[0], "is not a SimulationConfig field",
                             f"use only these names: {', '.join(sorted(names))}")
        values = dict(values)
        if values.get("cell_type_proportions") is not None:
            values["cell_type_proportions"] = tuple(values["cell_type_proportions"])
        return cls(**values)

    def validate(self, n_donors: int | None = None, n_snps: int | None = None, *,
                 streamed: bool = False) -> None:
        """Raise :class:`InputError` naming the first invalid field.

        n_donors, n_snps: the actual numbers (they differ from the fields with real genotypes).
        streamed: check the config for the block-by-block writers (:func:`write_simulation_streaming`,
            :func:`write_h5ad_streaming`), which write RNA only: ``n_proteins`` must be 0.
        """
        src = "SimulationConfig"
        n_donors = self.n_donors if n_donors is None else n_donors
        n_snps = self.n_snps if n_snps is None else n_snps

        def need(ok: bool, name: str, problem: str, fix: str) -> None:
            if not ok:
                raise InputError(src, name, problem, fix)

        need(not (streamed and self.n_proteins), "n_proteins",
             f"is {self.n_proteins}; only RNA is written in blocks (--stream)",
             "use n_proteins=0 (--n-proteins 0), or simulate() / pyro-livi simulate without --stream "
             "for proteins")

        for name in ("n_genes", "k_c", "n_cell_types", "n_causal_per_factor"):
            need(int(getattr(self, name)) >= 1, name, f"is {getattr(self, name)}", "use >= 1")
        for name in ("k_dxc", "k_v", "n_proteins"):
            need(int(getattr(self, name)) >= 0, name, f"is {getattr(self, name)}", "use >= 0")
        need(n_donors >= 1, "n_donors", f"is {n_donors}", "use >= 1")
        need(n_snps >= 0, "n_snps", f"is {n_snps}", "use >= 0")
        need(self.cells_per_donor > 0, "cells_per_donor", f"is {self.cells_per_donor}",
             "use a positive mean number of cells")
        need(0.0 < self.maf_min <= self.maf_max <= 0.5, "maf_min/maf_max",
             f"({self.maf_min}, {self.maf_max}) is not 0 < maf_min <= maf_max <= 0.5",
             "choose frequencies of the minor allele")
        for name in ("h2_d", "h2_v"):
            h = getattr(self, name)
            need(0.0 <= h <= 1.0, name, f"is {h}", "use a variance fraction in [0, 1]")
        need(self.n_cell_types <= self.k_c, "n_cell_types",
             f"{self.n_cell_types} types but k_c = {self.k_c}",
             "each cell type needs its own cell-state dimension: use n_cell_types <= k_c")
        if self.cell_type_proportions is not None:
            p = np.asarray(self.cell_type_proportions, dtype=float)
            need(p.shape == (self.n_cell_types,) and np.all(p >= 0) and p.sum() > 0,
                 "cell_type_proportions", f"{list(p)} is not {self.n_cell_types} non-negative "
                 "numbers with a positive sum", "give one weight per cell type, or None")
        for name in ("frac_genes_c", "frac_genes_dxc", "frac_genes_v", "frac_prot_c",
                     "frac_prot_donor"):
            f = getattr(self, name)
            need(0.0 < f <= 1.0, name, f"is {f}", "use a fraction in (0, 1]")
        for name in ("state_strength", "centroid_jitter", "sigma_c", "sigma_c_continuous",
                     "loading_scale_c", "loading_scale_dxc", "loading_scale_v", "baseline_sd",
                     "library_sigma", "theta_sigma", "loading_scale_prot_c",
                     "loading_scale_prot_donor"):
            need(getattr(self, name) >= 0, name, f"is {getattr(self, name)}", "use >= 0")
        for name in ("median_library", "theta_median", "median_library_prot"):
            need(getattr(self, name) > 0, name, f"is {getattr(self, name)}", "use > 0")
        n_factors = self.k_dxc + self.k_v
        need(n_donors >= 2 or n_factors == 0, "n_donors",
             f"{n_donors} donor cannot give standardised donor factors",
             "use >= 2 donors, or k_dxc = k_v = 0")
        n_causal = self.n_causal_per_factor * (self.k_dxc * (self.h2_d > 0)
                                               + self.k_v * (self.h2_v > 0))
        need(n_causal <= n_snps, "n_snps",
             f"{n_snps} SNPs cannot hold {n_causal} distinct causal SNPs",
             "add SNPs, or lower k_dxc, k_v or n_causal_per_factor")


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------


@dataclass
class SimulatedData:
    """A simulated dataset and its truth.

    adata: the RNA modality (N cells x G genes); counts as an int32 CSR matrix in ``.X`` and in
        layer ``"counts"``; obs ``donor``, ``cell_type``, ``true_library``. With proteins it is
        the same object as ``mdata["rna"]``.
    mdata: MuData with modalities ``rna`` and ``prot`` when ``config.n_proteins > 0``, else None.
    genotypes: (N_y, n_snps) allele dosages = counts of allele a1 (int8 when simulated; the
        given array, copied, when real genotypes are passed).
    donors: N_y donor ids, the row order of ``genotypes``, ``truth["D"]`` and ``truth["V"]``.
    snps: one row per SNP: snp, chrom, pos, a1 (counted allele), a2, maf.
    truth: the generating quantities (see :func:`simulate`).
    config: the configuration used.
    seed: the seed used.
    """

    adata: Any
    mdata: Any
    genotypes: np.ndarray
    donors: list[str]
    snps: pd.DataFrame
    truth: dict[str, Any]
    config: SimulationConfig
    seed: int = 0

    @property
    def expression(self):
        """The MuData when there are proteins, else the RNA AnnData."""
        return self.mdata if self.mdata is not None else self.adata


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------


def _names(prefix: str, n: int, width: int, start: int = 0, stop: int | None = None) -> list[str]:
    """Names ``start..stop-1`` (default all) of ``n``: ``prefix`` + zero-padded index, at least
    ``width`` digits and as many as the largest index ``n - 1`` needs."""
    w = max(width, len(str(max(n - 1, 0))))
    return [f"{prefix}{i:0{w}d}" for i in range(start, n if stop is None else stop)]


def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, numerically stable."""
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _standardise(x: np.ndarray) -> np.ndarray:
    """Columns to mean 0 and variance 1 (ddof 0). x: (n, k)."""
    return (x - x.mean(axis=0)) / x.std(axis=0)


def _sparse_loadings(rng: np.random.Generator, k: int, g: int, frac: float,
                     scale: float) -> np.ndarray:
    """(k, g) matrix; each row has max(1, round(frac * g)) entries N(0, scale^2), zeros else."""
    w = np.zeros((k, g))
    n_on = max(1, int(round(frac * g)))
    for j in range(k):
        idx = rng.choice(g, size=n_on, replace=False)
        w[j, idx] = rng.normal(0.0, scale, size=n_on)
    return w


def _default_snp_table(n_snps: int) -> pd.DataFrame:
    """Deterministic layout: contiguous blocks on chromosomes 1..22, 10 kb apart."""
    k = np.arange(n_snps)
    chrom = 1 + (k * 22) // max(n_snps, 1)
    pos = np.zeros(n_snps, dtype=np.int64)
    for c in np.unique(chrom):
        on = chrom == c
        pos[on] = 10_000 * (1 + np.arange(on.sum()))
    return pd.DataFrame({"snp": _names("snp_", n_snps, 5), "chrom": chrom.astype(np.int64),
                         "pos": pos, "a1": "A", "a2": "G"})


def _sample_maf(genotypes: np.ndarray) -> np.ndarray:
    """Folded sample allele frequency per SNP (missing values ignored). (n_snps,)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        f = np.nanmean(genotypes, axis=0) / 2.0
    f = np.nan_to_num(f, nan=0.0)
    return np.minimum(f, 1.0 - f)


def _check_genotypes(genotypes, donors, snps) -> tuple[np.ndarray, list[str], pd.DataFrame | None]:
    """Validate given genotypes, donor ids and optional SNP table."""
    src = "simulate(genotypes=...)"
    g = np.array(genotypes, copy=True)
    if g.ndim != 2:
        raise InputError(src, "genotypes", f"has shape {g.shape}",
                         "pass a (n_donors, n_snps) array of allele dosages")
    if not np.issubdtype(g.dtype, np.number):
        raise InputError(src, "genotypes", f"has dtype {g.dtype}", "pass numeric dosages")
    finite = g[np.isfinite(g)] if np.issubdtype(g.dtype, np.floating) else g
    if finite.size and (finite.min() < 0 or finite.max() > 2):
        raise InputError(src, "genotypes", "has dosages outside [0, 2]",
                         "pass allele dosages 0..2 (NaN for missing)")
    if donors is None:
        donors = _names("donor_", g.shape[0], 3)
    donors = [str(d) for d in donors]
    if len(donors) != g.shape[0]:
        raise InputError(src, "donors", f"has {len(donors)} ids for {g.shape[0]} genotype rows",
                         "give one donor id per genotype row, in row order")
    if len(set(donors)) != len(donors):
        raise InputError(src, "donors", "has duplicate ids", "make the donor ids unique")
    if snps is not None:
        snps = pd.DataFrame(snps).reset_index(drop=True)
        if len(snps) != g.shape[1] or "snp" not in snps.columns:
            raise InputError(src, "snps", f"has {len(snps)} rows / columns {list(snps.columns)}",
                             f"give {g.shape[1]} rows with at least a 'snp' column")
    return g, donors, snps


def _plant(rng: np.random.Generator, genotypes: np.ndarray, causal: np.ndarray, h2: float,
           prefix: str) -> tuple[np.ndarray, list[dict]]:
    """Donor factors with planted genetic effects.

    genotypes: (N_y, n_snps) dosages (NaN allowed; mean-imputed here).
    causal: (k, m) SNP indices, m per factor (k = 0 allowed; m = 0 when h2 = 0).
    Returns F (N_y, k), standardised columns, and effect rows. beta is the exact linear
    coefficient of F[:, j] on the dosage of its SNP s (F_j = sum_s beta_s (g_s - mean g_s) +
    residual); beta_std = beta * sd(g_s) is the effect per genotype sd.
    """
    n, k = genotypes.shape[0], causal.shape[0]
    m = causal.shape[1]
    noise = rng.normal(size=(n, k))
    raw = math.sqrt(1.0 - h2) * noise
    rows = []
    per_snp = []
    for j in range(k):
        for s in causal[j]:
            g = genotypes[:, s].astype(float)
            g = np.where(np.isfinite(g), g, np.nanmean(g))
            sd = g.std()
            raw[:, j] += math.sqrt(h2 / m) * (g - g.mean()) / sd
            per_snp.append((j, int(s), sd))
    scale = raw.std(axis=0)
    factors = (raw - raw.mean(axis=0)) / scale
    for j, s, sd in per_snp:
        b_std = math.sqrt(h2 / m) / scale[j]
        rows.append({"factor": f"{prefix}_{j}", "kind": prefix, "snp_index": s,
                     "beta": b_std / sd, "beta_std": b_std, "h2": h2 / m})
    return factors, rows


def _gamma_poisson(rng: np.random.Generator, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """NB counts with mean mu (n, g) and inverse dispersion theta (g,): Gamma-Poisson."""
    lam = rng.gamma(shape=np.broadcast_to(theta, mu.shape), scale=mu / theta)
    return rng.poisson(lam)


def _draw_counts(rng: np.random.Generator, base: np.ndarray, probs: np.ndarray,
                 z: np.ndarray, v: np.ndarray, w_c: np.ndarray, w_dxc: np.ndarray,
                 w_v: np.ndarray, library: np.ndarray, theta: np.ndarray) -> sp.csr_matrix:
    """Counts (N, F) as int32 CSR, drawn in fixed chunks of cells.

    base (F,), probs = softmax(c) (N, K_C), z (N, K_DxC), v per cell (N, K_V), loadings
    (K, F), library (N,), theta (F,).
    """
    blocks = []
    for start in range(0, probs.shape[0], _CHUNK_CELLS):
        sl = slice(start, start + _CHUNK_CELLS)
        logits = base + probs[sl] @ w_c + z[sl] @ w_dxc + v[sl] @ w_v
        mu = _softmax(logits) * library[sl, None]
        blocks.append(sp.csr_matrix(_gamma_poisson(rng, mu, theta).astype(np.int32)))
    if not blocks:
        return sp.csr_matrix((0, base.shape[0]), dtype=np.int32)
    return sp.vstack(blocks, format="csr").astype(np.int32)


def _streams(seed: int) -> dict[str, np.random.Generator]:
    """One independent generator per component (:data:`_STREAMS`), split off ``seed``."""
    return dict(zip(_STREAMS, (np.random.default_rng(s) for s in
                               np.random.SeedSequence(int(seed)).spawn(len(_STREAMS)))))


def _genetics(cfg: SimulationConfig, streams: dict, genotypes, donors, snps):
    """Genotypes (simulated, or the given ones checked) and donor factors with planted effects.

    Returns ``(genotypes, donors, snp_table, D, V, effects)`` as described in :func:`simulate`;
    draws from the ``genotypes`` and ``genetics`` streams only.
    """
    # --- genotypes -------------------------------------------------------------------------
    if genotypes is not None:
        geno, donors, snp_table = _check_genotypes(genotypes, donors, snps)
        cfg.validate(n_donors=geno.shape[0], n_snps=geno.shape[1])
        layout = _default_snp_table(geno.shape[1])
        if snp_table is None:
            snp_table = layout
        for col in ("chrom", "pos", "a1", "a2"):
            if col not in snp_table.columns:
                snp_table[col] = layout[col].to_numpy()
        snp_table = snp_table[["snp", "chrom", "pos", "a1", "a2"]].copy()
        snp_table["maf"] = _sample_maf(geno)
    else:
        if donors is not None or snps is not None:
            raise InputError("simulate()", "donors" if donors is not None else "snps",
                             "was given without genotypes", "pass genotypes too, or neither")
        cfg.validate()
        rng = streams["genotypes"]
        maf = rng.uniform(cfg.maf_min, cfg.maf_max, size=cfg.n_snps)
        geno = rng.binomial(2, maf, size=(cfg.n_donors, cfg.n_snps)).astype(np.int8)
        donors = _names("donor_", cfg.n_donors, 3)
        snp_table = _default_snp_table(cfg.n_snps)
        snp_table["maf"] = maf

    # --- planted genetics ------------------------------------------------------------------
    rng = streams["genetics"]
    m = cfg.n_causal_per_factor
    k_d_causal = cfg.k_dxc if cfg.h2_d > 0 else 0
    k_v_causal = cfg.k_v if cfg.h2_v > 0 else 0
    eligible = np.flatnonzero(_sample_maf(geno) >= cfg.causal_maf_min)
    n_needed = m * (k_d_causal + k_v_causal)
    if n_needed > eligible.size:
        raise InputError("simulate()", "causal_maf_min",
                         f"only {eligible.size} SNPs have sample MAF >= {cfg.causal_maf_min}, "
                         f"{n_needed} causal SNPs are needed",
                         "add SNPs or donors, lower causal_maf_min, or plant fewer factors")
    chosen = rng.choice(eligible, size=n_needed, replace=False)
    causal_d = chosen[: m * k_d_causal].reshape(k_d_causal, m)
    causal_v = chosen[m * k_d_causal:].reshape(k_v_causal, m)
    if cfg.h2_d == 0:
        causal_d = np.zeros((cfg.k_dxc, 0), dtype=int)
    if cfg.h2_v == 0:
        causal_v = np.zeros((cfg.k_v, 0), dtype=int)
    D, rows_d = _plant(rng, geno, causal_d, cfg.h2_d, "D")
    V, rows_v = _plant(rng, geno, causal_v, cfg.h2_v, "V")
    effects = pd.DataFrame(rows_d + rows_v,
                           columns=["factor", "kind", "snp_index", "beta", "beta_std", "h2"])
    idx = effects["snp_index"].to_numpy(dtype=int)
    effects.insert(2, "snp", snp_table["snp"].to_numpy()[idx])
    effects.insert(3, "chrom", snp_table["chrom"].to_numpy()[idx])
    effects.insert(4, "pos", snp_table["pos"].to_numpy()[idx])
    effects["maf"] = snp_table["maf"].to_numpy()[idx]
    effects = effects[["factor", "kind", "snp", "chrom", "pos", "beta", "beta_std", "maf", "h2",
                       "snp_index"]]
    return geno, donors, snp_table, D, V, effects


def _rna_loadings(cfg: SimulationConfig, rng: np.random.Generator):
    """``(b, W_C, W_DxC, W_V, theta)`` of the RNA decoder, drawn from ``rng`` (the loadings stream)."""
    G = cfg.n_genes
    b = rng.normal(0.0, cfg.baseline_sd, size=G)
    W_C = _sparse_loadings(rng, cfg.k_c, G, cfg.frac_genes_c, cfg.loading_scale_c)
    W_DxC = _sparse_loadings(rng, cfg.k_dxc, G, cfg.frac_genes_dxc, cfg.loading_scale_dxc)
    W_V = _sparse_loadings(rng, cfg.k_v, G, cfg.frac_genes_v, cfg.loading_scale_v)
    theta = np.exp(np.log(cfg.theta_median) + cfg.theta_sigma * rng.normal(size=G))
    return b, W_C, W_DxC, W_V, theta


def _anndata(counts: sp.csr_matrix, obs: pd.DataFrame, var_names: list[str],
             library: np.ndarray):
    import anndata as ad

    obs = obs.copy()
    obs["true_library"] = library
    a = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pd.Index(var_names)))
    a.layers["counts"] = counts.copy()
    return a


# --------------------------------------------------------------------------------------------
# simulate
# --------------------------------------------------------------------------------------------
def _cells_per_donor(cfg: SimulationConfig, rng: np.random.Generator, n_donors: int) -> np.ndarray:
    """Cells of each donor (n_donors,): Poisson(cells_per_donor), at least 1, with
    ``vary_cells_per_donor``; else cells_per_donor rounded, at least 1."""
    if cfg.vary_cells_per_donor:
        return np.maximum(1, rng.poisson(cfg.cells_per_donor, size=n_donors))
    return np.full(n_donors, max(1, int(round(cfg.cells_per_donor))))


def simulate(config: SimulationConfig | None = None, *, seed: int = 0,
             genotypes: np.ndarray | None = None, donors: list[str] | None = None,
             snps: pd.DataFrame | None = None) -> SimulatedData:
    """Draw a dataset from LIVI's generative process with planted genetic effects.

    config: the parameters (default :class:`SimulationConfig()`, the demo size).
    seed: the only source of randomness.
    genotypes: optional real (N_y, n_snps) allele dosages in [0, 2] (NaN = missing), used as
        they are; then N_y and n_snps come from it, not from config. Missing values are
        mean-imputed only when building the genetic score of a causal SNP.
    donors: ids of the genotype rows (default ``donor_000``...).
    snps: optional SNP table for real genotypes (column ``snp``; ``chrom``, ``pos``, ``a1``,
        ``a2`` used when present, else the deterministic layout of simulated SNPs).

    truth keys (N cells, G genes, P proteins):
        A (K_C, K_DxC) one-hot: factor j acts in cell-state dimension j mod n_cell_types;
        D (N_y, K_DxC), V (N_y, K_V): donor factors, standardised columns;
        W_C (K_C, G), W_DxC (K_DxC, G), W_V (K_V, G): loadings; b (G,) baseline log expression;
        theta (G,) inverse dispersions; c (N, K_C) cell states; centroids (T, K_C);
        library (N,) library sizes; effects: DataFrame factor, kind (D|V), snp, chrom, pos,
        beta (per allele dosage of a1), beta_std (per genotype sd), maf, h2;
        with proteins also W_C_prot, W_DxC_prot, W_V_prot, b_prot, theta_prot, library_prot.
    """
    cfg = config if config is not None else SimulationConfig()
    streams = _streams(seed)

    geno, donors, snp_table, D, V, effects = _genetics(cfg, streams, genotypes, donors, snps)
    n_donors = geno.shape[0]

    # --- cells -----------------------------------------------------------------------------
    rng = streams["cells"]
    n_types = cfg.n_cell_types
    n_cells_y = _cells_per_donor(cfg, rng, n_donors)
    donor_of_cell = np.repeat(np.arange(n_donors), n_cells_y)
    n_cells = donor_of_cell.size
    props = (np.full(n_types, 1.0 / n_types) if cfg.cell_type_proportions is None
             else np.asarray(cfg.cell_type_proportions, float))
    props = props / props.sum()
    type_of_cell = rng.choice(n_types, size=n_cells, p=props)
    centroids = rng.normal(0.0, cfg.centroid_jitter, size=(n_types, cfg.k_c)) \
        if cfg.centroid_jitter > 0 else np.zeros((n_types, cfg.k_c))
    centroids[np.arange(n_types), np.arange(n_types)] += cfg.state_strength
    noise_sd = np.where(np.arange(cfg.k_c) < n_types, cfg.sigma_c, cfg.sigma_c_continuous)
    c = centroids[type_of_cell] + rng.normal(size=(n_cells, cfg.k_c)) * noise_sd
    library = np.exp(np.log(cfg.median_library)
                     + cfg.library_sigma * rng.normal(size=n_cells))

    A = np.zeros((cfg.k_c, cfg.k_dxc))
    A[np.arange(cfg.k_dxc) % n_types, np.arange(cfg.k_dxc)] = 1.0
    probs = _softmax(c)
    z = (probs @ A) * D[donor_of_cell]                      # eq. 2
    v_cell = V[donor_of_cell]

    # --- RNA loadings and counts -----------------------------------------------------------
    G = cfg.n_genes
    b, W_C, W_DxC, W_V, theta = _rna_loadings(cfg, streams["loadings"])
    counts = _draw_counts(streams["counts"], b, probs, z, v_cell, W_C, W_DxC, W_V, library,
                          theta)

    type_names = [f"type_{t}" for t in range(n_types)]
    obs = pd.DataFrame(
        {"donor": pd.Categorical(np.asarray(donors)[donor_of_cell], categories=donors),
         "cell_type": pd.Categorical(np.asarray(type_names)[type_of_cell],
                                     categories=type_names)},
        index=pd.Index(_names("cell_", n_cells, 5)))
    adata = _anndata(counts, obs, _names("gene_", G, 4), library)
    adata.uns["simulation"] = {"seed": int(seed), "config": json.dumps(cfg.to_dict())}

    truth: dict[str, Any] = {
        "A": A, "D": D, "V": V, "W_C": W_C, "W_DxC": W_DxC, "W_V": W_V, "b": b,
        "theta": theta, "c": c, "centroids": centroids, "library": library, "effects": effects,
    }

    # --- proteins --------------------------------------------------------------------------
    mdata = None
    if cfg.n_proteins > 0:
        import mudata as md

        rng = streams["proteins"]
        P = cfg.n_proteins
        b_p = rng.normal(0.0, cfg.baseline_sd, size=P)
        W_C_p = _sparse_loadings(rng, cfg.k_c, P, cfg.frac_prot_c, cfg.loading_scale_prot_c)
        W_DxC_p = _sparse_loadings(rng, cfg.k_dxc, P, cfg.frac_prot_donor,
                                   cfg.loading_scale_prot_donor)
        W_V_p = _sparse_loadings(rng, cfg.k_v, P, cfg.frac_prot_donor,
                                 cfg.loading_scale_prot_donor)
        theta_p = np.exp(np.log(cfg.theta_median) + cfg.theta_sigma * rng.normal(size=P))
        library_p = np.exp(np.log(cfg.median_library_prot)
                           + cfg.library_sigma * rng.normal(size=n_cells))
        counts_p = _draw_counts(rng, b_p, probs, z, v_cell, W_C_p, W_DxC_p, W_V_p, library_p,
                                theta_p)
        prot = _anndata(counts_p, obs, _names("prot_", P, 2), library_p)
        with md.set_options(pull_on_update=False):
            mdata = md.MuData({"rna": adata, "prot": prot})
        mdata.obs["donor"] = obs["donor"].to_numpy()
        mdata.obs["cell_type"] = obs["cell_type"].to_numpy()
        mdata.uns["simulation"] = dict(adata.uns["simulation"])
        adata = mdata.mod["rna"]
        truth.update({"W_C_prot": W_C_p, "W_DxC_prot": W_DxC_p, "W_V_prot": W_V_p,
                      "b_prot": b_p, "theta_prot": theta_p, "library_prot": library_p})

    return SimulatedData(adata=adata, mdata=mdata, genotypes=geno, donors=list(donors),
                         snps=snp_table.reset_index(drop=True), truth=truth, config=cfg,
                         seed=int(seed))


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


#: Files a simulation writes at the top of its folder, over every mode: ``expression.h5ad`` (RNA
#: only; also with ``--stream``) or ``expression.h5mu`` (with proteins), the PLINK genotypes, and
#: ``multiome.h5mu`` of ``--mode multiome`` (:func:`pyro_livi.simulate_multiome.write_multiome`).
SIMULATION_FILES = ("expression.h5ad", "expression.h5mu", "multiome.h5mu",
                    "genotypes.bed", "genotypes.bim", "genotypes.fam")

#: Files a simulation writes in its ``truth/`` folder, over every mode: the population truth of
#: :func:`write_simulation` and :func:`write_simulation_streaming` (with the protein tables) and
#: that of ``--mode multiome`` (links, cell types, genes, peaks).
TRUTH_FILES = ("effects.tsv", "D.tsv", "V.tsv", "A.tsv", "W_C.tsv", "W_DxC.tsv", "W_V.tsv",
               "genes.tsv", "cell_state.tsv", "W_C_prot.tsv", "W_DxC_prot.tsv", "W_V_prot.tsv",
               "proteins.tsv", "links.tsv", "cell_types.tsv", "peaks.tsv", "config.json", "README.md")


def simulation_outputs(out_dir) -> list[Path]:
    """The files in ``out_dir`` that a simulation writes (:data:`SIMULATION_FILES` at the top,
    :data:`TRUTH_FILES` under ``truth/``), in that order; [] when ``out_dir`` is absent. Other
    files (your notes, a fit's run folder) are never listed."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    names = list(SIMULATION_FILES) + [f"truth/{name}" for name in TRUTH_FILES]
    return [out / name for name in names if (out / name).is_file()]


def prepare_simulation_dir(out_dir, *, overwrite: bool = False) -> Path:
    """Make ``out_dir`` ready for a simulation, or refuse when that would clobber another one.

    The rule of ``pyro-livi simulate`` (all modes: population, ``--stream``, ``--mode
    multiome``); the writers themselves (:func:`write_simulation`,
    :func:`write_simulation_streaming`, :func:`pyro_livi.simulate_multiome.write_multiome`)
    replace files of their own names without asking, so call this first.

    - ``out_dir`` absent, empty, or without simulation outputs (:func:`simulation_outputs`):
      used as is (created by the writer).
    - it holds any, and not ``overwrite``: :class:`InputError` naming the folder, the files and
      the fix (``--overwrite`` / ``overwrite=True``, or another ``--out``).
    - ``overwrite``: those files (only those) are removed, so that no output of an earlier
      simulation with other options (say ``expression.h5mu`` of a run with proteins beside the
      ``expression.h5ad`` of an RNA-only run) lingers; ``truth/`` is removed when that leaves it
      empty. Nothing else in the folder is touched.

    Returns ``Path(out_dir)``. Raises InputError when ``out_dir`` exists and is not a folder.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "--out", "exists and is not a folder", "give a folder for the simulation (--out)")
    old = simulation_outputs(out)
    if not overwrite:
        refuse_earlier_outputs(out, old, "the folder already holds the files of a simulation",
                               "add --overwrite (prepare_simulation_dir(out, overwrite=True) in Python) to "
                               "replace them (it removes only the files the simulator writes), or choose "
                               "another --out")
    remove_outputs(out, old)
    return out


def _bed_values(genotypes: np.ndarray) -> np.ndarray:
    """Genotypes as PLINK hard calls: int8 0/1/2 (-127 missing) or float32 with NaN."""
    g = np.asarray(genotypes)
    if np.issubdtype(g.dtype, np.integer):
        return g.astype(np.int8)
    g = g.astype(np.float64)
    finite = np.isfinite(g)
    if not np.all(g[finite] == np.round(g[finite])):
        warnings.warn("genotypes hold non-integer dosages; genotypes.bed stores them rounded "
                      "to hard calls 0/1/2 (the planted effects used the exact dosages)",
                      stacklevel=4)
        g = np.where(finite, np.round(g), np.nan)
    return g.astype(np.float32)


def _write_population(out: Path, cfg: SimulationConfig, truth: dict[str, Any], genotypes: np.ndarray,
                      donors: list[str], snps: pd.DataFrame, genes: list[str],
                      proteins: list[str] | None = None) -> tuple[dict[str, Path], int]:
    """Write the genotypes (``out/genotypes.bed/.bim/.fam``) and the donor- and gene-level truth
    tables (``out/truth/<name>.tsv``: every table but ``cell_state``), the part that
    :func:`write_simulation` and :func:`write_simulation_streaming` share.

    truth: the keys of :attr:`SimulatedData.truth` but ``c``, ``library``, ``centroids`` (the
    ``*_prot`` ones with ``proteins``, the protein names). Returns the written paths by name
    and the number of planted effects.
    """
    from bed_reader import to_bed

    paths = {ext: out / f"genotypes.{ext}" for ext in ("bed", "bim", "fam")}
    to_bed(paths["bed"], _bed_values(genotypes), properties={
        "fid": list(donors), "iid": list(donors),
        "sid": snps["snp"].astype(str).tolist(),
        "chromosome": snps["chrom"].astype(str).tolist(),
        "bp_position": snps["pos"].astype(np.int64).tolist(),
        "allele_1": snps["a1"].astype(str).tolist(),
        "allele_2": snps["a2"].astype(str).tolist(),
    }, count_A1=True, num_threads=1)

    t = truth
    d_cols = [f"D_{j}" for j in range(cfg.k_dxc)]
    v_cols = [f"V_{j}" for j in range(cfg.k_v)]
    c_rows = [f"c_{k}" for k in range(cfg.k_c)]
    donor_index = pd.Index(list(donors), name="donor")
    tables = {
        "effects": t["effects"].drop(columns="snp_index"),
        "D": pd.DataFrame(t["D"], index=donor_index, columns=d_cols),
        "V": pd.DataFrame(t["V"], index=donor_index, columns=v_cols),
        "A": pd.DataFrame(t["A"], index=pd.Index(c_rows, name="cell_state"), columns=d_cols),
    }
    feature_sets = [("", genes, "genes", "gene")] + ([("_prot", proteins, "proteins", "protein")]
                                                    if proteins is not None else [])
    for suffix, names, table, index_name in feature_sets:
        for key, rows in (("W_C", c_rows), ("W_DxC", d_cols), ("W_V", v_cols)):
            tables[key + suffix] = pd.DataFrame(t[key + suffix], index=pd.Index(rows, name="factor"),
                                                columns=names)
        tables[table] = pd.DataFrame({"baseline": t["b" + suffix], "theta": t["theta" + suffix]},
                                     index=pd.Index(names, name=index_name))
    truth_dir = out / "truth"
    for name, frame in tables.items():
        paths[name] = truth_dir / f"{name}.tsv"
        frame.to_csv(paths[name], sep="\t", index=name != "effects")
    return paths, len(tables["effects"])


def _write_cell_state(path: Path, c: np.ndarray, start: int, n_cells: int) -> None:
    """Rows ``start..start+m-1`` of ``truth/cell_state.tsv``: the cell states ``c`` (m, K_C),
    index ``cell`` (the cell ids), columns ``c_k``. The first rows (``start == 0``) create the
    file with its header; later ones are appended, so the table can be written block by block."""
    cells = pd.Index(_names("cell_", n_cells, 5, start, start + c.shape[0]), name="cell")
    frame = pd.DataFrame(c, index=cells, columns=[f"c_{k}" for k in range(c.shape[1])])
    frame.to_csv(path, sep="\t", mode="w" if start == 0 else "a", header=start == 0)


def _write_summary(truth_dir: Path, cfg: SimulationConfig, seed: int, *, n_cells: int, n_donors: int,
                   n_snps: int, n_effects: int, streamed: bool) -> dict[str, Path]:
    """``truth/config.json`` (seed, sizes, ``"streamed": true`` when written block by block,
    every SimulationConfig field) and ``truth/README.md``; returns their paths (config, readme)."""
    summary = {"seed": int(seed), "n_donors": int(n_donors), "n_cells": int(n_cells),
               "n_genes": int(cfg.n_genes), "n_snps": int(n_snps), "n_proteins": int(cfg.n_proteins)}
    if streamed:
        summary["streamed"] = True
    summary["config"] = cfg.to_dict()
    paths = {"config": truth_dir / "config.json", "readme": truth_dir / "README.md"}
    paths["config"].write_text(json.dumps(summary, indent=2) + "\n")
    paths["readme"].write_text(_readme(cfg, int(seed), n_cells=n_cells, n_donors=n_donors, n_snps=n_snps,
                                       n_effects=n_effects))
    return paths


def write_simulation(sim: SimulatedData, out_dir) -> dict[str, Path]:
    """Write a simulation to ``out_dir``; return the written paths by name.

    Files:
        expression.h5ad (RNA only) or expression.h5mu (modalities rna, prot);
        genotypes.bed/.bim/.fam (PLINK 1; iid = fid = donor id; allele_1 = a1, the counted
        allele, so bed_reader's default ``open_bed(...).read()`` (count_A1=True) returns the
        simulated dosages);
        truth/effects.tsv, D.tsv, V.tsv, A.tsv, W_C.tsv, W_DxC.tsv, W_V.tsv, genes.tsv,
        cell_state.tsv, config.json, README.md (and the *_prot.tsv files with proteins).

    Files of these names in ``out_dir`` are replaced; nothing else is checked or removed, so the
    outputs of an earlier simulation with other options (``expression.h5mu`` of a run with
    proteins beside a new ``expression.h5ad``) stay. Call :func:`prepare_simulation_dir` first
    to refuse a folder that holds a simulation, or with ``overwrite=True`` to remove its files
    (what ``pyro-livi simulate`` does). :func:`write_simulation_streaming` writes the same
    files (RNA only) block by block.
    """
    out = Path(out_dir)
    truth_dir = out / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    cfg = sim.config
    paths: dict[str, Path] = {}

    if sim.mdata is not None:
        import mudata as md

        paths["expression"] = out / "expression.h5mu"
        with md.set_options(pull_on_update=False):
            sim.mdata.write(paths["expression"], compression="gzip")
    else:
        paths["expression"] = out / "expression.h5ad"
        sim.adata.write_h5ad(paths["expression"], compression="gzip")

    proteins = sim.mdata.mod["prot"].var_names.tolist() if sim.mdata is not None else None
    written, n_effects = _write_population(out, cfg, sim.truth, sim.genotypes, sim.donors, sim.snps,
                                           sim.adata.var_names.tolist(), proteins)
    paths.update(written)
    paths["cell_state"] = truth_dir / "cell_state.tsv"
    _write_cell_state(paths["cell_state"], sim.truth["c"], 0, int(sim.adata.n_obs))
    paths.update(_write_summary(truth_dir, cfg, sim.seed, n_cells=int(sim.adata.n_obs), n_donors=len(sim.donors),
                                n_snps=int(sim.genotypes.shape[1]), n_effects=n_effects, streamed=False))
    return paths


#: HDF5 chunk (values) of the count arrays written by :func:`write_h5ad_streaming`: 1 MiB of int32.
_H5_CHUNK_VALUES = 1 << 18


@dataclass
class _StreamPlan:
    """What :func:`simulate` draws before the cells, for the block-by-block writers: the genetics
    (from :func:`_genetics`), the RNA decoder, the cell counts per donor and the three copies of
    the cells stream that give each block its cell types, cell-state noise and library sizes."""

    cfg: SimulationConfig
    seed: int
    genotypes: np.ndarray
    donors: list[str]
    snps: pd.DataFrame
    truth: dict[str, Any]          # effects, D, V, A, W_C, W_DxC, W_V, b, theta
    first_cell: np.ndarray         # (n_donors + 1,) index of each donor's first cell, then n_cells
    props: np.ndarray              # (T,) cell-type probabilities
    centroids: np.ndarray          # (T, K_C)
    noise_sd: np.ndarray           # (K_C,)
    rngs: dict[str, np.random.Generator]  # type, state, library, counts

    @property
    def n_cells(self) -> int:
        return int(self.first_cell[-1])

    def blocks(self):
        """Yield ``(start, types, c, library, donor, counts)`` for each block of
        :data:`_CHUNK_CELLS` cells, in order: the values :func:`simulate` draws for cells
        ``start..start+m-1`` (types (m,) int, c (m, K_C), library (m,), donor (m,) donor index,
        counts int32 CSR (m, G) with int64 ``indptr``)."""
        cfg, t, r = self.cfg, self.truth, self.rngs
        n_types = cfg.n_cell_types
        for start in range(0, self.n_cells, _CHUNK_CELLS):
            m = min(_CHUNK_CELLS, self.n_cells - start)
            types = r["type"].choice(n_types, size=m, p=self.props)
            c = self.centroids[types] + r["state"].normal(size=(m, cfg.k_c)) * self.noise_sd
            library = np.exp(np.log(cfg.median_library) + cfg.library_sigma * r["library"].normal(size=m))
            donor = np.searchsorted(self.first_cell, np.arange(start, start + m), side="right") - 1
            probs = _softmax(c)
            z = (probs @ t["A"]) * t["D"][donor]
            logits = t["b"] + probs @ t["W_C"] + z @ t["W_DxC"] + t["V"][donor] @ t["W_V"]
            mu = _softmax(logits) * library[:, None]
            counts = sp.csr_matrix(_gamma_poisson(r["counts"], mu, t["theta"]).astype(np.int32))
            counts.indptr = counts.indptr.astype(np.int64)
            yield start, types, c, library, donor, counts


def _stream_plan(cfg: SimulationConfig, seed: int) -> _StreamPlan:
    """Draw what comes before the cells, consuming every random stream as :func:`simulate` does.

    The cells stream draws all cell types, then the centroids, then all cell-state noise, then
    all library sizes; three copies of that generator, advanced to where each part starts, give
    every block its values (the block size is fixed, :data:`_CHUNK_CELLS`).
    """
    import copy

    cfg.validate(streamed=True)
    streams = _streams(seed)
    geno, donors, snps, D, V, effects = _genetics(cfg, streams, None, None, None)
    rng = streams["cells"]
    n_types = cfg.n_cell_types
    n_cells_y = _cells_per_donor(cfg, rng, len(donors))
    first_cell = np.concatenate([[0], np.cumsum(n_cells_y)])
    n_cells = int(first_cell[-1])
    props = (np.full(n_types, 1.0 / n_types) if cfg.cell_type_proportions is None
             else np.asarray(cfg.cell_type_proportions, float))
    props = props / props.sum()
    sizes = [min(_CHUNK_CELLS, n_cells - s0) for s0 in range(0, n_cells, _CHUNK_CELLS)]
    rng_type = copy.deepcopy(rng)
    for m in sizes:  # advance past every cell's type, block by block, as drawn by the blocks
        rng.choice(n_types, size=m, p=props)
    centroids = rng.normal(0.0, cfg.centroid_jitter, size=(n_types, cfg.k_c)) \
        if cfg.centroid_jitter > 0 else np.zeros((n_types, cfg.k_c))
    centroids[np.arange(n_types), np.arange(n_types)] += cfg.state_strength
    noise_sd = np.where(np.arange(cfg.k_c) < n_types, cfg.sigma_c, cfg.sigma_c_continuous)
    rng_state = copy.deepcopy(rng)
    for m in sizes:  # advance past every cell's state noise
        rng.normal(size=(m, cfg.k_c))
    A = np.zeros((cfg.k_c, cfg.k_dxc))
    A[np.arange(cfg.k_dxc) % n_types, np.arange(cfg.k_dxc)] = 1.0
    b, W_C, W_DxC, W_V, theta = _rna_loadings(cfg, streams["loadings"])
    truth = {"effects": effects, "D": D, "V": V, "A": A, "W_C": W_C, "W_DxC": W_DxC, "W_V": W_V,
             "b": b, "theta": theta}
    return _StreamPlan(cfg=cfg, seed=int(seed), genotypes=geno, donors=list(donors), snps=snps, truth=truth,
                       first_cell=first_cell, props=props, centroids=centroids, noise_sd=noise_sd,
                       rngs={"type": rng_type, "state": rng_state, "library": rng, "counts": streams["counts"]})


def _write_streamed_h5ad(path: Path, plan: _StreamPlan, on_block=None) -> int:
    """Write the counts of ``plan`` to the ``.h5ad`` ``path`` block by block (see
    :func:`write_h5ad_streaming`); call ``on_block(start, c)`` with each block's first cell and
    cell states. Returns the number of stored non-zero counts."""
    import h5py
    from anndata.io import sparse_dataset, write_elem

    cfg = plan.cfg
    G = cfg.n_genes
    n_cells = plan.n_cells
    type_names = [f"type_{t}" for t in range(cfg.n_cell_types)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nnz = 0
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        write_elem(f, "var", pd.DataFrame(index=pd.Index(_names("gene_", G, 4))))
        for key in ("layers", "obsm", "varm", "obsp", "varp"):
            write_elem(f, key, {})
        write_elem(f, "uns", {"simulation": {"seed": plan.seed, "config": json.dumps(cfg.to_dict())}})
        X = None
        for start, types, c, library, donor, counts in plan.blocks():
            m = counts.shape[0]
            nnz += int(counts.nnz)
            if on_block is not None:
                on_block(start, c)
            obs = pd.DataFrame(
                {"donor": pd.Categorical.from_codes(donor, categories=plan.donors),
                 "cell_type": pd.Categorical.from_codes(types, categories=type_names),
                 "true_library": library},
                index=pd.Index(_names("cell_", n_cells, 5, start, start + m)))
            if X is None:
                write_elem(f, "X", counts, dataset_kwargs={"chunks": (_H5_CHUNK_VALUES,)})
                write_elem(f, "obs", obs, dataset_kwargs={"maxshape": (None,), "chunks": (_CHUNK_CELLS,)})
                X = sparse_dataset(f["X"])
                continue
            X.append(counts)
            columns = {"_index": obs.index.to_numpy(dtype=object), "donor/codes": donor,
                       "cell_type/codes": types, "true_library": library}
            for name, values in columns.items():
                ds = f["obs"][name]
                ds.resize((start + m,))
                ds[start:start + m] = np.asarray(values).astype(ds.dtype) if ds.dtype != object else values
        if X is None:  # no cells: an empty, readable file
            write_elem(f, "X", sp.csr_matrix((0, G), dtype=np.int32))
            write_elem(f, "obs", pd.DataFrame({"donor": pd.Categorical([], categories=plan.donors)}))
    return nnz


def write_h5ad_streaming(path, config: SimulationConfig | None = None, *, seed: int = 0) -> dict[str, Any]:
    """Write the RNA counts of ``simulate(config, seed=seed)`` to an ``.h5ad`` without holding them.

    The cells are drawn and written :data:`_CHUNK_CELLS` (4,096) at a time with anndata's own
    writers (``anndata.io.write_elem`` for the first block, ``sparse_dataset(...).append`` and
    resized ``.obs`` columns for the next), so memory does not grow with the number of cells
    (a few dense blocks of 4,096 cells x G genes while drawing). The file is what ``backed="r"``
    reading wants: ``.X`` int32 CSR (int64 ``indptr``), uncompressed, in HDF5 chunks of
    :data:`_H5_CHUNK_VALUES` values; ``.obs`` columns ``donor`` and ``cell_type`` (categorical),
    ``true_library`` (L_i, float64), cell ids ``cell_00000``...; ``.var`` gene ids; ``.uns["simulation"]``
    the seed and the config (JSON), as :func:`simulate` writes.

    Same seed, same data: the counts, cell ids and ``.obs`` equal those of :func:`simulate` with
    the same config and seed (its ``.X``; the in-memory object also has layer ``counts``, a copy),
    because every random stream is consumed in the same order and the counts are drawn in the
    same fixed blocks of cells (see :func:`_stream_plan`). The block size is therefore fixed, not
    an option. Only the expression is written; :func:`write_simulation_streaming` writes the
    genotypes and the truth as well. No protein modality (``n_proteins`` must be 0).

    Parameters
    ----------
    path : str | Path
        The ``.h5ad`` file to write (replaced when it exists).
    config : SimulationConfig
        Default :class:`SimulationConfig()`. With ``vary_cells_per_donor=False`` there are exactly
        ``n_donors * round(cells_per_donor)`` cells.
    seed : int

    Returns a dict: path, n_cells, n_genes, n_donors, nnz (stored non-zero counts), seed.
    Raises InputError for an invalid config or proteins.
    """
    cfg = config if config is not None else SimulationConfig()
    plan = _stream_plan(cfg, seed)
    path = Path(path)
    nnz = _write_streamed_h5ad(path, plan)
    return {"path": path, "n_cells": plan.n_cells, "n_genes": cfg.n_genes, "n_donors": len(plan.donors),
            "nnz": nnz, "seed": int(seed)}


def write_simulation_streaming(out_dir, config: SimulationConfig | None = None, *,
                               seed: int = 0) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write everything :func:`write_simulation` writes for ``simulate(config, seed=seed)`` (RNA
    only) without holding the cells: ``pyro-livi simulate --stream``.

    Files (the same names, and the same contents, as :func:`write_simulation` for the same config
    and seed):

    - ``expression.h5ad``: the counts, written block by block as in :func:`write_h5ad_streaming`
      (uncompressed, backed-friendly; ``.X`` only, no layer ``counts``).
    - ``genotypes.bed/.bim/.fam`` and ``truth/effects.tsv``, ``D.tsv``, ``V.tsv``, ``A.tsv``,
      ``W_C.tsv``, ``W_DxC.tsv``, ``W_V.tsv``, ``genes.tsv``: donor-, SNP- and gene-level, written
      by the same code as :func:`write_simulation`.
    - ``truth/cell_state.tsv``: (N, K_C) cell states, its rows appended block by block as the
      cells are drawn.
    - ``truth/config.json`` (with ``"streamed": true`` besides the fields of
      :func:`write_simulation`'s) and ``truth/README.md`` (the same text).

    Memory does not grow with the number of cells: a few blocks of :data:`_CHUNK_CELLS` cells x
    G genes, plus the donor x SNP genotypes and the gene-level tables. Files of these names in
    ``out_dir`` are replaced, nothing else is checked or removed (see
    :func:`prepare_simulation_dir`).

    Parameters
    ----------
    out_dir : str | Path
        The folder (created when missing).
    config : SimulationConfig
        Default :class:`SimulationConfig()`; ``n_proteins`` must be 0.
    seed : int

    Returns ``(paths, info)``: the written paths by name (expression, bed, bim, fam, effects, D,
    V, A, W_C, W_DxC, W_V, genes, cell_state, config, readme) and a dict n_cells, n_genes,
    n_donors, n_snps, nnz (stored non-zero counts), seed, effects (the planted effects table).
    Raises InputError for an invalid config or proteins.
    """
    cfg = config if config is not None else SimulationConfig()
    plan = _stream_plan(cfg, seed)
    out = Path(out_dir)
    truth_dir = out / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    paths, n_effects = _write_population(out, cfg, plan.truth, plan.genotypes, plan.donors, plan.snps,
                                         _names("gene_", cfg.n_genes, 4))
    paths["cell_state"] = truth_dir / "cell_state.tsv"
    paths["expression"] = out / "expression.h5ad"
    nnz = _write_streamed_h5ad(paths["expression"], plan,
                               on_block=lambda start, c: _write_cell_state(paths["cell_state"], c, start,
                                                                           plan.n_cells))
    n_snps = int(plan.genotypes.shape[1])
    paths.update(_write_summary(truth_dir, cfg, seed, n_cells=plan.n_cells, n_donors=len(plan.donors),
                                n_snps=n_snps, n_effects=n_effects, streamed=True))
    info = {"n_cells": plan.n_cells, "n_genes": cfg.n_genes, "n_donors": len(plan.donors), "n_snps": n_snps,
            "nnz": nnz, "seed": int(seed), "effects": plan.truth["effects"].drop(columns="snp_index")}
    return paths, info


def _readme(cfg: SimulationConfig, seed: int, *, n_cells: int, n_donors: int, n_snps: int,
            n_effects: int) -> str:
    """Text of truth/README.md, with this dataset's shapes (the same for :func:`write_simulation`
    and :func:`write_simulation_streaming`)."""
    n, g, ny, ns = n_cells, cfg.n_genes, n_donors, n_snps
    expr = "expression.h5mu" if cfg.n_proteins > 0 else "expression.h5ad"
    stream, layer = ("", "and layer `counts`") if cfg.n_proteins > 0 else (
        ", with or without `--stream` (which draws and writes the cells block by block; `\"streamed\": true` "
        "in `config.json`)", "and, unless streamed, in layer `counts`")
    lines = [
        "# Simulated dataset: ground truth",
        "",
        f"Drawn by `pyro_livi.simulate` with seed {seed}: {n} cells, {g} genes, "
        f"{ny} donors, {ns} SNPs, K_C = {cfg.k_c}, K_DxC = {cfg.k_dxc}, K_V = {cfg.k_v}, "
        f"{cfg.n_cell_types} cell types, {cfg.n_proteins} proteins. `config.json` holds every "
        "parameter; `pyro-livi simulate --config truth/config.json --seed "
        f"{seed} --out DIR` redraws the same data{stream}.",
        "",
        "## Generative process",
        "",
        "```",
        "maf_k ~ Uniform(maf_min, maf_max);  g_yk ~ Binomial(2, maf_k)     (dosage of a1)",
        "d_j = standardise( sum_s sqrt(h2_D/m) * (g_s - mean g_s)/sd g_s + sqrt(1 - h2_D) * e_j )",
        "v_j = standardise( same with h2_V ),   e ~ N(0, 1),  m causal SNPs per factor",
        "c_i = centroid[type(i)] + N(0, diag(sigma^2))   (centroid t = state_strength on dim t)",
        "z_i = (softmax(c_i) @ A) * d_{donor(i)}                              (LIVI eq. 2)",
        "logits_i = b + softmax(c_i) @ W_C + z_i @ W_DxC + v_{donor(i)} @ W_V (LIVI eq. 3)",
        "mu_i = softmax(logits_i over genes) * L_i,   L_i ~ LogNormal(log median_library, "
        "library_sigma)",
        "x_ig ~ NB(mean mu_ig, inverse dispersion theta_g): variance mu + mu^2 / theta",
        "```",
        "",
        "Logits and loadings are on the natural-log scale of expression; donor factors have unit "
        "sample variance (ddof 0) over donors.",
        "",
        "## Files",
        "",
        f"- `../{expr}`: counts (int32 CSR in `.X` {layer}), obs `donor`, `cell_type`, "
        "`true_library` (L_i, expected total counts).",
        "- `../genotypes.bed/.bim/.fam`: PLINK 1 genotypes, iid = fid = donor id, allele_1 = a1 "
        "(the counted allele). `bed_reader.open_bed(path).read()` (count_A1=True, the default) "
        "returns the dosages used here.",
        f"- `effects.tsv`: {n_effects} planted effects, one row per (factor, causal "
        "SNP): factor (D_j or V_j, a column of D.tsv / V.tsv), kind (D or V), snp, chrom, pos, "
        "beta (change of the factor per allele dosage of a1: the exact linear coefficient in the "
        "generating equation), beta_std (per genotype standard deviation), maf (minor allele "
        "frequency: the generating frequency for simulated SNPs, the sample frequency for given "
        "genotypes), h2 (variance fraction planted for this SNP, h2_D/m or h2_V/m). Factors of a "
        "kind with h2 = 0 have no rows.",
        f"- `D.tsv`: ({ny}, {cfg.k_dxc}) donor x cell-state factors, index donor, columns D_j.",
        f"- `V.tsv`: ({ny}, {cfg.k_v}) persistent donor factors, index donor, columns V_j.",
        f"- `A.tsv`: ({cfg.k_c}, {cfg.k_dxc}) one-hot assignment, rows c_k, columns D_j: factor "
        "j acts in cell-state dimension j mod n_cell_types (cell type `type_t` is dimension t).",
        f"- `W_C.tsv`: ({cfg.k_c}, {g}) cell-state loadings (rows c_k, columns genes).",
        f"- `W_DxC.tsv`: ({cfg.k_dxc}, {g}) interaction loadings (rows D_j).",
        f"- `W_V.tsv`: ({cfg.k_v}, {g}) persistent donor loadings (rows V_j).",
        "  Loadings are sparse: each row is non-zero on a random fraction of genes "
        f"(frac_genes_c = {cfg.frac_genes_c}, frac_genes_dxc = {cfg.frac_genes_dxc}, "
        f"frac_genes_v = {cfg.frac_genes_v}), N(0, scale^2) there.",
        f"- `genes.tsv`: ({g}, 2) per gene: baseline b_g (log scale) and theta_g (NB inverse "
        "dispersion).",
        f"- `cell_state.tsv`: ({n}, {cfg.k_c}) cell states c_i (before softmax), index cell.",
        "- `config.json`: seed, sizes and every SimulationConfig field.",
    ]
    if cfg.n_proteins > 0:
        p = cfg.n_proteins
        lines += [
            f"- `W_C_prot.tsv` ({cfg.k_c}, {p}), `W_DxC_prot.tsv` ({cfg.k_dxc}, {p}), "
            f"`W_V_prot.tsv` ({cfg.k_v}, {p}): protein loadings; `proteins.tsv` ({p}, 2): "
            "baseline and theta per protein. Proteins follow the same equations with these "
            "loadings and L ~ LogNormal(log median_library_prot, library_sigma); obs "
            "`true_library` of modality `prot` holds it.",
        ]
    return "\n".join(lines) + "\n"


def simulate_factor_views(seed: int = 0, n: int = 300, G=(200, 50), K: int = 3, density: float = 0.1,
                          noise: float = 0.5):
    """Data from a MOFA-like linear factor model with sparse loadings (the MOFA-like model's own
    generative process, Gaussian views).

    Z (n, K) ~ N(0, 1); per view v, loadings W_v (K, G_v) with N(0, 1) entries kept with
    probability ``density``; factor 2 is private to view 0 (zero loadings in every other view);
    Y_v = Z W_v + N(0, noise^2). Returns ``(Z, [W_v], [Y_v])``, Y_v float32 of shape (n, G_v).
    """
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, K))
    Ws = []
    for v, g in enumerate(G):
        W = rng.normal(size=(K, g)) * (rng.random((K, g)) < density)
        if v > 0 and K > 2:
            W[2] = 0.0
        Ws.append(W)
    Ys = [(Z @ W + noise * rng.normal(size=(n, W.shape[1]))).astype(np.float32) for W in Ws]
    return Z, Ws, Ys
