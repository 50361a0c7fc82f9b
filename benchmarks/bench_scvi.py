"""Side-by-side benchmark of the zoo's scVI-like model (``model="scvi"``) and scvi-tools' SCVI.

Needs a separate environment with scvi-tools (never a dependency of the package)::

    python3.11 -m venv /work/venv-scvi
    /work/venv-scvi/bin/pip install torch==2.13.0          # first: the CPU wheel
    /work/venv-scvi/bin/pip install scvi-tools==1.4.2
    /work/venv-scvi/bin/pip install -e .
    /work/venv-scvi/bin/python benchmarks/bench_scvi.py

For each dataset (OneK1K 40 donors, 7,811 cells x 1,000 genes; the RNA modality of the 10x
PBMC 10k CITE-seq set, 6,855 cells x 4,000 genes; raw counts in ``.X`` of both), it

* splits the cells once, 90% train / 10% test, with a fixed seed
  (:func:`pyro_livi.analysis.heldout.split_cells`); both tools see the same cells;
* trains both tools with the same settings: n_latent, n_layers, n_hidden, dropout, epochs,
  batch size, Adam learning rate, no weight decay, NB likelihood with one inverse dispersion
  per gene, no KL warm-up (scvi-tools' default warms the KL weight up over 400 epochs; it is
  switched off), no early stopping, no validation set, the same number of torch threads;
* interleaves the two tools so that both see the same machine load: by default
  (``--mode alternate``) both train in one fresh subprocess per repeat with strictly alternating
  epochs (ours epoch 1, scvi-tools epoch 1, ours epoch 2, ...: ours runs in a second Python
  thread and the turn is handed over through semaphores, so only one tool computes at any time);
  with ``--mode separate`` each fit runs in its own subprocess, ``ours, scvi-tools, ours, ...``.
  ``--repeats`` repeats (training seed = repeat index); imports and data loading are not timed;
* measures training throughput as training cells per second of wall time over epochs 2..E
  (the first epoch is a warm-up): for ours from the per-epoch ``cells_per_s`` of the history
  (wall time of each epoch, minibatch building included), for scvi-tools from a Lightning
  callback (wall time from the start of epoch 2 to the end of training, which also covers
  Lightning's per-epoch hooks);
* computes the held-out reconstruction NLL per cell on the test cells with ONE function for
  both tools: -log NB(x | mu, theta) summed over genes, averaged over test cells, in float64,
  with mu = library size * rho(z) and theta the per-gene inverse dispersion read from each
  tool's own decoder output (our model's ``obs_rna`` site; scvi-tools' ``module.generative``
  ``px``), at z = the encoder's posterior mean ("plug-in") and as the expectation over S draws
  of z from q ("E_q"); as references it also prints our package's own
  ``heldout_nll`` and scvi-tools' own ``get_reconstruction_error``;
* probes the latents (posterior means of all cells) for cell types where the data has them:
  standardised features, multinomial logistic regression, 5-fold stratified CV (the same folds
  for both tools), mean accuracy;
* in ``--mode separate`` only, records the peak resident memory of the training (Linux
  ``VmHWM`` reset before training) above the resident size before training.

Prints one markdown table per dataset, and writes every number with ``--json FILE``.

Options: ``--epochs`` (default 30), ``--repeats`` (2), ``--threads`` (2), ``--samples`` (S, 20),
``--datasets onek1k pbmc10k``, ``--mode alternate|separate``. Diagnostics that change the
scvi-tools side only (not for the headline comparison): ``--scvi-adam-eps`` (default: its own,
0.01; our trainer uses torch's default 1e-8), ``--scvi-dispersion-init C`` (set its per-gene log
inverse dispersions to C before training; its default draws them from N(0, 1), ours starts at 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model

import numpy as np

DATA = Path(os.environ.get("PYRO_LIVI_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DATASETS = {
    "onek1k": {"path": DATA / "donors" / "onek1k_40donors_7811cells.h5ad", "modality": None,
               "label": "cell_type", "title": "OneK1K 40 donors (7,811 cells x 1,000 genes)"},
    "pbmc10k": {"path": DATA / "citeseq" / "pbmc10k_cite.h5mu", "modality": "rna",
                "label": None, "title": "10x PBMC 10k CITE-seq, RNA modality (6,855 cells x 4,000 genes)"},
}
TOOLS = ("ours", "scvi-tools")


# ------------------------------------------------------------------------------ memory
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ data
def load_anndata(name: str):
    """The dataset's count AnnData (raw counts in .X), read in memory."""
    import anndata as ad

    info = DATASETS[name]
    if info["modality"] is None:
        adata = ad.read_h5ad(info["path"])
    else:
        import mudata as md

        adata = md.read_h5mu(info["path"])[info["modality"]].copy()
    adata.X = adata.X.astype(np.float32)
    return adata


