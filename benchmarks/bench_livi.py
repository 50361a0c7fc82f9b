"""Throughput and peak memory of LIVI training, per stage, and the overhead of Pyro.

For each data size (cells x genes) the benchmark simulates counts with
:func:`pyro_livi.simulate.simulate` (kept as a sparse CSR matrix in the dataset), then

1. trains LIVI with the real :class:`~pyro_livi.infer.Trainer` through
   :func:`~pyro_livi.models.livi_stages` (``vae`` stage, then ``donor`` stage with the VAE
   frozen) for ``--epochs`` epochs per stage and reads the per-epoch cells/s it records;
2. trains the same computation written as a plain PyTorch loss (no Pyro): encoder,
   reparameterised c, analytic KL, NB log-likelihood, the donor prior terms and the two
   penalties, with the same trainable and frozen parameters, starting learning rates and
   minibatches;
3. times the minibatch loader alone (CSR rows -> dense batch), the floor of both.

Before timing, the plain loss is checked against Pyro's (same parameters, same noise) in both
stages; the run stops if they differ. Throughput is reported as wall-clock cells/s (what a user
sees) and as cells per CPU-second of the process (less sensitive to other load on a shared
machine). Peak memory is measured per stage: the peak resident set size (Linux ``VmHWM``, reset
through ``/proc/self/clear_refs`` before each epoch; without it the growth of ``ru_maxrss``)
minus the resident size before training, and on CUDA ``torch.cuda.max_memory_allocated``.
(``tracemalloc`` does not see torch's tensor allocations, so it is not used.) The simulated
data of each size is written once to a temporary ``.h5ad``; the Pyro and the plain runs each
read it in their own subprocess, so that they do not share memory peaks or warm caches.

A second table splits the time of one loss + backward on one batch (CPU ms) between Pyro's
distribution validation, the NB evaluated with theta expanded to (B, G) (the cost of evaluating
``lgamma(theta)`` once per cell instead of once per gene) and the plain loss.
Prints markdown.

Example::

    python benchmarks/bench_livi.py                      # 10000x1000 and 50000x2000, CPU
    python benchmarks/bench_livi.py --sizes 2000x500 --epochs 2 --threads 1
    python benchmarks/bench_livi.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model

import torch
from torch import nn

KIB = 1024


# ------------------------------------------------------------------------------ machine
def machine_description(device: str) -> dict:
    """CPU model, core count, library versions, torch threads, load average, GPU name."""
    cpu = cpu_model()
    import pyro

    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "pyro": pyro.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


# ------------------------------------------------------------------------------ memory
class PeakMemory:
    """Peak memory between :meth:`reset` and :meth:`read`.

    CPU: peak resident set size in bytes (``VmHWM`` of ``/proc/self/status``, whose peak
    ``/proc/self/clear_refs`` resets; where that is not possible, ``ru_maxrss``, which can
    only grow, so a later stage then reports at least the peak of an earlier one).
    CUDA: ``torch.cuda.max_memory_allocated`` in bytes.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.device = torch.device(device)
        self.can_reset = self._try_reset()
        self.source = "VmHWM" if self.can_reset else "ru_maxrss"

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "VmHWM" in Path("/proc/self/status").read_text()
        except OSError:
            return False

    @staticmethod
    def _status_kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def current_rss(self) -> int:
        """Resident set size now, bytes (falls back to the peak where /proc is absent)."""
        try:
            return self._status_kib("VmRSS") * KIB
        except (OSError, KeyError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB

    def reset(self) -> None:
        if self.can_reset:
            self._try_reset()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict:
        if self.can_reset:
            rss = self._status_kib("VmHWM") * KIB
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB
        out = {"peak_rss": rss}
        if self.cuda:
            torch.cuda.synchronize(self.device)
            out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(self.device)
        return out


# ------------------------------------------------------------------------------ plain PyTorch LIVI
class PlainEncoder(nn.Module):
    """The architecture of :class:`pyro_livi.nn.GaussianEncoder` in plain torch (same state-dict keys)."""

    def __init__(self, n_in: int, n_latent: int, hidden):
        super().__init__()
        layers, width = [], n_in
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.LayerNorm(h)]
            width = h
        self.body = nn.Sequential(*layers)
        self.last = nn.Linear(width, width)
        self.loc_head = nn.Linear(width, n_latent)
        self.log_scale_head = nn.Linear(width, n_latent)

    def forward(self, x):
        h = self.last(self.body(torch.log1p(x)))
        return self.loc_head(h), self.log_scale_head(h).exp() + 1e-4


