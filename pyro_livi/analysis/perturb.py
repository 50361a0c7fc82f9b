"""Perturbation explainability for any model of the zoo: set one input feature of one cell to a
new value, pass the cell through the fitted model many times, and count, for every output
feature, how often its prediction changes state.

The procedure (seed 004, chapter 5), generic over the zoo's conventions only (a guide that
encodes the cells of a :class:`~pyro_livi.data.batch.Batch` from ``batch.x``, and one
observation site ``obs_<modality>`` per modality, see :mod:`.heldout`):

1. **Cell.** A cell id, or the representative cell of a cell type t (eq. 5.1)::

       i*_t = argmax_{i of type t} (1 / |M_t|) sum_{g in M_t} x_ig

   over the cells labelled t, with M_t the marker features and x the model-input values
   (continuous modalities as given; count modalities as log1p of the counts scaled to 10^4
   per cell, so that a cell does not win by its sequencing depth alone).
2. **Perturbation** (eq. 5.2). ``x~_k = v_new`` for the chosen input feature k, every other
   feature of every modality, the cell's covariates and its size factors unchanged (the
   observed library size is kept, so that count outputs are not rescaled by the edit itself).
   ``v_new`` is in the units the model reads (raw counts for count modalities).
3. **Baseline.** The output of the *unperturbed* cell with every latent at its posterior mean
   (the guide's locations, as :func:`~pyro_livi.analysis.denoise.normalized_expression` at the
   cell's own library size): ``b_j``, computed once and kept fixed.
4. **Passes.** N stochastic passes of the perturbed cell: the latents are drawn from the guide,
   the model is replayed on them, and the mean of ``obs_<modality>`` is read (probability for
   ``bernoulli``, the NB mean ``mu`` for NB-type counts, the location for ``normal``):
   ``v_jn``. Each pass is also run on the unperturbed cell with the same random draws
   (``v0_jn``, a paired pass), which gives the change frequency from posterior sampling alone
   (``null_frequency``) and the paired shift ``v_jn - v0_jn``.
5. **Change frequency** (eq. 5.3). ``f_j = c_j / N``, c_j the number of passes in which output
   j changed state against the fixed baseline, split into gained (``gained = c_j^+ / N``) and
   lost (``lost = c_j^- / N``), ``f_j = gained + lost``.

Decision rules (``rule``), chosen per output modality from its likelihood with ``"auto"``:

``"state"`` (``bernoulli``: binarised peaks). A prediction is *open* above the decision
    threshold t (default 0.5, on the probability) and *closed* below it; values inside the
    robustness margin ``[t - m, t + m]`` (m default 0.05) are undecided. A pass counts as
    *gained* when the baseline is closed (``b <= t - m``) and the pass open (``v >= t + m``),
    *lost* in the mirror case; a feature whose baseline lies inside the margin never changes
    state. The threshold applies to the mean of any likelihood when chosen explicitly, e.g.
    ``rule="state", threshold=0.5`` on a ``normal`` model of binarised peaks (the thesis's
    regression setting).
``"fold"`` (count likelihoods: ``nb``, ``zinb``, ``poisson``, NB mixtures). The decision
    threshold is the baseline itself; a pass counts as gained when
    ``log2((v + p) / (b + p)) >= m`` and lost when it is ``<= -m``, with the margin m in log2
    units (default 0.5, a ~1.41-fold change) and a pseudocount p (default 0.1 counts at the
    cell's library size) that keeps expected counts far below one from ranking on fold
    changes of near-zero means.
``"shift"`` (``normal`` and any other likelihood). The decision threshold is the baseline;
    a pass counts as gained when ``(v - b) / sd_j >= m`` and lost when it is ``<= -m``, with
    sd_j the standard deviation of the observation distribution at the baseline (the
    per-feature noise sd of ``normal``; 1 when the distribution has none) and m default 0.25.

Table columns (one row per output feature): ``feature``, ``modality``, ``rank`` (by
``frequency``, ties broken by ``|effect|``), ``frequency`` f_j, ``gained``, ``lost``,
``n_changed`` c_j, ``null_frequency``, ``baseline`` b_j, ``perturbed_mean`` (mean of v_jn),
``mean_shift`` (mean of the paired shift v_jn - v0_jn, in the output's units) with
``shift_low`` / ``shift_high`` (its central ``interval`` quantiles over passes), ``effect``
(mean over passes of the rule's statistic against the baseline: v - b for ``state``, the log2
fold change for ``fold``, the standardised shift for ``shift``) and ``rule``. The perturbed
feature itself is left out of its own modality's rows (it is the input, not a response) unless
``include_perturbed=True``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyro.distributions as dist
import torch

from ..errors import InputError
from .denoise import _denoised_mean, _elementwise
from .heldout import posterior_mean, replayed_model_trace

__all__ = ["RULES", "DEFAULT_MARGINS", "PerturbationResult", "representative_cell", "marker_scores",
           "perturb", "plot_perturbation"]

#: decision rules, see the module docstring
RULES = ("state", "fold", "shift")
#: default robustness margin of each rule (state: probability units; fold: log2; shift: sd units)
DEFAULT_MARGINS = {"state": 0.05, "fold": 0.5, "shift": 0.25}
DEFAULT_THRESHOLD = 0.5
DEFAULT_PSEUDOCOUNT = 0.1
#: counts per cell that count modalities are scaled to before eq. 5.1's marker mean
MARKER_LIBRARY_SIZE = 1e4
TABLE_COLUMNS = ["feature", "modality", "rank", "frequency", "gained", "lost", "n_changed", "null_frequency",
                 "baseline", "perturbed_mean", "mean_shift", "shift_low", "shift_high", "effect", "rule"]


# ------------------------------------------------------------------------------------- cells
def _cell_position(dataset, cell) -> int:
    names = pd.Index(dataset.obs_names.astype(str))
    pos = names.get_indexer([str(cell)])[0]
    if pos < 0:
        raise InputError(dataset.source, "cell", f"no cell {str(cell)!r} among the {dataset.n_cells} cells "
                         f"(e.g. {', '.join(map(repr, names[:3]))})",
                         "give an id of the data's obs_names with --cell (cell= in Python), or choose the "
                         "cell by type with --cell-type/--label-key/--markers")
    return int(pos)


def _modality_of(dataset, feature: str, modality: str | None, what: str, flag: str) -> str:
    """The modality holding ``feature`` (``modality`` when given, checked)."""
    if modality is not None:
        if modality not in dataset.modalities:
            raise InputError(dataset.source, what, f"unknown modality {modality!r}",
                             f"use one of {dataset.modalities} (--input-modality on the CLI, input_modality= "
                             "in Python)")
        names = dataset.feature_names[modality]
        if str(feature) not in set(map(str, names)):
            raise InputError(dataset.source, flag, f"no feature {str(feature)!r} in modality {modality!r} "
                             f"({len(names)} features, e.g. {', '.join(map(repr, list(names[:3])))})",
                             f"give a feature name of modality {modality!r} (its var_names; --gene or "
                             "--markers on the CLI, feature= or markers= in Python), or another modality")
        return modality
    holders = [m for m in dataset.modalities if str(feature) in set(map(str, dataset.feature_names[m]))]
    if not holders:
        examples = "; ".join(f"{m}: {', '.join(map(repr, list(dataset.feature_names[m][:3])))}"
                             for m in dataset.modalities)
        raise InputError(dataset.source, flag, f"no feature {str(feature)!r} in any modality ({examples})",
                         "give a feature name of the data's var_names (--gene or --markers on the CLI, "
                         "feature= or markers= in Python)")
    if len(holders) > 1:
        raise InputError(dataset.source, what, f"feature {str(feature)!r} is in several modalities {holders}",
                         "name its modality with --input-modality (input_modality= in Python)")
    return holders[0]


def _feature_position(dataset, modality: str, feature: str) -> int:
    return int(pd.Index(dataset.feature_names[modality].astype(str)).get_loc(str(feature)))


def marker_scores(dataset, markers, *, modality: str | None = None, cells=None) -> pd.Series:
    """Mean marker expression of each cell (the score of eq. 5.1).

    ``markers``: feature names (list, or one comma-separated string) of ``modality`` (default:
    the modality holding the first marker). Count modalities are scored on
    ``log1p(x / size_factor * 1e4)``, continuous ones on their values. ``cells``: integer
    positions to score (default: every cell). Returns a Series (cells,) indexed by cell id.
    Raises InputError for an empty marker list, an unknown marker or modality.
    """
    markers = [m.strip() for m in markers.split(",")] if isinstance(markers, str) else [str(m) for m in markers]
    markers = [m for m in dict.fromkeys(markers) if m]
    if not markers:
        raise InputError(dataset.source, "markers", "no marker given",
                         "give marker features, e.g. --markers CD79A,MS4A1 (markers=[...] in Python)")
    modality = _modality_of(dataset, markers[0], modality, "input_modality", "markers")
    for name in markers[1:]:
        _modality_of(dataset, name, modality, "input_modality", "markers")
    cols = np.array([_feature_position(dataset, modality, g) for g in markers])
    cells = np.arange(dataset.n_cells) if cells is None else np.asarray(cells, dtype=np.int64)
    continuous = modality in dataset.spec.continuous_modalities
    scores = np.empty(cells.size)
    for start in range(0, cells.size, 4096):
        idx = cells[start:start + 4096]
        batch = dataset.batch(idx)
        x = batch.x[modality][:, cols].double()
        if not continuous:
            x = torch.log1p(x / batch.size_factor[modality].double().clamp(min=1e-12)[:, None]
                            * MARKER_LIBRARY_SIZE)
        scores[start:start + idx.size] = x.mean(-1).numpy()
    return pd.Series(scores, index=pd.Index(dataset.obs_names[cells].astype(str), name="cell"),
                     name="marker_score")


def representative_cell(dataset, cell_type, label_key: str, markers, *, modality: str | None = None) -> str:
    """The representative cell of ``cell_type`` (eq. 5.1): among the cells whose
    ``dataset.obs[label_key]`` equals ``cell_type``, the one with the highest mean marker
    expression (:func:`marker_scores`; ties: the first in data order). Returns its id.

    Raises InputError when ``label_key`` was not read with the data, or no cell has the type.
    """
    if label_key is None or label_key not in dataset.obs.columns:
        raise InputError(dataset.source, "label_key", f"no label column {label_key!r} read with the data "
                         f"(columns: {list(dataset.obs.columns)})",
                         "name the .obs column holding the cell types with --label-key (label_key= in Python)")
    labels = dataset.obs[label_key].astype(str).to_numpy()
    cells = np.flatnonzero(labels == str(cell_type))
    if cells.size == 0:
        types = pd.unique(labels)
        raise InputError(dataset.source, "cell_type", f"no cell of type {str(cell_type)!r} in column "
                         f"{label_key!r} (types: {', '.join(map(repr, types[:10]))})",
                         "give one of these types with --cell-type (cell_type= in Python)")
    scores = marker_scores(dataset, markers, modality=modality, cells=cells)
    return str(scores.index[int(np.argmax(scores.to_numpy()))])


# ------------------------------------------------------------------------------------ passes
def _rule_of(fn) -> str:
    base = _elementwise(fn)
    if isinstance(base, torch.distributions.Bernoulli):
        return "state"
    if isinstance(base, torch.distributions.Normal):
        return "shift"
    counts = (torch.distributions.Poisson, torch.distributions.NegativeBinomial, dist.GammaPoisson)
    if isinstance(base, counts) or hasattr(base, "theta"):  # the zoo's NB, ZINB and NB mixtures hold theta
        return "fold"
    return "shift"


def _sd(fn) -> torch.Tensor | None:
    try:
        return _elementwise(fn).stddev
    except (NotImplementedError, AttributeError):
        return None


def _pass(model, batch, modalities, guide) -> dict[str, torch.Tensor]:
    """One replay: the guide's latents (``guide`` may set them to their posterior means), then
    the mean of each ``obs_<m>`` for the batch's first cell, shape (G_m,)."""
    trace = replayed_model_trace(model, batch, guide)
    out = {}
    for m in modalities:
        node = trace.nodes.get(f"obs_{m}")
        if node is None:
            raise InputError("<model>", "output_modalities", f"model {type(model).__name__} has no observation "
                             f"site obs_{m}", "choose a modality the model observes")
        out[m] = _denoised_mean(node["fn"]).expand(batch.x[m].shape)[0].double()
        out[f"__fn_{m}"] = node["fn"]
    return out