def split(adata, test_fraction: float, seed: int):
    from pyro_livi.analysis.heldout import split_cells

    train, test = split_cells(adata.n_obs, test_fraction=test_fraction, seed=seed)
    return train, test


# ------------------------------------------------------------------------------ the one NLL
def nb_nll(x, mu, theta):
    """-log NB(x | mean mu, inverse dispersion theta), elementwise, float64 (the same code for
    both tools)."""
    import torch

    x, mu, theta = x.double(), mu.double(), theta.double()
    log_theta_mu = torch.log(theta + mu)
    ll = (torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1.0)
          + theta * (torch.log(theta) - log_theta_mu) + x * (torch.log(mu) - log_theta_mu))
    return -ll


class NLLAccumulator:
    """Sums -log p per cell (over genes) for the plug-in and the E_q estimates."""

    def __init__(self):
        self.plugin = []
        self.expected = []

    def add(self, x, mu_plugin, theta, mu_draws):
        self.plugin.append(nb_nll(x, mu_plugin, theta).sum(-1))
        if mu_draws:
            self.expected.append(sum(nb_nll(x, m, theta).sum(-1) for m in mu_draws) / len(mu_draws))

    def result(self) -> dict:
        import torch

        out = {"nll_plugin": float(torch.cat(self.plugin).mean())}
        if self.expected:
            out["nll_expected"] = float(torch.cat(self.expected).mean())
        return out


