"""Simulate paired RNA + ATAC (10x-multiome-like) data with planted cell types and gene -> peak
links, at realistic size, drawn in chunks of cells into sparse matrices.

Generative process, for cell i of type t(i) (T types), G genes, P peaks::

    t(i)    ~ Categorical(pi),  pi_t proportional to (t + 1)^-0.7      (unequal type sizes)
    u_i     ~ N(0, I_L)                       continuous programs shared by RNA and ATAC
    e_ir    ~ N(0, 1)                         activity of regulator gene r, independent per cell
    eta_ig  = b_g + m_{t(i) g} + u_i . w_g + s_reg e_ig [g a regulator]          (log scale)
    x_ig    ~ NB(mean l_i softmax_g(eta_i), inverse dispersion theta_g)        RNA counts
              l_i ~ LogNormal(log rna_library, rna_library_sigma)
    a_ig    = (eta_ig - mean_i eta_ig) / sd_i eta_ig     standardised expression of regulator g
    logit pi_ip = c_p + d_{t(i) p} + u_i . v_p + sum_{g linked to p} beta_gp a_ig
    o_ip    ~ Bernoulli(pi_ip)                            open chromatin
    y_ip    ~ Poisson(o_ip * k_i * fragments_per_open)    ATAC fragment counts,
              k_i ~ LogNormal(0, depth_sigma)             per-cell sequencing depth

- b_g ~ N(0, rna_baseline_sd); each type has ``markers_per_type`` marker genes (default
  min(25, (G - n_regulators) / (2 T))) with
  m_tg ~ Uniform(marker_effect) (log fold change), 0 elsewhere; w_g ~ N(0, program_sd^2) on a
  fraction ``program_gene_fraction`` of genes, 0 elsewhere; theta_g ~ LogNormal(log rna_theta, 0.5).
- ``n_regulators`` genes (not markers) are regulators; each is linked to a number of peaks
  drawn uniformly in ``links_per_regulator`` (each linked peak has one regulator), with effect
  beta = sign * Uniform(link_effect) on the logit scale per standard deviation of the gene's log
  expression, sign + with probability ``positive_link_fraction``. A linked peak lies within
  ``link_window`` bp of its gene's TSS.
- c_p ~ N(logit(peak_open_prob), peak_baseline_sd); a fraction ``type_peak_fraction`` of the
  unlinked peaks opens in one type (d_tp ~ Uniform(type_peak_effect)); a fraction
  ``program_peak_fraction`` follows the programs (v_p ~ N(0, program_sd^2)); the rest are
  background.

The defaults (5,000 cells, 2,000 genes, 20,000 peaks) give about 9% non-zero peak values and
about 15% non-zero RNA values, the sparsity of PBMC multiome data after gene selection (seed 004
section 2.2: the peak matrix is above 90% zeros before filtering).

Randomness: one seed feeds :class:`numpy.random.SeedSequence`, split into independent streams
(structure, cells, rna, atac), so the same seed gives the same data.

Memory: the RNA and ATAC matrices are drawn ``chunk_cells`` cells at a time and kept as CSR;
dense arrays never exceed chunk_cells x P.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.special import expit

from pyro_livi.errors import InputError

_STREAMS = ("structure", "cells", "rna", "atac")
_N_CHROMOSOMES = 22
_CHROMOSOME_LENGTH = 100_000_000


@dataclass
class MultiomeConfig:
    """Sizes and effect sizes of :func:`simulate_multiome` (see the module docstring).

    Counts, widths and fractions must be positive where they are sizes and within [0, 1]
    where they are fractions; ranges are (low, high) with low <= high. ``chunk_cells`` bounds
    the dense block drawn at once and does not change the result.
    """

    n_cells: int = 5000
    n_genes: int = 2000
    n_peaks: int = 20000
    n_cell_types: int = 8
    n_programs: int = 6
    n_regulators: int = 25
    links_per_regulator: tuple[int, int] = (8, 20)
    link_effect: tuple[float, float] = (1.0, 2.0)
    positive_link_fraction: float = 0.7
    link_window: int = 200_000
    regulator_sd: float = 0.8
    markers_per_type: int | None = None
    marker_effect: tuple[float, float] = (1.5, 3.0)
    program_gene_fraction: float = 0.2
    program_sd: float = 0.5
    rna_baseline_sd: float = 1.5
    rna_library: float = 1000.0
    rna_library_sigma: float = 0.4
    rna_theta: float = 3.0
    peak_open_prob: float = 0.07
    peak_baseline_sd: float = 0.8
    type_peak_fraction: float = 0.3
    type_peak_effect: tuple[float, float] = (1.5, 3.0)
    program_peak_fraction: float = 0.2
    fragments_per_open: float = 1.3
    depth_sigma: float = 0.4
    chunk_cells: int = 256

    def __post_init__(self):
        for name in ("n_cells", "n_genes", "n_peaks", "n_cell_types", "chunk_cells"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InputError("<config>", name, f"must be a positive integer, got {value!r}",
                                 f"give {name} >= 1")
        for name in ("n_programs", "n_regulators", "markers_per_type", "link_window"):
            value = getattr(self, name)
            if name == "markers_per_type" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise InputError("<config>", name, f"must be an integer >= 0, got {value!r}", f"give {name} >= 0")
        for name in ("positive_link_fraction", "program_gene_fraction", "peak_open_prob", "type_peak_fraction",
                     "program_peak_fraction"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise InputError("<config>", name, f"must be a fraction in [0, 1], got {value!r}",
                                 f"give {name} between 0 and 1")
        if not 0.0 < self.peak_open_prob < 1.0:
            raise InputError("<config>", "peak_open_prob", f"must be in (0, 1), got {self.peak_open_prob}",
                             "give a probability strictly between 0 and 1")
        for name in ("links_per_regulator", "link_effect", "marker_effect", "type_peak_effect"):
            low, high = getattr(self, name)
            if low > high or low < 0:
                raise InputError("<config>", name, f"must be (low, high) with 0 <= low <= high, got {(low, high)}",
                                 "give an increasing pair of non-negative numbers")
        if self.n_regulators + self.n_cell_types * self.markers > self.n_genes:
            raise InputError("<config>", "n_regulators",
                             f"{self.n_regulators} regulators and {self.n_cell_types} x {self.markers} "
                             f"markers need more than the {self.n_genes} genes",
                             "lower n_regulators (--n-regulators) or markers_per_type (a --config "
                             "field), or raise n_genes (--n-genes)")
        if self.n_regulators * self.links_per_regulator[1] > self.n_peaks:
            raise InputError("<config>", "links_per_regulator",
                             f"up to {self.n_regulators} x {self.links_per_regulator[1]} linked peaks exceed the "
                             f"{self.n_peaks} peaks", "lower n_regulators (--n-regulators) or links_per_regulator (a "
                             "--config field), or raise n_peaks (--n-peaks)")
        for name in ("regulator_sd", "program_sd", "rna_baseline_sd", "rna_library", "rna_theta",
                     "peak_baseline_sd", "fragments_per_open", "depth_sigma", "rna_library_sigma"):
            if float(getattr(self, name)) < 0 or (name in ("rna_library", "rna_theta", "fragments_per_open")
                                                  and float(getattr(self, name)) <= 0):
                raise InputError("<config>", name, f"must be positive, got {getattr(self, name)!r}",
                                 f"give {name} > 0")

    @property
    def markers(self) -> int:
        """Marker genes per type: ``markers_per_type``, or when None min(25, (n_genes -
        n_regulators) // (2 n_cell_types)), at least 1."""
        if self.markers_per_type is not None:
            return int(self.markers_per_type)
        return max(1, min(25, (self.n_genes - self.n_regulators) // (2 * self.n_cell_types)))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict, source: str = "<config>") -> "MultiomeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(source, unknown[0], "unknown MultiomeConfig field",
                             f"use fields among {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)


@dataclass
class SimulatedMultiome:
    """A draw of :func:`simulate_multiome`.

    mdata : MuData with modalities ``rna`` (n_cells x n_genes raw counts, int32 CSR) and ``atac``
        (n_cells x n_peaks fragment counts, int32 CSR); ``obs["cell_type"]`` in the MuData and in
        each modality.
    links : DataFrame, one row per planted gene -> peak link (see :func:`write_multiome`).
    cell_types : Series, cell id -> planted cell type.
    genes, peaks : DataFrames of per-feature truth (see :func:`write_multiome`).
    config, seed : what was drawn with.
    """

    mdata: object
    links: pd.DataFrame
    cell_types: pd.Series
    genes: pd.DataFrame
    peaks: pd.DataFrame
    config: MultiomeConfig
    seed: int


def _streams(seed: int) -> dict[str, np.random.Generator]:
    children = np.random.SeedSequence(int(seed)).spawn(len(_STREAMS))
    return {name: np.random.default_rng(child) for name, child in zip(_STREAMS, children)}


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _uniform(rng, bounds, size):
    return rng.uniform(bounds[0], bounds[1], size=size)


def simulate_multiome(config: MultiomeConfig | None = None, *, seed: int = 0) -> SimulatedMultiome:
    """Draw paired RNA + ATAC counts with planted cell types and gene -> peak links (see the
    module docstring for the generative process and the defaults' sparsity).

    Returns a :class:`SimulatedMultiome`; write it with :func:`write_multiome`. Raises
    InputError for an invalid config.
    """
    import anndata as ad
    import mudata as md

    cfg = config or MultiomeConfig()
    rng = _streams(seed)
    s = rng["structure"]
    n, G, P, T, L, R = cfg.n_cells, cfg.n_genes, cfg.n_peaks, cfg.n_cell_types, cfg.n_programs, cfg.n_regulators

    # ---------------------------------------------------------------- genes
    b = s.normal(0.0, cfg.rna_baseline_sd, G)
    theta = np.exp(s.normal(np.log(cfg.rna_theta), 0.5, G))
    order = s.permutation(G)
    k = cfg.markers
    markers = order[: T * k].reshape(T, k)
    regulators = np.sort(order[T * k: T * k + R])
    marker_table = np.zeros((T, G))
    marker_of = np.full(G, "", dtype=object)
    for t in range(T):
        marker_table[t, markers[t]] = _uniform(s, cfg.marker_effect, k)
        marker_of[markers[t]] = f"type_{t}"
    w = s.normal(0.0, cfg.program_sd, (L, G)) * (s.random((L, G)) < cfg.program_gene_fraction)
    gene_chrom = s.integers(1, _N_CHROMOSOMES + 1, G)
    gene_tss = s.integers(cfg.link_window + 1, _CHROMOSOME_LENGTH - cfg.link_window, G)

    # ---------------------------------------------------------------- peaks and links
    n_links = s.integers(cfg.links_per_regulator[0], cfg.links_per_regulator[1] + 1, R) if R else np.zeros(0, int)
    linked = s.permutation(P)[: int(n_links.sum())]
    link_gene = np.repeat(regulators, n_links)
    sign = np.where(s.random(linked.size) < cfg.positive_link_fraction, 1.0, -1.0)
    link_beta = sign * _uniform(s, cfg.link_effect, linked.size)
    c = s.normal(np.log(cfg.peak_open_prob / (1 - cfg.peak_open_prob)), cfg.peak_baseline_sd, P)
    kind = np.full(P, "background", dtype=object)
    kind[linked] = "linked"
    free = np.flatnonzero(kind == "background")
    free = s.permutation(free)
    n_type = int(round(cfg.type_peak_fraction * free.size))
    n_prog = int(round(cfg.program_peak_fraction * free.size))
    type_peaks, prog_peaks = free[:n_type], free[n_type:n_type + n_prog]
    kind[type_peaks] = "cell_type"
    kind[prog_peaks] = "program"
    peak_type = np.full(P, -1)
    peak_type[type_peaks] = s.integers(0, T, type_peaks.size)
    d = np.zeros((T, P))
    d[peak_type[type_peaks], type_peaks] = _uniform(s, cfg.type_peak_effect, type_peaks.size)
    v = np.zeros((L, P))
    v[:, prog_peaks] = s.normal(0.0, cfg.program_sd, (L, prog_peaks.size))
    # positions: linked peaks near their gene's TSS, the others anywhere
    peak_chrom = s.integers(1, _N_CHROMOSOMES + 1, P)
    peak_start = s.integers(0, _CHROMOSOME_LENGTH - 1000, P)
    peak_chrom[linked] = gene_chrom[link_gene]
    offset = s.integers(-cfg.link_window, cfg.link_window + 1, linked.size)
    peak_start[linked] = gene_tss[link_gene] + offset
    width = s.integers(200, 1500, P)
    # regulator x peak effects (R, P), sparse
    reg_pos = {g: k for k, g in enumerate(regulators)}
    B = sp.csr_matrix((link_beta, ([reg_pos[g] for g in link_gene], linked)), shape=(R, P))

    # ---------------------------------------------------------------- cells
    cr = rng["cells"]
    pi = (np.arange(T) + 1.0) ** -0.7
    pi /= pi.sum()
    types = cr.choice(T, size=n, p=pi)
    u = cr.normal(0.0, 1.0, (n, L))
    e = cr.normal(0.0, 1.0, (n, R))
    library = np.exp(cr.normal(np.log(cfg.rna_library), cfg.rna_library_sigma, n))
    depth = np.exp(cr.normal(0.0, cfg.depth_sigma, n))
    # standardised log expression of the regulators over the cells
    eta_reg = b[regulators] + marker_table[types][:, regulators] + u @ w[:, regulators] + cfg.regulator_sd * e
    sd = eta_reg.std(axis=0)
    activity = (eta_reg - eta_reg.mean(axis=0)) / np.where(sd > 0, sd, 1.0)

    rna_blocks, atac_blocks = [], []
    r_rna, r_atac = rng["rna"], rng["atac"]
    for start in range(0, n, cfg.chunk_cells):
        sl = slice(start, min(start + cfg.chunk_cells, n))
        eta = b + marker_table[types[sl]] + u[sl] @ w
        eta[:, regulators] += cfg.regulator_sd * e[sl]
        mu = _softmax(eta) * library[sl, None]
        lam = r_rna.gamma(shape=np.broadcast_to(theta, mu.shape), scale=mu / theta)
        rna_blocks.append(sp.csr_matrix(r_rna.poisson(lam).astype(np.int32)))
        logits = (c + d[types[sl]] + u[sl] @ v).astype(np.float32)
        if R:
            logits += np.asarray(B.T.dot(activity[sl].T).T, dtype=np.float32)
        open_ = r_atac.random(logits.shape, dtype=np.float32) < expit(logits, out=logits)
        del logits
        rows, cols = np.nonzero(open_)
        counts = r_atac.poisson(depth[sl][rows] * cfg.fragments_per_open)
        keep = counts > 0
        atac_blocks.append(sp.csr_matrix((counts[keep].astype(np.int32), (rows[keep], cols[keep])),
                                         shape=(sl.stop - sl.start, P)))
    rna = sp.vstack(rna_blocks, format="csr").astype(np.int32)
    atac = sp.vstack(atac_blocks, format="csr").astype(np.int32)

    # ---------------------------------------------------------------- names and tables
    cells = pd.Index([f"cell_{i:05d}" for i in range(n)], name="cell")
    gene_names = pd.Index([f"gene_{g:04d}" for g in range(G)])
    peak_names = pd.Index([f"chr{peak_chrom[p]}:{peak_start[p]}-{peak_start[p] + width[p]}" for p in range(P)])
    if not peak_names.is_unique:  # two draws at the same start: make the name unique by its index
        dup = peak_names.duplicated(keep=False)
        peak_names = pd.Index([f"{name}_{p}" if dup[p] else name for p, name in enumerate(peak_names)])
    type_names = np.array([f"type_{t}" for t in range(T)])
    cell_types = pd.Series(pd.Categorical(type_names[types], categories=list(type_names)), index=cells,
                           name="cell_type")
    is_reg = np.zeros(G, bool)
    is_reg[regulators] = True
    genes = pd.DataFrame({"chrom": [f"chr{k}" for k in gene_chrom], "tss": gene_tss, "baseline": b, "theta": theta,
                          "regulator": is_reg, "marker_of": marker_of.astype(str),
                          "n_links": np.bincount(link_gene, minlength=G) if R else np.zeros(G, int)},
                         index=pd.Index(gene_names, name="gene"))
    linked_gene = np.full(P, "", dtype=object)
    linked_gene[linked] = gene_names[link_gene]
    peaks = pd.DataFrame({"chrom": [f"chr{k}" for k in peak_chrom], "start": peak_start,
                          "end": peak_start + width, "kind": kind.astype(str),
                          "open_type": np.where(peak_type >= 0, np.array([f"type_{t}" for t in peak_type.clip(0)]), ""),
                          "baseline_logit": c, "linked_gene": linked_gene.astype(str)},
                         index=pd.Index(peak_names, name="peak"))
    links = pd.DataFrame({"gene": gene_names[link_gene], "peak": peak_names[linked], "effect": link_beta,
                          "gene_index": link_gene, "peak_index": linked,
                          "distance_to_tss": peak_start[linked] - gene_tss[link_gene]})
    links = links.sort_values(["gene_index", "peak_index"]).reset_index(drop=True)

    obs = pd.DataFrame({"cell_type": cell_types.values}, index=cells)
    rna_ad = ad.AnnData(X=rna, obs=obs.copy(), var=genes[["chrom", "tss", "regulator", "marker_of"]].copy())
    rna_ad.obs["true_library"] = library
    atac_ad = ad.AnnData(X=atac, obs=obs.copy(), var=peaks[["chrom", "start", "end"]].copy())
    atac_ad.obs["true_depth"] = depth
    mdata = md.MuData({"rna": rna_ad, "atac": atac_ad})
    mdata.obs["cell_type"] = cell_types.values
    return SimulatedMultiome(mdata=mdata, links=links, cell_types=cell_types, genes=genes, peaks=peaks,
                             config=cfg, seed=int(seed))


def write_multiome(sim: SimulatedMultiome, out_dir) -> dict[str, Path]:
    """Write a :class:`SimulatedMultiome` to ``out_dir``; return the paths by name.

    Files:

    - ``multiome.h5mu``: modalities ``rna`` (cells x genes raw counts) and ``atac`` (cells x
      peaks fragment counts), int32 CSR in ``.X``; ``obs["cell_type"]``.
    - ``truth/links.tsv``: one row per planted link, columns ``gene`` (gene name, a var name of
      ``rna``), ``peak`` (peak name, a var name of ``atac``), ``effect`` (beta, the change of
      the peak's open log-odds per standard deviation of the gene's log expression; the sign
      says opening or closing), ``gene_index`` and ``peak_index`` (0-based columns of the
      matrices), ``distance_to_tss`` (peak start - gene TSS, bp).
    - ``truth/cell_types.tsv``: columns ``cell``, ``cell_type``.
    - ``truth/genes.tsv``: per gene ``chrom``, ``tss``, ``baseline`` (b_g), ``theta``,
      ``regulator`` (has links), ``marker_of`` (type name or empty), ``n_links``.
    - ``truth/peaks.tsv``: per peak ``chrom``, ``start``, ``end``, ``kind`` (linked,
      cell_type, program, background), ``open_type`` (the type a cell_type peak opens in),
      ``baseline_logit`` (c_p), ``linked_gene`` (empty when none).
    - ``truth/config.json`` (seed, sizes, every MultiomeConfig field) and ``truth/README.md``.

    Files of these names in ``out_dir`` are replaced and nothing else is removed; call
    :func:`pyro_livi.simulate.prepare_simulation_dir` first to refuse a folder that holds a
    simulation, or to remove its files (what ``pyro-livi simulate --mode multiome`` does).
    """
    import mudata as md

    out = Path(out_dir)
    truth = out / "truth"
    truth.mkdir(parents=True, exist_ok=True)
    paths = {"data": out / "multiome.h5mu"}
    with md.set_options(pull_on_update=False):
        sim.mdata.write(paths["data"], compression="gzip")
    paths["links"] = truth / "links.tsv"
    sim.links.to_csv(paths["links"], sep="\t", index=False)
    paths["cell_types"] = truth / "cell_types.tsv"
    sim.cell_types.rename_axis("cell").reset_index().to_csv(paths["cell_types"], sep="\t", index=False)
    paths["genes"] = truth / "genes.tsv"
    sim.genes.to_csv(paths["genes"], sep="\t")
    paths["peaks"] = truth / "peaks.tsv"
    sim.peaks.to_csv(paths["peaks"], sep="\t")
    rna, atac = sim.mdata.mod["rna"].X, sim.mdata.mod["atac"].X
    n, G, P = rna.shape[0], rna.shape[1], atac.shape[1]
    summary = {"seed": sim.seed, "n_cells": n, "n_genes": G, "n_peaks": P,
               "rna_nonzero_fraction": rna.nnz / max(n * G, 1), "atac_nonzero_fraction": atac.nnz / max(n * P, 1),
               "n_links": int(len(sim.links)), "config": sim.config.to_dict()}
    paths["config"] = truth / "config.json"
    paths["config"].write_text(json.dumps(summary, indent=2) + "\n")
    paths["readme"] = truth / "README.md"
    paths["readme"].write_text(_readme(summary))
    return paths


def read_links(path) -> pd.DataFrame:
    """The links table written by :func:`write_multiome` (``truth/links.tsv``), checked for its
    columns; raises InputError naming the file and the missing column."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "<file>", "file not found", "give truth/links.tsv of `pyro-livi simulate --mode multiome`")
    table = pd.read_csv(path, sep="\t")
    for col in ("gene", "peak", "effect", "gene_index", "peak_index"):
        if col not in table.columns:
            raise InputError(path, col, "missing column", "give the links table written by write_multiome")
    return table


def _readme(summary: dict) -> str:
    return "\n".join([
        "# Simulated multiome data: ground truth",
        "",
        f"Drawn by `pyro_livi.simulate_multiome.simulate_multiome` with seed {summary['seed']}: "
        f"{summary['n_cells']} cells, {summary['n_genes']} genes, {summary['n_peaks']} peaks, "
        f"{summary['n_links']} planted gene -> peak links; non-zero values: RNA "
        f"{summary['rna_nonzero_fraction']:.3f}, ATAC {summary['atac_nonzero_fraction']:.3f}.",
        "",
        "```",
        "t(i) ~ Categorical(pi);  u_i ~ N(0, I_L);  e_ir ~ N(0, 1)",
        "eta_ig = b_g + m_{t(i) g} + u_i . w_g + regulator_sd * e_ig [g regulator]",
        "x_ig ~ NB(l_i softmax(eta_i)_g, theta_g)                          (rna)",
        "a_ig = eta_ig standardised over cells (regulators)",
        "logit pi_ip = c_p + d_{t(i) p} + u_i . v_p + sum_g beta_gp a_ig",
        "y_ip ~ Poisson(Bernoulli(pi_ip) * k_i * fragments_per_open)      (atac)",
        "```",
        "",
        "- `../multiome.h5mu`: `rna` and `atac` raw counts (int32 CSR in `.X`), obs `cell_type`.",
        "- `links.tsv`: gene, peak, effect (beta, log-odds per SD of log expression), gene_index, "
        "peak_index, distance_to_tss.",
        "- `cell_types.tsv`: cell, cell_type.",
        "- `genes.tsv`, `peaks.tsv`: per-feature truth (regulators, markers, peak kinds).",
        "- `config.json`: seed, sizes, sparsity and every MultiomeConfig field; "
        "`pyro-livi simulate --mode multiome --config truth/config.json --seed SEED --out DIR` draws the same data.",
    ]) + "\n"