def _softplus(x):
    return torch.logaddexp(x, torch.zeros_like(x))


def nb_log_prob(x, mu, theta):
    """log NB(x; mean mu, inverse dispersion theta), elementwise (B, G)."""
    delta = torch.log(mu) - torch.log(theta)
    return (torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
            - theta * _softplus(delta) - x * _softplus(-delta))


class PlainLIVI(nn.Module):
    """LIVI's negative ELBO + penalties as one plain PyTorch loss (softmax link, NB likelihood,
    point-mass donor guide, no covariates, no batch norm), with the parameters of a
    :class:`pyro_livi.models.LIVI` copied in.

    ``loss(batch, donor=False)`` is the VAE stage (cell-state terms only); ``donor=True`` adds
    V, D, the interaction and the penalties. Terms over cells are scaled by n_cells / B as the
    cell plate does; donor terms are not scaled.
    """

    def __init__(self, livi):
        super().__init__()
        cfg = livi.config
        if cfg["likelihood"] != "nb" or cfg["link"] != "softmax" or cfg["donor_guide"] != "delta" \
                or cfg["n_covariate_categories"] or cfg["batch_norm"] or cfg["encoder_input"] != "log1p":
            raise ValueError("PlainLIVI mirrors LIVI with likelihood='nb', link='softmax', "
                             "donor_guide='delta', log1p encoder input, no covariates, no batch norm")
        self.encoder = PlainEncoder(cfg["n_genes"], cfg["n_cell_state"], cfg["encoder_hidden"])
        self.encoder.load_state_dict(livi.encoder.state_dict())
        copy = lambda t: nn.Parameter(t.detach().clone())  # noqa: E731
        self.W_C, self.W_DxC, self.W_V = copy(livi.W_C), copy(livi.W_DxC), copy(livi.W_V)
        self.A_logits, self.D, self.V = copy(livi.A_logits), copy(livi.D_loc), copy(livi.V_loc)
        self.log_theta = copy(livi.lik_rna_log_theta)
        self.l1_weight, self.a_weight = livi.l1_weight, livi.a_weight
        #: evaluate the NB with theta materialised as (B, G), i.e. lgamma(theta) once per cell
        #: (only for the step-time breakdown)
        self.broadcast_theta = False

    def groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups named as in LIVI.param_groups."""
        return {"encoder": list(self.encoder.parameters()),
                "cell_state": [self.W_C, self.log_theta],
                "persistent": [self.V, self.W_V],
                "interaction": [self.D, self.A_logits, self.W_DxC]}

    def loss(self, batch, donor: bool = False) -> torch.Tensor:
        x, sf = batch.x["rna"], batch.size_factor["rna"]
        scale = batch.n_cells / x.shape[0]
        loc, sd = self.encoder(x)
        c = torch.distributions.Normal(loc, sd).rsample()  # same draw as Pyro's guide for one seed
        kl_c = (0.5 * (loc ** 2 + sd ** 2 - 1.0) - torch.log(sd)).sum()
        s = torch.softmax(c, dim=-1)
        logits = s @ self.W_C
        loss = scale * kl_c
        if donor:
            A = torch.sigmoid(self.A_logits)
            logits = logits + ((s @ A) * self.D[batch.donor]) @ self.W_DxC + self.V[batch.donor] @ self.W_V
            # -log N(v; 0, I) and -log N(d; 0, I): the KL of a point-mass guide to the prior
            half_log_2pi = 0.5 * torch.log(torch.tensor(2 * torch.pi))
            loss = loss + (0.5 * self.D ** 2 + half_log_2pi).sum() + (0.5 * self.V ** 2 + half_log_2pi).sum()
            loss = loss + batch.n_cells * (self.l1_weight * self.W_DxC.abs().sum()
                                           + self.a_weight * ((A * (1 - A)) ** 2).sum())
        mu = torch.softmax(logits, dim=-1) * sf[:, None]
        theta = self.log_theta.exp()
        if self.broadcast_theta:
            theta = theta.expand_as(mu)
        return loss - scale * nb_log_prob(x, mu, theta).sum()


def check_plain_matches_pyro(model, plain, batch, seed: int = 123) -> dict:
    """Relative difference between Pyro's negative ELBO (``elbo_terms``) and the plain loss,
    per stage, for the same parameters and the same draw of c. Raises if above 1e-4."""
    import pyro

    from pyro_livi.infer import elbo_terms

    out = {}
    for stage, components in (("vae", set()), ("donor", {"persistent", "interaction"})):
        model.components = components
        pyro.set_rng_seed(seed)
        with torch.no_grad():
            ref = float(sum(elbo_terms(model.model, model.guide, batch).values()))
        pyro.set_rng_seed(seed)
        with torch.no_grad():
            val = float(plain.loss(batch, donor=stage == "donor"))
        out[stage] = abs(val - ref) / abs(ref)
        if out[stage] > 1e-4:
            raise RuntimeError(f"plain PyTorch loss {val} != Pyro loss {ref} in stage {stage}")
    model.components = set(model.components_all)
    return out


def step_breakdown(model, plain, batch, repeats: int, device: str) -> dict:
    """Median milliseconds (CPU time; wall time, synchronised, on CUDA) of one loss + backward
    on one batch, every parameter trainable,
    per stage, for: the Pyro loss (``elbo_terms``) as the Trainer runs it (Pyro's distribution
    validation on, its default); the same without validation; the plain loss with theta
    expanded to (B, G) before the NB; the plain loss. The variants run interleaved."""
    import pyro
    from pyro.distributions.util import is_validation_enabled

    from pyro_livi.infer import elbo_terms

    model.to(device), plain.to(device)
    batch = batch.to(device)
    validation = is_validation_enabled()

    def pyro_step(valid):
        pyro.enable_validation(valid)
        sum(elbo_terms(model.model, model.guide, batch).values()).backward()

    def plain_step(donor, broadcast):
        plain.broadcast_theta = broadcast
        plain.loss(batch, donor=donor).backward()

    out = {}
    try:
        for stage, components in (("vae", set()), ("donor", {"persistent", "interaction"})):
            model.components = components
            donor = stage == "donor"
            variants = {"pyro": lambda: pyro_step(True), "pyro_no_validation": lambda: pyro_step(False),
                        "plain_broadcast_theta": lambda: plain_step(donor, True),
                        "plain": lambda: plain_step(donor, False)}
            times = {k: [] for k in variants}
            clock = time.perf_counter if device.startswith("cuda") else time.process_time
            for r in range(repeats + 2):  # two warm-up rounds
                for name, step in variants.items():
                    start = clock()
                    step()
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    if r >= 2:
                        times[name].append(1000 * (clock() - start))
            out[stage] = {k: statistics.median(v) for k, v in times.items()}
    finally:
        pyro.enable_validation(validation)
        plain.broadcast_theta = False
        model.components = set(model.components_all)
        for module in (model, plain):
            module.zero_grad(set_to_none=True)
            module.to("cpu")
    return out


# ------------------------------------------------------------------------------ timing
def _steady(values: list[float]) -> float:
    """Median over epochs, leaving out the first (warm-up) when there are several."""
    return statistics.median(values[1:] if len(values) > 1 else values)


def time_trainer(model, dataset, args, memory: PeakMemory) -> dict:
    """cells/s and peak memory per stage from the real Trainer with livi_stages."""
    from pyro_livi.infer import Trainer, TrainingConfig
    from pyro_livi.models import livi_stages

    stages = livi_stages(args.epochs, args.epochs, patience=10 ** 9)
    peaks: dict[str, list[dict]] = {}
    cpu: dict[str, list[float]] = {}
    clock = {"last": 0.0}

    def on_epoch(trainer, record):
        now = time.process_time()
        cpu.setdefault(record["stage"], []).append(now - clock["last"])
        peaks.setdefault(record["stage"], []).append(memory.read())
        memory.reset()
        clock["last"] = time.process_time()

    config = TrainingConfig(batch_size=args.batch_size, seed=args.seed, device=args.device, progress=False)
    trainer = Trainer(model, dataset, stages, config, callbacks=[on_epoch])
    memory.reset()
    clock["last"] = time.process_time()
    history = trainer.fit()
    out = {}
    for stage, rows in history.groupby("stage", sort=False):
        out[stage] = {"cells_per_s": _steady(rows["cells_per_s"].tolist()),
                      "cells_per_cpu_s": _steady([dataset.n_cells / t for t in cpu[stage]]),
                      "epochs": len(rows),
                      **{k: max(p[k] for p in peaks[stage]) for k in peaks[stage][0]}}
    return out


def time_plain(plain, dataset, args, memory: PeakMemory) -> dict:
    """The same stages, epochs and minibatches (MinibatchLoader order of each epoch) in plain PyTorch."""
    from pyro_livi.data import MinibatchLoader
    from pyro_livi.infer import TrainingConfig
    from pyro_livi.models import livi_stages

    device = torch.device(args.device)
    plain.to(device)
    lrs = TrainingConfig()
    group_lr = livi_stages(1, 1)[0].group_lr
    loader = MinibatchLoader(dataset, batch_size=args.batch_size, shuffle=True, seed=args.seed)
    groups = plain.groups()
    out, epoch = {}, 0
    for stage, train in (("vae", ("encoder", "cell_state")), ("donor", ("persistent", "interaction"))):
        for name, params in groups.items():
            for p in params:
                p.requires_grad_(name in train)
                p.grad = None
        optimizer = torch.optim.Adam([{"params": groups[g], "lr": group_lr.get(g, lrs.lr)} for g in train])
        rates, cpu_rates, peaks = [], [], []
        for _ in range(args.epochs):
            loader.set_epoch(epoch)
            memory.reset()
            start, cpu_start = time.perf_counter(), time.process_time()
            for batch in loader:
                batch = batch.to(device)
                loss = plain.loss(batch, donor=stage == "donor")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss.item()
            rates.append(dataset.n_cells / (time.perf_counter() - start))
            cpu_rates.append(dataset.n_cells / (time.process_time() - cpu_start))
            peaks.append(memory.read())
            epoch += 1
        out[stage] = {"cells_per_s": _steady(rates), "cells_per_cpu_s": _steady(cpu_rates), "epochs": args.epochs,
                      **{k: max(p[k] for p in peaks) for k in peaks[0]}}
    return out


def time_loader(dataset, args) -> float:
    """cells/s of building (and moving to the device) the minibatches alone."""
    from pyro_livi.data import MinibatchLoader

    loader = MinibatchLoader(dataset, batch_size=args.batch_size, shuffle=True, seed=args.seed)
    rates = []
    for epoch in range(max(2, args.epochs)):
        loader.set_epoch(epoch)
        start = time.perf_counter()
        for batch in loader:
            batch.to(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(dataset.n_cells / (time.perf_counter() - start))
    return _steady(rates)


# ------------------------------------------------------------------------------ one size
def simulate_to_file(n_cells: int, n_genes: int, path: Path, args) -> dict:
    """Simulate n_cells (rounded to whole donors) x n_genes, write them as .h5ad (CSR counts)."""
    import scipy.sparse as sp

    from pyro_livi.simulate import SimulationConfig, simulate

    n_donors = max(2, round(n_cells / args.cells_per_donor))
    config = SimulationConfig(n_donors=n_donors, cells_per_donor=n_cells / n_donors,
                              vary_cells_per_donor=False, n_genes=n_genes, n_snps=100)
    start = time.perf_counter()
    adata = simulate(config, seed=args.seed).adata
    seconds = time.perf_counter() - start
    if not sp.issparse(adata.X) or adata.X.format != "csr":
        raise TypeError(f"expected CSR counts, got {type(adata.X).__name__}")
    del adata.layers["counts"]  # the same matrix as .X
    adata.write_h5ad(path)
    return {"n_cells": adata.n_obs, "n_genes": adata.n_vars, "n_donors": n_donors,
            "density": adata.X.nnz / (adata.n_obs * adata.n_vars), "simulate_s": seconds}


def run_engine(path: Path, engine: str, args) -> dict:
    """Train one engine ("pyro": the Trainer, plus the loader timing and the plain-vs-Pyro
    check; "plain": the plain PyTorch loss) on the data at ``path``, in this process."""
    import pyro

    from pyro_livi.data import DatasetSpec, read_dataset
    from pyro_livi.models import LIVI

    dataset = read_dataset(path, DatasetSpec(modalities={"rna": None}, donor_key="donor"))
    n_genes = dataset.n_features["rna"]
    pyro.set_rng_seed(args.seed)
    model = LIVI(n_genes, len(dataset.donor_index), n_cell_state=args.n_cell_state, n_dxc=args.n_dxc,
                 n_persistent=args.n_persistent, encoder_hidden=args.encoder_hidden,
                 counts_sample=dataset.counts_sample("rna"))
    memory = PeakMemory(args.device)
    out = {"memory_source": memory.source}
    # Identical work in both engines' processes before the memory baseline (one loss of each
    # kind, one pass of the loader), so that the baseline includes the same warm-up.
    plain = PlainLIVI(model)
    first = dataset.batch(range(min(args.batch_size, dataset.n_cells)))
    out["check"] = check_plain_matches_pyro(model, plain, first)
    out["loader_cells_per_s"] = time_loader(dataset, args)
    # the first Adam of a process costs about a second of one-off imports; keep it out of the
    # first epoch's CPU time (the Trainer builds its optimiser inside fit)
    torch.optim.Adam([nn.Parameter(torch.zeros(1))])
    if not args.validation:
        pyro.enable_validation(False)
    if engine == "pyro":
        out["baseline_rss"] = memory.current_rss()
        stages = time_trainer(model, dataset, args, memory)
        if args.breakdown:  # after the measured training, so that it does not move the baseline
            out["breakdown_ms"] = step_breakdown(model, plain, first, args.breakdown, args.device)
    else:
        del model
        out["baseline_rss"] = memory.current_rss()
        stages = time_plain(plain, dataset, args, memory)
    for v in stages.values():
        v["peak_rss_delta"] = v["peak_rss"] - out["baseline_rss"]
    out["stages"] = stages
    return out


# ------------------------------------------------------------------------------ report
def markdown_table(results: list[dict], args) -> str:
    """One row per size and stage. Wall-clock cells/s is what a user sees; cells per CPU-second
    (process CPU time) is less sensitive to other load on a shared machine. The Pyro / plain
    ratios are times per cell (> 1: the Pyro path is slower)."""
    mib = lambda b: f"{b / KIB ** 2:,.0f}"  # noqa: E731
    cuda = args.device.startswith("cuda")
    head = ["cells x genes", "stage", "Pyro cells/s", "plain cells/s", "Pyro / plain (wall)",
            "Pyro cells/CPU-s", "plain cells/CPU-s", "Pyro / plain (CPU)", "loader only cells/s",
            "peak RSS +MiB Pyro", "peak RSS +MiB plain"]
    if cuda:
        head += ["CUDA peak MiB Pyro", "CUDA peak MiB plain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        for stage in ("vae", "donor"):
            p, q = r["pyro"][stage], r["plain"][stage]
            row = [f"{r['n_cells']:,} x {r['n_genes']:,}", stage,
                   f"{p['cells_per_s']:,.0f}", f"{q['cells_per_s']:,.0f}",
                   f"{q['cells_per_s'] / p['cells_per_s']:.2f}",
                   f"{p['cells_per_cpu_s']:,.0f}", f"{q['cells_per_cpu_s']:,.0f}",
                   f"{q['cells_per_cpu_s'] / p['cells_per_cpu_s']:.2f}",
                   f"{r['pyro_loader_cells_per_s']:,.0f}",
                   mib(p["peak_rss_delta"]), mib(q["peak_rss_delta"])]
            if cuda:
                row += [mib(p["cuda_peak_allocated"]), mib(q["cuda_peak_allocated"])]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def breakdown_table(results: list[dict]) -> str:
    """Median CPU ms of one loss + backward on one batch (every parameter trainable)."""
    head = ["cells x genes", "stage", "Pyro", "Pyro, validation off", "plain, theta expanded to (B, G)", "plain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        b = r.get("pyro_breakdown_ms")
        if not b:
            continue
        for stage in ("vae", "donor"):
            t = b[stage]
            lines.append("| " + " | ".join([f"{r['n_cells']:,} x {r['n_genes']:,}", stage] + [
                f"{t[k]:.1f}" for k in ("pyro", "pyro_no_validation", "plain_broadcast_theta", "plain")]) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def parse_size(text: str) -> tuple[int, int]:
    try:
        cells, genes = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected CELLSxGENES, e.g. 10000x1000") from None
    if cells < 2 or genes < 2:
        raise argparse.ArgumentTypeError(f"size {text!r}: need at least 2 cells and 2 genes")
    return cells, genes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["10000x1000", "50000x2000"],
                   help="data sizes CELLSxGENES (default: 10000x1000 50000x2000)")
    p.add_argument("--epochs", type=int, default=2,
                   help="epochs per stage; with more than one the first is a warm-up left out of cells/s (default 2)")
    p.add_argument("--batch-size", type=int, default=1024, help="cells per minibatch (default 1024, the paper's)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--cells-per-donor", type=float, default=100.0, help="cells per simulated donor (default 100)")
    p.add_argument("--n-cell-state", type=int, default=15, help="K_C (default 15)")
    p.add_argument("--n-dxc", type=int, default=100, help="K_DxC (default 100)")
    p.add_argument("--n-persistent", type=int, default=5, help="K_V (default 5)")
    p.add_argument("--encoder-hidden", type=int, nargs="+", default=[128], help="encoder widths (default 128)")
    p.add_argument("--no-validation", dest="validation", action="store_false",
                   help="switch Pyro's distribution validation off in the Trainer run (default: on, Pyro's default)")
    p.add_argument("--breakdown", type=int, default=10, metavar="N",
                   help="repeats of the per-step CPU-time breakdown on one batch (0: skip; default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write all numbers to this JSON file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: PATH::ENGINE in this process
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    for size in args.sizes:
        parse_size(size)
    if args.epochs < 1 or args.batch_size < 1:
        raise SystemExit("--epochs and --batch-size must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available in this torch build / machine")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.one is not None:  # child process: one engine on one data file
        path, engine = args.one.split("::")
        print(json.dumps(run_engine(Path(path), engine, args)))
        return

    forwarded = list(argv if argv is not None else sys.argv[1:])
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_livi_") as tmp:
        for size in args.sizes:
            n_cells, n_genes = parse_size(size)
            path = Path(tmp) / f"{n_cells}x{n_genes}.h5ad"
            result = {"size": size, **simulate_to_file(n_cells, n_genes, path, args)}
            for engine in ("pyro", "plain"):
                child = subprocess.run([sys.executable, __file__, *forwarded, "--one", f"{path}::{engine}"],
                                       stdout=subprocess.PIPE, text=True, check=True)
                report = json.loads(child.stdout.strip().splitlines()[-1])
                result[engine] = report.pop("stages")
                result.update({f"{engine}_{k}": v for k, v in report.items()})
            path.unlink()
            results.append(result)
            print(f"done {size}", file=sys.stderr, flush=True)

    info = machine_description(args.device)
    print(f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, pyro {info['pyro']}, "
          f"python {info['python']}; device {args.device}" + (f" ({info['gpu']})" if "gpu" in info else "")
          + f"; torch threads {info['torch_threads']}; 1-min load average at the end {info['load_average_1min']:.1f}")
    print("Pyro distribution validation in the Trainer run: " + ("on (default)" if args.validation else "off"))
    print(f"Model: K_C {args.n_cell_state}, K_DxC {args.n_dxc}, K_V {args.n_persistent}, encoder "
          f"{args.encoder_hidden}, NB likelihood; batch {args.batch_size}; {args.epochs} epoch(s) per stage"
          + (" (median over epochs after the first)" if args.epochs > 1 else ""))
    for r in results:
        print(f"{r['size']}: {r['n_cells']:,} cells, {r['n_donors']} donors, "
              f"{r['density']:.0%} non-zero (CSR); plain vs Pyro loss, relative difference "
              f"vae {r['pyro_check']['vae']:.1e}, donor {r['pyro_check']['donor']:.1e}; memory from "
              f"{r['pyro_memory_source']}; resident size before training (data + model) "
              f"{r['pyro_baseline_rss'] / KIB ** 2:,.0f} MiB (Pyro process), "
              f"{r['plain_baseline_rss'] / KIB ** 2:,.0f} MiB (plain process)")
    print()
    print(markdown_table(results, args))
    breakdown = breakdown_table(results)
    if breakdown:
        unit = "wall-clock ms (synchronised)" if args.device.startswith("cuda") else "CPU ms"
        print(f"\n{unit} per loss + backward on one batch of {args.batch_size} cells (median of "
              f"{args.breakdown}; every parameter trainable):\n")
        print(breakdown)
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, "args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