# ------------------------------------------------------------------------------ ours
def _unwrap(fn):
    from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
    from torch.distributions import Independent

    while isinstance(fn, (MaskedDistribution, Independent, ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def _epoch_rates(n_train: int, wall, cpu) -> dict:
    """Training cells per wall-second and per CPU-second over epochs 2..E (all if E == 1)."""
    wall, cpu = np.asarray(wall, float), np.asarray(cpu, float)
    warm = slice(1, None) if len(wall) > 1 else slice(None)
    return {"cells_per_s": float(n_train * len(wall[warm]) / wall[warm].sum()),
            "cells_per_cpu_s": float(n_train * len(cpu[warm]) / cpu[warm].sum()),
            "cells_per_s_median_epoch": float(n_train / np.median(wall[warm])),
            "epoch_s": [float(v) for v in wall], "epoch_cpu_s": [float(v) for v in cpu]}


class Turns:
    """Strict alternation of the two tools' epochs in one process (``--mode alternate``):
    ours runs epoch k, then scvi-tools runs epoch k, then ours epoch k + 1, ... Only one tool
    computes at any time; each tool's epoch timer runs only while it holds its turn."""

    def __init__(self):
        import threading

        self.ours = threading.Semaphore(0)
        self.scvi = threading.Semaphore(0)
        self.ours_done = False
        self.scvi_done = False

    def ours_wait(self):
        if not self.scvi_done:
            self.ours.acquire()

    def ours_pass(self):
        self.scvi.release()

    def scvi_wait(self):
        if not self.ours_done:
            self.scvi.acquire()

    def scvi_pass(self):
        self.ours.release()


# ------------------------------------------------------------------------------ ours
def train_ours(adata_train, args, seed, turns: Turns | None = None):
    """Fit our model through the public entry point; returns (result, timing dict)."""
    from pyro_livi.infer.trainer import Trainer
    from pyro_livi.run import fit

    # benchmark-side instrumentation only: wall and CPU time of every epoch (and the hand-over
    # of the turn in alternate mode); the training itself is untouched
    epochs_timed = []
    run_epoch = Trainer._run_epoch

    def timed_run_epoch(self, *a, **k):
        if turns is not None and epochs_timed:
            turns.ours_wait()
        w, c = time.perf_counter(), time.process_time()
        record = run_epoch(self, *a, **k)
        epochs_timed.append((time.perf_counter() - w, time.process_time() - c))
        if turns is not None:
            turns.ours_pass()
        return record

    Trainer._run_epoch = timed_run_epoch
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    try:
        result = fit(adata_train, model="scvi", modalities={"rna": None}, epochs=args.epochs, patience=None,
                     batch_size=args.batch_size, lr=args.lr, seed=seed, progress=False,
                     n_latent=args.n_latent, n_hidden=args.n_hidden, n_layers=args.n_layers,
                     dropout_rate=args.dropout, likelihood="nb")
    finally:
        Trainer._run_epoch = run_epoch
        if turns is not None:
            turns.ours_done = True
            turns.ours_pass()
    wall_fit = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    history, n_train = result.history, result.dataset.n_cells
    timed = np.array(epochs_timed)
    out = {"tool": "ours", "n_train": int(n_train), "epochs_run": int(len(history)),
           **_epoch_rates(n_train, n_train / history["cells_per_s"].to_numpy(), timed[:, 1]),
           "wall_fit_s": wall_fit, "steps_per_epoch": int(-(-n_train // args.batch_size)),
           "final_loss_per_cell": float(history["loss"].iloc[-1]),
           "n_parameters": int(sum(p.numel() for p in result.model.parameters()))}
    if turns is None:
        out.update(_rss(rss_before, peak, reset))
    return result, out


def eval_ours(result, adata, adata_test, args, seed) -> dict:
    import pyro.poutine as poutine
    import torch

    from pyro_livi.analysis.heldout import heldout_nll, nll_summary, posterior_mean
    from pyro_livi.data import DatasetSpec, MinibatchLoader, read_dataset

    model = result.model
    spec = DatasetSpec(modalities={"rna": None})
    test_ds = read_dataset(adata_test, spec)
    model.eval()
    acc = NLLAccumulator()
    out = {}
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1000 + seed)
        for batch in MinibatchLoader(test_ds, batch_size=1024, shuffle=False):
            def decode(guide):
                g = poutine.trace(guide).get_trace(batch)
                tr = poutine.trace(poutine.replay(model.model, trace=g)).get_trace(batch)
                fn = _unwrap(tr.nodes["obs_rna"]["fn"])
                return tr.nodes["obs_rna"]["value"], fn.mu, fn.theta

            x, mu0, theta = decode(posterior_mean(model.guide))
            draws = [decode(model.guide)[1] for _ in range(args.samples)]
            acc.add(x, mu0, theta, draws)
        out.update(acc.result())
        out["theta_median"] = float(theta.reshape(-1, theta.shape[-1])[0].median())
        # the package's own estimator, for reference (should equal nll_plugin / nll_expected)
        out["pkg_heldout_nll_plugin"] = float(nll_summary(heldout_nll(model, test_ds)).loc["rna", "nll_per_cell"])
        out["pkg_heldout_nll_expected"] = float(nll_summary(
            heldout_nll(model, test_ds, n_samples=args.samples, seed=seed)).loc["rna", "nll_per_cell"])
        # latent of all cells (posterior mean) for the probe
        all_ds = read_dataset(adata, spec)
        z = [model.encode(b)[0] for b in MinibatchLoader(all_ds, batch_size=1024, shuffle=False)]
        out["latent"] = torch.cat(z).numpy()
    return out


def _rss(rss_before, peak, reset) -> dict:
    return {"rss_before_mib": rss_before / 1024 if rss_before else None,
            "peak_rss_mib": peak / 1024 if peak else None,
            "peak_rss_above_mib": (peak - rss_before) / 1024 if (reset and peak and rss_before) else None}


# ------------------------------------------------------------------------------ scvi-tools
def train_scvi(adata_train, args, seed, turns: Turns | None = None):
    """Fit scvi-tools' SCVI; returns (model, timing dict)."""
    import lightning.pytorch as pl
    import scvi
    import torch

    scvi.settings.seed = seed
    scvi.settings.num_threads = args.threads
    torch.set_num_threads(args.threads)
    scvi.settings.verbosity = 30

    class EpochTimer(pl.Callback):
        """Wall and CPU time from the start of each epoch to the start of the next (or the end
        of training), so Lightning's per-epoch hooks count; hands the turn over in alternate mode."""

        def __init__(self):
            self.epochs = []
            self.start = None

        def _close(self):
            if self.start is not None:
                self.epochs.append((time.perf_counter() - self.start[0], time.process_time() - self.start[1]))
                if turns is not None:
                    turns.scvi_pass()

        def on_train_epoch_start(self, trainer, module):
            # the first epoch starts with the turn already held (the caller waited for it)
            if self.start is not None:
                self._close()
                if turns is not None:
                    turns.scvi_wait()
            self.start = (time.perf_counter(), time.process_time())

        def on_train_end(self, trainer, module):
            self._close()
            self.start = None

    rss_before = _status_kib("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    scvi.model.SCVI.setup_anndata(adata_train)
    model = scvi.model.SCVI(adata_train, n_hidden=args.n_hidden, n_latent=args.n_latent,
                            n_layers=args.n_layers, dropout_rate=args.dropout, dispersion="gene",
                            gene_likelihood="nb")
    if args.scvi_dispersion_init is not None:  # diagnostic only: our model's constant init
        with torch.no_grad():
            model.module.px_r.fill_(args.scvi_dispersion_init)
    timer = EpochTimer()
    plan_kwargs = {"lr": args.lr, "weight_decay": 0.0, "optimizer": "Adam",
                   "n_epochs_kl_warmup": None, "n_steps_kl_warmup": None}
    if args.scvi_adam_eps is not None:
        plan_kwargs["eps"] = args.scvi_adam_eps
    try:
        model.train(max_epochs=args.epochs, batch_size=args.batch_size, train_size=1.0,
                    early_stopping=False, accelerator="cpu", devices=1, plan_kwargs=plan_kwargs,
                    callbacks=[timer], enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False)
    finally:
        if turns is not None:
            turns.scvi_done = True
            turns.scvi_pass()
    wall_fit = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    n_train = adata_train.n_obs
    timed = np.array(timer.epochs)
    hist = model.history.get("train_loss_epoch")
    out = {"tool": "scvi-tools", "n_train": int(n_train), "epochs_run": len(timer.epochs),
           **_epoch_rates(n_train, timed[:, 0], timed[:, 1]), "wall_fit_s": wall_fit,
           "steps_per_epoch": int(-(-n_train // args.batch_size)),
           "final_loss_per_cell": float(hist.iloc[-1, 0]) if hist is not None else None,
           "n_parameters": int(sum(p.numel() for p in model.module.parameters())),
           "adam_eps": model.trainer.optimizers[0].param_groups[0]["eps"]
           if getattr(model, "trainer", None) is not None and model.trainer.optimizers else None}
    if turns is None:
        out.update(_rss(rss_before, peak, reset))
    return model, out


def eval_scvi(model, adata, adata_test, args, seed) -> dict:
    import scvi
    import torch

    module = model.module
    module.eval()
    acc = NLLAccumulator()
    out = {}
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1000 + seed)
        adata_test = model._validate_anndata(adata_test)
        loader = model._make_data_loader(adata=adata_test, batch_size=1024, shuffle=False)
        for tensors in loader:
            inf = module.inference(**module._get_inference_input(tensors))
            qz = inf["qz"]
            x = tensors[scvi.REGISTRY_KEYS.X_KEY]

            def decode(z):
                gen_in = module._get_generative_input(tensors, {**inf, "z": z})
                px = module.generative(**gen_in)["px"]
                return px.mu, px.theta

            mu0, theta = decode(qz.loc)
            draws = [decode(qz.rsample())[0] for _ in range(args.samples)]
            acc.add(x, mu0, theta, draws)
        out.update(acc.result())
        out["theta_median"] = float(torch.exp(module.px_r).median())
        # scvi-tools' own estimate, for reference
        rec = model.get_reconstruction_error(adata_test)
        out["scvi_reconstruction_error"] = {k: float(v) for k, v in rec.items()}
        out["latent"] = model.get_latent_representation(model._validate_anndata(adata.copy()),
                                                        give_mean=True)
    return out


# ------------------------------------------------------------------------------ worker / driver
def worker(args) -> None:
    """One fit of one tool (``--mode separate``) or of both with alternating epochs
    (``--mode alternate``, tool "both"), in this fresh process; writes JSON + latents."""
    import threading

    import torch

    torch.set_num_threads(args.threads)
    adata = load_anndata(args.dataset)
    train, test = split(adata, args.test_fraction, args.split_seed)
    adata_test = adata[test].copy()
    outs = {}
    if args.worker == "ours":
        result, outs["ours"] = train_ours(adata[train].copy(), args, args.seed)
        outs["ours"].update(eval_ours(result, adata, adata_test, args, args.seed))
    elif args.worker == "scvi-tools":
        model, outs["scvi-tools"] = train_scvi(adata[train].copy(), args, args.seed)
        outs["scvi-tools"].update(eval_scvi(model, adata, adata_test, args, args.seed))
    else:
        # ours trains in a second thread, scvi-tools (Lightning) in the main thread; the turns
        # make them strictly alternate epoch by epoch, ours first
        turns = Turns()
        box = {}

        def ours_thread():
            try:
                box["result"], box["out"] = train_ours(adata[train].copy(), args, args.seed, turns)
            except BaseException as err:  # noqa: BLE001
                box["error"] = err

        thread = threading.Thread(target=ours_thread)
        thread.start()
        turns.scvi_wait()  # until ours has finished its first epoch
        model, outs["scvi-tools"] = train_scvi(adata[train].copy(), args, args.seed, turns)
        thread.join()
        if "error" in box:
            raise box["error"]
        outs["ours"] = box["out"]
        outs["ours"].update(eval_ours(box["result"], adata, adata_test, args, args.seed))
        outs["scvi-tools"].update(eval_scvi(model, adata, adata_test, args, args.seed))
    for tool, out in outs.items():
        out["n_test"] = int(len(test))
        out["torch_threads"] = torch.get_num_threads()
        out["load_average_1min"] = os.getloadavg()[0]
        np.save(f"{args.out}.{tool}.latent.npy", out.pop("latent"))
    Path(args.out).write_text(json.dumps(outs))


def probe(latent: np.ndarray, labels, seed: int = 0) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, latent, np.asarray(labels), cv=folds).mean())


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _fmt(v, spec="{:,.1f}"):
    return "n/a" if v is None else spec.format(v)


def machine() -> dict:
    import torch

    cpu = cpu_model()
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__}
    for mod in ("scvi", "pyro", "lightning"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    return info


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples", type=int, default=20, help="draws of z for the E_q NLL")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-latent", type=int, default=10)
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--scvi-adam-eps", type=float, default=None,
                   help="Adam eps of scvi-tools (default: its own default, 0.01)")
    p.add_argument("--scvi-dispersion-init", type=float, default=None,
                   help="diagnostic: set scvi-tools' log inverse dispersions (px_r) to this constant "
                   "before training (default: its own N(0, 1) draw; ours starts at 1.0)")
    p.add_argument("--mode", choices=["alternate", "separate"], default="alternate",
                   help="alternate (default): both tools in one process per repeat, epochs strictly "
                   "alternating (ours, scvi-tools, ours, ...); separate: each fit in its own process, "
                   "ours then scvi-tools per repeat (adds peak RSS per tool)")
    p.add_argument("--json", default=None)
    # internal
    p.add_argument("--worker", choices=list(TOOLS) + ["both"], help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return

    start = time.perf_counter()
    info = machine()
    settings = (f"n_latent {args.n_latent}, n_layers {args.n_layers}, n_hidden {args.n_hidden}, "
                f"dropout {args.dropout}, NB, one dispersion per gene, {args.epochs} epochs, batch "
                f"{args.batch_size}, Adam lr {args.lr} (weight decay 0; eps: ours 1e-8, scvi-tools "
                f"{args.scvi_adam_eps if args.scvi_adam_eps is not None else '0.01 (its default)'}), "
                + (f"scvi-tools log-dispersion init {args.scvi_dispersion_init} (diagnostic), "
                   if args.scvi_dispersion_init is not None else "")
                + f"no KL warm-up, no early stopping, {args.threads} torch threads, "
                f"{1 - args.test_fraction:.0%}/{args.test_fraction:.0%} split (seed {args.split_seed}), "
                f"{args.repeats} repeat(s) per tool (training seeds 0..{args.repeats - 1}), "
                f"{'epochs alternating between the tools in one process' if args.mode == 'alternate' else 'runs alternating, one process per fit'}, "
                f"E_q with S={args.samples} draws")
    print(f"# bench_scvi.py  ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    print(f"Machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, torch {info['torch']}, "
          f"scvi-tools {info['scvi']}, lightning {info['lightning']}, pyro-ppl {info['pyro']}")
    print(f"Settings: {settings}\n")
    everything = {"machine": info, "settings": vars(args), "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            ds = DATASETS[name]
            if not ds["path"].exists():
                print(f"## {ds['title']}\n\nSKIPPED: {ds['path']} is absent "
                      "(set PYRO_LIVI_DATA to the shared data folder).\n")
                continue
            runs = {t: [] for t in TOOLS}
            for r in range(args.repeats):
                for tool in (["both"] if args.mode == "alternate" else list(TOOLS)):
                    out = str(Path(tmp) / f"{name}_{tool}_{r}.json")
                    cmd = [sys.executable, __file__, "--worker", tool, "--dataset", name, "--seed", str(r),
                           "--out", out] + _passthrough(args)
                    t0 = time.perf_counter()
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
                        raise SystemExit(f"{tool} on {name} (repeat {r}) failed")
                    process_s = time.perf_counter() - t0
                    for t, res in json.loads(Path(out).read_text()).items():
                        res["latent"] = np.load(f"{out}.{t}.latent.npy")
                        res["process_s"] = process_s
                        runs[t].append(res)
                        print(f"  [{name}] repeat {r} {t}: NLL/cell {res['nll_plugin']:.2f} (plug-in), "
                              f"{res.get('nll_expected', float('nan')):.2f} (E_q); {res['cells_per_s']:,.0f} "
                              f"cells/s, {res['cells_per_cpu_s']:,.0f} cells/CPU-s; process {process_s:.0f} s; "
                              f"load average {res['load_average_1min']:.2f}", file=sys.stderr, flush=True)
            labels = None
            if ds["label"]:
                labels = load_anndata(name).obs[ds["label"]].astype(str).to_numpy()
            for tool, rs in runs.items():
                for res in rs:
                    res["probe_accuracy"] = probe(res["latent"], labels) if labels is not None else None
                    del res["latent"]
            everything["datasets"][name] = runs
            print(table(name, runs, args))
    total = time.perf_counter() - start
    print(f"Script wall time: {total / 60:.1f} min")
    everything["wall_s"] = total
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1, default=str))


def _passthrough(args) -> list[str]:
    out = []
    for flag in ("epochs", "threads", "samples", "batch_size", "lr", "n_latent", "n_hidden", "n_layers",
                 "dropout", "test_fraction", "split_seed", "scvi_adam_eps", "scvi_dispersion_init"):
        v = getattr(args, flag)
        if v is not None:
            out += ["--" + flag.replace("_", "-"), str(v)]
    return out


def table(name: str, runs: dict, args) -> str:
    ds = DATASETS[name]
    first = next(iter(runs.values()))[0]
    lines = [f"## {ds['title']}", "",
             f"{first['n_train']:,} training cells, {first['n_test']:,} test cells; mean over {args.repeats} "
             f"repeat(s) (per-repeat values in brackets); mode {args.mode}", "",
             "| tool | held-out NLL/cell, plug-in | rel. diff. ours vs scvi-tools | held-out NLL/cell, E_q | "
             "rel. diff. E_q | train cells/s (epochs 2..E) | ratio ours / scvi-tools | train cells/CPU-s | "
             "ratio (CPU) | probe accuracy | epochs | steps/epoch | peak RSS +MiB | reference NLL (tool's own) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = runs.get("scvi-tools")
    for tool, rs in runs.items():
        nll = _mean([r["nll_plugin"] for r in rs])
        nlle = _mean([r.get("nll_expected") for r in rs])
        cps = _mean([r["cells_per_s"] for r in rs])
        cpu = _mean([r["cells_per_cpu_s"] for r in rs])
        acc = _mean([r["probe_accuracy"] for r in rs])
        rss = _mean([r.get("peak_rss_above_mib") for r in rs])
        per = lambda key, spec="{:,.1f}": " / ".join(_fmt(r.get(key), spec) for r in rs)  # noqa: E731
        if tool == "ours" and ref:
            rel = 100 * (nll - _mean([r["nll_plugin"] for r in ref])) / _mean([r["nll_plugin"] for r in ref])
            rele = (100 * (nlle - _mean([r["nll_expected"] for r in ref])) / _mean([r["nll_expected"] for r in ref])
                    if nlle is not None else None)
            ratios = [o["cells_per_s"] / s["cells_per_s"] for o, s in zip(rs, ref)]
            ratio = f"{np.mean(ratios):.2f} [{' / '.join(f'{v:.2f}' for v in ratios)}]"
            ratios = [o["cells_per_cpu_s"] / s["cells_per_cpu_s"] for o, s in zip(rs, ref)]
            ratio_cpu = f"{np.mean(ratios):.2f} [{' / '.join(f'{v:.2f}' for v in ratios)}]"
            refnll = f"heldout_nll {_fmt(_mean([r['pkg_heldout_nll_plugin'] for r in rs]), '{:,.2f}')} (plug-in), " \
                     f"{_fmt(_mean([r['pkg_heldout_nll_expected'] for r in rs]), '{:,.2f}')} (E_q)"
            reltxt, reletxt = f"{rel:+.2f}%", _fmt(rele, "{:+.2f}%")
        else:
            ratio, reltxt, reletxt = "1 (reference)" if tool == "scvi-tools" else "-", "reference", "reference"
            ratio_cpu = ratio
            refnll = ("get_reconstruction_error " + _fmt(_mean([r["scvi_reconstruction_error"].get(
                "reconstruction_loss") for r in rs]), "{:,.2f}")) if tool == "scvi-tools" else "-"
        lines.append(
            f"| {tool} | {nll:,.2f} [{per('nll_plugin', '{:,.2f}')}] | {reltxt} | "
            f"{_fmt(nlle, '{:,.2f}')} [{per('nll_expected', '{:,.2f}')}] | {reletxt} | "
            f"{cps:,.0f} [{per('cells_per_s', '{:,.0f}')}] | {ratio} | "
            f"{cpu:,.0f} [{per('cells_per_cpu_s', '{:,.0f}')}] | {ratio_cpu} | "
            f"{_fmt(acc, '{:.3f}')} | {rs[0]['epochs_run']} | {rs[0]['steps_per_epoch']} | {_fmt(rss, '{:,.0f}')} | {refnll} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