def _changes(rule: str, v: np.ndarray, b: np.ndarray, *, threshold: float, margin: float,
             pseudocount: float, sd: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gained, lost, statistic) of passes ``v`` (N, G) against the baseline ``b`` (G,)."""
    if rule == "state":
        stat = v - b
        gained = (b <= threshold - margin) & (v >= threshold + margin)
        lost = (b >= threshold + margin) & (v <= threshold - margin)
    elif rule == "fold":
        stat = np.log2((np.clip(v, 0, None) + pseudocount) / (np.clip(b, 0, None) + pseudocount))
        gained, lost = stat >= margin, stat <= -margin
    else:
        stat = (v - b) / sd
        gained, lost = stat >= margin, stat <= -margin
    return gained, lost, stat


@dataclass
class PerturbationResult:
    """What :func:`perturb` returns.

    table : DataFrame, one row per output feature, sorted by ``rank`` (columns: module docstring).
    cell : id of the perturbed cell; feature, input_modality : the perturbed input feature.
    original_value, value : its value before and after (model-input units).
    n_passes, seed : the Monte Carlo settings.
    rules : {output modality: {"rule", "threshold", "margin", "pseudocount"}} as applied.
    selection : how the cell was chosen: {"cell"} or {"cell_type", "label_key", "markers",
        "marker_score"} (eq. 5.1).
    """

    table: pd.DataFrame
    cell: str
    feature: str
    input_modality: str
    original_value: float
    value: float
    n_passes: int
    seed: int
    rules: dict
    selection: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The settings and headline numbers, JSON-serialisable."""
        t = self.table
        return {"cell": self.cell, "feature": self.feature, "input_modality": self.input_modality,
                "original_value": self.original_value, "value": self.value, "n_passes": self.n_passes,
                "seed": self.seed, "rules": self.rules, "selection": self.selection,
                "n_outputs": int(len(t)), "n_changed_any": int((t["frequency"] > 0).sum()),
                "top": t.head(10)[["feature", "modality", "frequency", "gained", "lost"]].to_dict("records")}

    def plot(self, path=None, *, top: int = 20):
        """Bar chart of the ``top`` features (:func:`plot_perturbation`); returns the Figure."""
        return plot_perturbation(self, path, top=top)

    def write(self, out_dir, *, top: int = 20) -> dict[str, Path]:
        """Write ``perturbation.tsv`` (the table), ``perturbation.png`` (the bar chart) and
        ``perturbation.json`` (:meth:`summary`) into ``out_dir`` (created when missing)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"table": out / "perturbation.tsv", "figure": out / "perturbation.png",
                 "summary": out / "perturbation.json"}
        self.table.to_csv(paths["table"], sep="\t", index=False)
        self.plot(paths["figure"], top=top)
        paths["summary"].write_text(json.dumps(self.summary(), indent=2, default=float))
        return paths


@torch.no_grad()
def perturb(model, dataset, *, feature: str, value: float, cell=None, cell_type=None, label_key: str | None = None,
            markers=None, input_modality: str | None = None, output_modalities=None, n_passes: int = 100,
            seed: int = 0, rule: str | dict = "auto", threshold: float | None = None,
            margin: float | dict | None = None, pseudocount: float = DEFAULT_PSEUDOCOUNT, interval: float = 0.95,
            include_perturbed: bool = False) -> PerturbationResult:
    """Perturbation analysis of one input feature in one cell (seed 004, eq. 5.1-5.3; the
    procedure, the baseline, the decision rules and the table are described in the module
    docstring).

    Parameters
    ----------
    model : a fitted model of the zoo (``ZooModel``), e.g. from :func:`pyro_livi.persistence.load_model`.
    dataset : SingleCellDataset read as the model was fitted (same modalities and features).
    feature : name of the input feature to set (gene, peak, protein).
    value : its new value v_new, in the units the model reads (raw counts for count modalities).
    cell : id of the cell to perturb; or ``cell_type`` + ``label_key`` + ``markers`` (names, or
        one comma-separated string) to use the representative cell of eq. 5.1.
    input_modality : modality of ``feature`` (default: the one holding it).
    output_modalities : modalities whose predictions are scored (default: every modality other
        than the input's; the input's own when the data have only one).
    n_passes : N, stochastic passes (>= 1).
    seed : seed of the passes' draws; the result is a pure function of it.
    rule : ``"auto"`` (per likelihood), one of :data:`RULES`, or {modality: rule}.
    threshold : the ``state`` rule's decision threshold (default 0.5).
    margin : robustness margin (default per rule, :data:`DEFAULT_MARGINS`), or {modality: margin}.
    pseudocount : the ``fold`` rule's pseudocount (counts).
    interval : central probability of the ``shift_low``/``shift_high`` interval.
    include_perturbed : keep the perturbed feature among its modality's outputs.

    Returns a :class:`PerturbationResult`. Raises InputError (naming the argument and the fix)
    for an unknown cell, feature, modality or cell type, a cell lacking the input modality, a
    negative value for a count modality, or a bad number of passes, rule or margin.
    """
    n_passes = int(n_passes)
    if n_passes < 1:
        raise InputError("<arguments>", "n_passes", f"must be >= 1, got {n_passes}",
                         "give a positive number of passes with --passes (n_passes= in Python)")
    if not 0.0 < float(interval) < 1.0:
        raise InputError("<arguments>", "interval", f"must be in (0, 1), got {interval}", "e.g. 0.95")
    value = float(value)
    if not np.isfinite(value):
        raise InputError("<arguments>", "value", f"must be a finite number, got {value}",
                         "give the new value with --value (value= in Python)")
    in_mod = _modality_of(dataset, feature, input_modality, "input_modality", "feature")
    k = _feature_position(dataset, in_mod, feature)
    if in_mod not in dataset.spec.continuous_modalities and value < 0:
        raise InputError("<arguments>", "value", f"{value} is negative, but modality {in_mod!r} holds raw counts",
                         "give a count >= 0 with --value (value= in Python)")

    if cell is not None and cell_type is not None:
        raise InputError("<arguments>", "cell", "both a cell and a cell type were given",
                         "give either --cell, or --cell-type with --label-key and --markers")
    if cell is None:
        if cell_type is None:
            raise InputError("<arguments>", "cell", "no cell given",
                             "give --cell ID, or --cell-type T --label-key KEY --markers M1,M2 "
                             "(cell= or cell_type=, label_key=, markers= in Python)")
        if markers is None:
            raise InputError("<arguments>", "markers", "a cell type needs marker features to choose its cell",
                             "give them with --markers M1,M2 (markers= in Python)")
        cell = representative_cell(dataset, cell_type, label_key, markers)
        score = float(marker_scores(dataset, markers, cells=[_cell_position(dataset, cell)]).iloc[0])
        marker_list = markers.split(",") if isinstance(markers, str) else list(markers)
        selection = {"cell_type": str(cell_type), "label_key": label_key,
                     "markers": [m.strip() for m in marker_list], "marker_score": score}
    else:
        selection = {"cell": str(cell)}
    pos = _cell_position(dataset, cell)

    if output_modalities is None:
        others = [m for m in dataset.modalities if m != in_mod]
        outs = others or [in_mod]
    else:
        outs = [output_modalities] if isinstance(output_modalities, str) else list(output_modalities)
        for m in outs:
            if m not in dataset.modalities:
                raise InputError(dataset.source, "output_modalities", f"unknown modality {m!r}",
                                 f"use one of {dataset.modalities} with --output-modality "
                                 "(output_modalities= in Python)")
        outs = list(dict.fromkeys(outs))

    rules = _resolve(rule, "rule", outs)
    margins = _resolve(margin, "margin", outs)

    batch = dataset.batch(np.array([pos]))
    if not bool(batch.present[in_mod][0]):
        raise InputError(dataset.source, "cell", f"cell {str(cell)!r} was not measured in modality {in_mod!r}",
                         "choose a cell measured in the perturbed feature's modality")
    original = float(batch.x[in_mod][0, k])
    x = batch.x[in_mod].clone()
    x[0, k] = value
    perturbed = dataclasses.replace(batch, x={**batch.x, in_mod: x})

    was_training = model.training
    model.eval()
    seeds = np.random.SeedSequence(int(seed)).generate_state(n_passes)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(int(seeds[0]))
            base = _pass(model, batch, outs, posterior_mean(model.guide))
            pert = {m: [] for m in outs}
            null = {m: [] for m in outs}
            for s in seeds:
                torch.manual_seed(int(s))
                one = _pass(model, perturbed, outs, model.guide)
                torch.manual_seed(int(s))
                zero = _pass(model, batch, outs, model.guide)
                for m in outs:
                    pert[m].append(one[m])
                    null[m].append(zero[m])
    finally:
        model.train(was_training)

    applied, parts = {}, []
    lo_q, hi_q = (1 - float(interval)) / 2, 1 - (1 - float(interval)) / 2
    for m in outs:
        b = base[m].numpy()
        v = torch.stack(pert[m]).numpy()
        v0 = torch.stack(null[m]).numpy()
        r = _rule_of(base[f"__fn_{m}"]) if rules[m] == "auto" else rules[m]
        if r not in RULES:
            raise InputError("<arguments>", "rule", f"unknown rule {r!r}", f"use 'auto' or one of {RULES}")
        mg = DEFAULT_MARGINS[r] if margins[m] is None else float(margins[m])
        if not mg >= 0:
            raise InputError("<arguments>", "margin", f"must be >= 0, got {mg}", "give a non-negative margin")
        t = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        sd = _sd(base[f"__fn_{m}"]) if r == "shift" else None
        sd = np.ones_like(b) if sd is None else np.broadcast_to(sd.expand(batch.x[m].shape)[0].double().numpy(),
                                                                 b.shape)
        sd = np.where(sd > 0, sd, 1.0)
        opts = dict(threshold=t, margin=mg, pseudocount=float(pseudocount), sd=sd)
        gained, lost, stat = _changes(r, v, b, **opts)
        g0, l0, _ = _changes(r, v0, b, **opts)
        shift = v - v0
        applied[m] = {"rule": r, "margin": mg, **({"threshold": t} if r == "state" else {}),
                      **({"pseudocount": float(pseudocount)} if r == "fold" else {})}
        part = pd.DataFrame({
            "feature": np.asarray(dataset.feature_names[m]).astype(str),
            "modality": m,
            "frequency": (gained | lost).mean(0),
            "gained": gained.mean(0),
            "lost": lost.mean(0),
            "n_changed": (gained | lost).sum(0).astype(int),
            "null_frequency": (g0 | l0).mean(0),
            "baseline": b,
            "perturbed_mean": v.mean(0),
            "mean_shift": shift.mean(0),
            "shift_low": np.quantile(shift, lo_q, axis=0),
            "shift_high": np.quantile(shift, hi_q, axis=0),
            "effect": stat.mean(0),
            "rule": r,
        })
        if m == in_mod and not include_perturbed:
            part = part.drop(index=k)
        parts.append(part)
    table = pd.concat(parts, ignore_index=True)
    order = np.lexsort((-table["effect"].abs().to_numpy(), -table["frequency"].to_numpy()))
    table = table.iloc[order].reset_index(drop=True)
    table["rank"] = np.arange(1, len(table) + 1)
    return PerturbationResult(table=table[TABLE_COLUMNS], cell=str(dataset.obs_names[pos]), feature=str(feature),
                              input_modality=in_mod, original_value=original, value=value, n_passes=n_passes,
                              seed=int(seed), rules=applied, selection=selection)


def _resolve(setting, name: str, outs: list[str]) -> dict:
    """A per-modality setting from one value or a {modality: value} dict."""
    if isinstance(setting, dict):
        unknown = sorted(set(setting) - set(outs))
        if unknown:
            raise InputError("<arguments>", name, f"modalities {unknown} are not scored (outputs: {outs})",
                             f"give {name} for the output modalities only")
        default = "auto" if name == "rule" else None
        return {m: setting.get(m, default) for m in outs}
    return {m: setting for m in outs}


# ------------------------------------------------------------------------------------ figure
def plot_perturbation(result: PerturbationResult, path=None, *, top: int = 20):
    """Horizontal bar chart of the ``top`` features by rank: bar length is the change frequency
    f_j, split into the passes where the prediction gained (blue) and lost (red) its state;
    a black tick marks each feature's null frequency (unperturbed passes). Features that never
    changed are left out. Writes a PNG at ``path`` when given; returns the Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = result.table[result.table["frequency"] > 0].head(int(top))
    height = 1.2 + 0.28 * max(len(shown), 4)
    fig = Figure(figsize=(8.5, height))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    multi = result.table["modality"].nunique() > 1
    labels = [f"{f} ({m})" if multi else str(f) for f, m in zip(shown["feature"], shown["modality"])]
    y = np.arange(len(shown))[::-1]
    if len(shown):
        ax.barh(y, shown["gained"], color="tab:blue", label="gained")
        ax.barh(y, shown["lost"], left=shown["gained"], color="tab:red", label="lost")
        ax.scatter(shown["null_frequency"], y, marker="|", s=120, color="black", zorder=3,
                   label="unperturbed passes")
        ax.set_yticks(y, labels, fontsize=8)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no output changed state in any pass", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0, 1.0)
    ax.set_xlabel(f"change frequency f = c / N (N = {result.n_passes} passes)")
    outs = ", ".join(sorted(result.rules))
    ax.set_title(f"{result.feature} ({result.input_modality}) {result.original_value:g} -> {result.value:g} in "
                 f"cell {result.cell}: top {len(shown)} {outs} features", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
