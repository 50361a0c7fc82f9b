"""LIVI training throughput side by side with the reference implementation (PMBio/LIVI).

Both train the same configuration: K_C 15, K_DxC 20, K_V 5, encoder [512, 128], NB likelihood,
Adam lr 8e-4, minibatches of 1024 cells, no covariates, no batch norm, a VAE stage then a donor
stage (encoder and cell-state decoder frozen; V, W_V, D, A and W_DxC train), on CPU with
``--threads`` torch threads (default 2). For each data set the script runs ``--pairs`` pairs of
processes, one of this package and one of the reference, alternating which goes first, each in
its own subprocess, ``--epochs`` epochs per stage; it reports the median over epochs after the
first of each stage (the steady epochs) in cells/s (wall clock), the median over pairs, the
ratio of each pair ([min-max] over pairs), the same ratio in cells per CPU-second of the process
(less sensitive to other processes on a shared machine) and each process's peak resident memory
(``VmHWM``).

The reference runs from a checkout named by ``LIVI_REFERENCE`` (e.g. a clone of PMBio/LIVI)
with the Python named by ``LIVI_REFERENCE_PYTHON`` (its own environment: torch,
pytorch-lightning, anndata, scanpy). Nothing of it is in this repository: the script writes a
small driver to a temporary folder that imports the reference's ``src.models.livi.LIVI`` and
``src.data_modules.livi_data.LIVIDataModule`` and trains them with its own
``pytorch_lightning.Trainer`` settings (``configs/trainer/default.yaml``: deterministic, no
validation batches), on the AnnData read into memory, with ``warmup_epochs_vae`` set so that its
switch from the VAE to the donor stage (``LIVI.on_train_epoch_end``) comes after ``--epochs``
epochs. Its datamodule drops the last incomplete minibatch (its default); cells/s counts the
cells of the minibatches trained on, on both sides.

Data: OneK1K (``donors/onek1k_40donors_7811cells.h5ad`` in the shared data folder,
``$PYRO_LIVI_DATA``; donor key ``indiv``) and data simulated by :mod:`pyro_livi.simulate`
(``--sim-size``, default 50000x2000 with 100 cells per donor, i.e. 500 donors), written once
to a temporary ``.h5ad`` that both sides read.

``--profile`` (no reference needed) splits one training step of this package per stage into:
building the minibatch, the encoder (forward and backward in the VAE stage; what the guide
runs for it in the donor stage), the decoder and KL, the NB log-probability (forward and
backward), Pyro's distribution validation (as often as the Trainer runs it), the optimiser, and
the rest (Pyro's tracing and bookkeeping, the gradient checks) as the remainder of a whole
step (next minibatch, loss, backward, checks, Adam, as the Trainer runs them). Each part is
timed alone on one minibatch in process CPU ms, in ``--repeats`` interleaved rounds with the
whole step (medians), after one warm-up epoch (which fills the frozen encoder's cache in the
donor stage). It also counts the matmul
FLOPs of a step (torch.profiler) and reports the achieved matmul GFLOP/s and the step's
GFLOP/s against the machine's fp32 ceiling, measured here by a 4096 x 4096 sgemm with the same
threads.

Example::

    LIVI_REFERENCE=/path/to/LIVI LIVI_REFERENCE_PYTHON=/path/to/venv/bin/python \\
        python benchmarks/bench_livi_reference.py --data onek1k sim --pairs 3 --epochs 3
    python benchmarks/bench_livi_reference.py --profile --data onek1k
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

# the OpenMP wait policy is read when torch loads: the same for this process and every child
# (--omp-wait-policy; passive waiting keeps 2 threads from collapsing when another process
# holds a core, see bench_threads.py)
if "--child" not in sys.argv:
    os.environ["OMP_WAIT_POLICY"] = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--omp-wait-policy=")),
                                         os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))

import torch  # noqa: E402

from bench_livi import PeakMemory, machine_description, simulate_to_file  # noqa: E402

CONFIG = dict(n_cell_state=15, n_dxc=20, n_persistent=5, encoder_hidden=[512, 128], lr=8e-4, batch_size=1024)

REFERENCE_DRIVER = r'''
"""Trains the reference LIVI (imported from the checkout on PYTHONPATH) and prints cells/s per epoch."""
import json, sys, time
from pathlib import Path

import torch

cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
import anndata
import pytorch_lightning as pl
from src.data_modules.livi_data import LIVIDataModule
from src.models.livi import LIVI

adata = anndata.read_h5ad(cfg["path"])
n_donors = adata.obs[cfg["donor_key"]].nunique()
pl.seed_everything(cfg["seed"], verbose=False)
datamodule = LIVIDataModule(adata=adata, y_key=cfg["donor_key"], use_size_factor=True, batch_size=cfg["batch_size"],
                            num_workers=0, device="cpu", backed_mode=False, strict=False, seed=cfg["seed"])
model = LIVI(x_dim=adata.n_vars, z_dim=cfg["n_cell_state"], y_dim=n_donors, n_DxC_factors=cfg["n_dxc"],
             n_persistent_factors=cfg["n_persistent"], n_cis_snps=0, encoder_hidden_dims=cfg["encoder_hidden"],
             learning_rate=cfg["lr"], warmup_epochs_vae=cfg["epochs"] - 1, warmup_epochs_G=0,
             covariates_dims=None, batch_norm_decoder=False, device="cpu")
rates = {"vae": [], "donor": []}
cpu_rates = {"vae": [], "donor": []}


class Timer(pl.Callback):
    def on_train_epoch_start(self, trainer, module):
        self.cells, self.start, self.cpu = 0, time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.cells += batch["x"].shape[0]

    def on_train_epoch_end(self, trainer, module):
        # callbacks run before the module's own hook, which switches the stage after this epoch
        stage = "vae" if module.pretrain_mode else "donor"
        rates[stage].append(self.cells / (time.perf_counter() - self.start))
        cpu_rates[stage].append(self.cells / (time.process_time() - self.cpu))


trainer = pl.Trainer(max_epochs=2 * cfg["epochs"], accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, deterministic=True, log_every_n_steps=10,
                     callbacks=[Timer()])
trainer.fit(model, datamodule=datamodule)
assert model.train_DxC_mode and model.frozen, "the reference did not reach its donor stage"
status = Path("/proc/self/status").read_text().splitlines()
peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps({"stages": rates, "cpu_stages": cpu_rates, "peak_rss": peak, "torch": torch.__version__, "pl": pl.__version__}))
'''


# ------------------------------------------------------------------------------ data
def data_sets(names: list[str], tmp: Path, args) -> list[dict]:
    """[{name, path, donor_key, description}] for the requested data sets."""
    out = []
    for name in names:
        if name == "onek1k":
            from pyro_livi.paths import shared_data_dir

            path = shared_data_dir() / "donors" / "onek1k_40donors_7811cells.h5ad"
            if not path.exists():
                raise SystemExit(f"{path} not found: set PYRO_LIVI_DATA to the shared data folder")
            out.append({"name": "OneK1K 7,811 cells x 1,000 genes, 40 donors", "path": str(path),
                        "donor_key": "indiv"})
        elif name == "sim":
            cells, genes = (int(v) for v in args.sim_size.lower().split("x"))
            path = tmp / f"sim_{cells}x{genes}.h5ad"
            info = simulate_to_file(cells, genes, path, SimpleNamespace(cells_per_donor=args.cells_per_donor,
                                                                          seed=args.seed))
            out.append({"name": f"simulated {info['n_cells']:,} cells x {info['n_genes']:,} genes, "
                                f"{info['n_donors']} donors", "path": str(path), "donor_key": "donor"})
        else:
            raise SystemExit(f"unknown data set {name!r}: choose onek1k or sim")
    return out


# ------------------------------------------------------------------------------ this package
def build_ours(path: str, donor_key: str, seed: int):
    """The dataset and LIVI at :data:`CONFIG` (seeded)."""
    import pyro

    from pyro_livi.data import DatasetSpec, read_dataset
    from pyro_livi.models import LIVI

    dataset = read_dataset(path, DatasetSpec(modalities={"rna": None}, donor_key=donor_key))
    pyro.set_rng_seed(seed)
    model = LIVI(dataset.n_features["rna"], len(dataset.donor_index), n_cell_state=CONFIG["n_cell_state"],
                 n_dxc=CONFIG["n_dxc"], n_persistent=CONFIG["n_persistent"],
                 encoder_hidden=CONFIG["encoder_hidden"], counts_sample=dataset.counts_sample("rna"))
    return dataset, model


def run_ours(path: str, donor_key: str, args) -> dict:
    """Train through livi_stages with the real Trainer; cells/s of every epoch per stage, peak RSS."""
    from pyro_livi.infer import Trainer, TrainingConfig
    from pyro_livi.models import livi_stages

    dataset, model = build_ours(path, donor_key, args.seed)
    rates: dict[str, list[float]] = {"vae": [], "donor": []}
    cpu_rates: dict[str, list[float]] = {"vae": [], "donor": []}
    clock = {"cpu": 0.0}

    def on_epoch(trainer, record):
        now = time.process_time()
        rates[record["stage"]].append(record["cells_per_s"])
        cpu_rates[record["stage"]].append(dataset.n_cells / (now - clock["cpu"]))
        clock["cpu"] = time.process_time()

    config = TrainingConfig(batch_size=CONFIG["batch_size"], lr=CONFIG["lr"], seed=args.seed, progress=False)
    trainer = Trainer(model, dataset, livi_stages(args.epochs, args.epochs, patience=None), config,
                      callbacks=[on_epoch])
    clock["cpu"] = time.process_time()
    trainer.fit()
    return {"stages": rates, "cpu_stages": cpu_rates, "peak_rss": PeakMemory("cpu").read()["peak_rss"]}


# ------------------------------------------------------------------------------ pairs
def child(side: str, data: dict, args, driver: Path | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OMP_WAIT_POLICY=os.environ["OMP_WAIT_POLICY"])
    if side == "ours":
        cmd = [sys.executable, __file__, "--child", json.dumps(data), "--threads", str(args.threads),
               "--epochs", str(args.epochs), "--seed", str(args.seed)]
    else:
        env["PYTHONPATH"] = os.environ["LIVI_REFERENCE"]
        cfg = dict(CONFIG, path=data["path"], donor_key=data["donor_key"], epochs=args.epochs,
                   threads=args.threads, seed=args.seed)
        cmd = [os.environ["LIVI_REFERENCE_PYTHON"], str(driver), json.dumps(cfg)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=os.environ.get("LIVI_REFERENCE") if side == "reference" else None)
    if done.returncode != 0:
        raise RuntimeError(f"{side} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def steady(rates: list[float]) -> float:
    """Median over the epochs after the first (the first when there is one)."""
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def compare(data: dict, args, driver: Path) -> dict:
    runs = {"ours": [], "reference": []}
    for pair in range(args.pairs):
        order = ("ours", "reference") if pair % 2 == 0 else ("reference", "ours")
        for side in order:
            runs[side].append(child(side, data, args, driver))
        print(f"  {data['name']}: pair {pair + 1}/{args.pairs} done", file=sys.stderr, flush=True)
    out = {"name": data["name"], "runs": runs, "stages": {}}
    for stage in ("vae", "donor"):
        ours = [steady(r["stages"][stage]) for r in runs["ours"]]
        ref = [steady(r["stages"][stage]) for r in runs["reference"]]
        ratios = [a / b for a, b in zip(ours, ref)]
        cpu_ratios = [steady(a["cpu_stages"][stage]) / steady(b["cpu_stages"][stage])
                      for a, b in zip(runs["ours"], runs["reference"])]
        out["stages"][stage] = {"ours": statistics.median(ours), "reference": statistics.median(ref),
                                "ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                "cpu_ratio": statistics.median(cpu_ratios), "cpu_min": min(cpu_ratios),
                                "cpu_max": max(cpu_ratios),
                                "ours_first_epoch": statistics.median(r["stages"][stage][0] for r in runs["ours"])}
    out["peak_rss"] = {side: statistics.median(r["peak_rss"] for r in runs[side]) for side in runs}
    return out


def table(results: list[dict], args) -> str:
    lines = ["| data | stage | this package cells/s | reference LIVI cells/s | ratio median [min-max] | "
             "ratio of cells per CPU-second | this package, first epoch of the stage (cells/s) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for stage in ("vae", "donor"):
            s = r["stages"][stage]
            lines.append(f"| {r['name']} ({args.pairs} pairs) | {stage} | {s['ours']:,.0f} | {s['reference']:,.0f} | "
                         f"{s['ratio']:.2f} [{s['min']:.2f}-{s['max']:.2f}] | "
                         f"{s['cpu_ratio']:.2f} [{s['cpu_min']:.2f}-{s['cpu_max']:.2f}] | {s['ours_first_epoch']:,.0f} |")
    lines.append("")
    lines.append("Peak RSS (median over runs): " + "; ".join(
        f"{r['name']}: {r['peak_rss']['ours'] / 2 ** 20:,.0f} MiB (this package) vs "
        f"{r['peak_rss']['reference'] / 2 ** 20:,.0f} MiB (reference)" for r in results))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ profile
#: dense matrix products counted for the GFLOP/s (the sparse first encoder layer is left out:
#: the profiler counts its product as if it were dense)
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mv", "aten::addmv_", "aten::addmv"}


def _in_sparse_layer(event) -> bool:
    while event is not None:
        if "SparseRowsLinear" in event.name:
            return True
        event = event.cpu_parent
    return False


def fp32_ceiling(n: int = 4096, repeats: int = 3) -> float:
    """GFLOP/s of an n x n x n float32 matmul (best of ``repeats``, wall clock)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_wall(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _wall(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def profile_ours(data: dict, args) -> dict:
    """Where one training step of this package goes, per stage (see the module docstring)."""
    import pyro
    from pyro.infer.util import is_validation_enabled

    import pyro_livi
    from pyro_livi.infer import Trainer, TrainingConfig, elbo_terms
    from pyro_livi.infer import trainer as trainer_module
    from pyro_livi.models import livi_stages

    dataset, model = build_ours(data["path"], data["donor_key"], args.seed)
    config = TrainingConfig(batch_size=CONFIG["batch_size"], lr=CONFIG["lr"], seed=args.seed, progress=False)
    trainer = Trainer(model, dataset, livi_stages(1, 1, patience=None), config)
    loader = trainer._make_loader()
    n_batches = len(loader)
    every_batch = getattr(trainer_module, "VALIDATE_EVERY_BATCH", True)
    validated_share = 1.0 if every_batch else 1.0 / n_batches
    lik = model.likelihoods["rna"]
    out = {"package": str(Path(pyro_livi.__file__).parent), "n_batches": n_batches,
           "validated_share": validated_share if is_validation_enabled() else 0.0, "stages": {}}
    for stage in trainer.stages:
        trainer._enter_stage(stage)
        trainer._run_epoch(stage, loader, dataset.n_cells, torch.device("cpu"))  # warm-up (fills caches)
        wall = time.perf_counter()
        trainer._run_epoch(stage, loader, dataset.n_cells, torch.device("cpu"))
        step_wall = (time.perf_counter() - wall) / n_batches
        batch = next(iter(loader))
        x, sf = batch.x["rna"], batch.size_factor["rna"]
        vae = stage.name == "vae"

        def densify():
            for _ in loader:
                pass

        def encoder():
            cache = getattr(model, "_posterior_cache", None)
            if vae:
                loc, scale = model.encoder(x)
                (loc.sum() + scale.sum()).backward()
            elif cache is not None:
                cache(model.encoder, x, batch.index, batch.n_cells)
            else:
                model.encoder(x)

        with torch.no_grad():
            loc, scale = model.encoder(x)
        eps = torch.randn_like(loc)
        upstream = torch.randn(x.shape)

        def decoder_kl():
            l, s = loc.clone().requires_grad_(vae), scale.clone().requires_grad_(vae)
            c = l + s * eps
            donor_on = "interaction" in model.components
            D = model.D_loc if donor_on else None
            V = model.V_loc if "persistent" in model.components else None
            mean = torch.softmax(model._logits(c, batch, D, V), dim=-1) * sf[:, None]
            kl = (0.5 * (l ** 2 + s ** 2 - 1.0) - torch.log(s)).sum()
            if mean.requires_grad:
                ((mean * upstream).sum() + kl).backward()

        mean_value = (x + 0.5) / (x + 0.5).sum(-1, keepdim=True) * sf[:, None]

        def nb():
            mean = mean_value.clone().requires_grad_(True)
            with pyro.validation_enabled(False):
                d = lik(mean, **model.likelihood_params("rna", None)).to_event(1)
                d.log_prob(x).sum().backward()

        def elbo(valid):
            def run():
                with pyro.validation_enabled(valid):
                    sum(elbo_terms(trainer.stage_model, trainer.stage_guide, batch).values()).backward()
            return run

        def optimizer():
            trainer._optimizer.step()

        batches = {"iter": iter(loader)}

        def full_step():  # as Trainer._run_epoch: next minibatch, loss, backward, checks, Adam
            b = next(batches["iter"], None)
            if b is None:
                batches["iter"] = iter(loader)
                b = next(batches["iter"])
            with pyro.validation_enabled(every_batch and is_validation_enabled()):
                loss = sum(elbo_terms(trainer.stage_model, trainer.stage_guide, b).values())
            trainer._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer._check_gradients(stage, 0)
            trainer._optimizer.step()

        sum(elbo_terms(trainer.stage_model, trainer.stage_guide, batch).values()).backward()  # gradients for Adam
        encoder_name = "encoder" + (" (forward + backward)" if vae else " (frozen: what the guide runs)")
        fns = {"whole step": full_step, "densify the minibatch": densify, encoder_name: encoder,
               "decoder + KL (forward + backward)": decoder_kl, "NB log-probability (forward + backward)": nb,
               "validation on": elbo(True), "validation off": elbo(False), "optimizer step": optimizer}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for round_ in range(args.repeats + 1):  # interleaved rounds; the first is a warm-up
            for name, fn in fns.items():
                start = time.process_time()
                fn()
                if round_:
                    times[name].append(1000 * (time.process_time() - start))
        ms = {k: statistics.median(v) for k, v in times.items()}
        ms["densify the minibatch"] /= n_batches
        validation = max(ms.pop("validation on") - ms.pop("validation off"), 0.0)
        whole = ms.pop("whole step") + (0.0 if every_batch else validation * out["validated_share"])
        parts = dict(ms)
        parts["distribution validation (as often as the Trainer runs it)"] = validation * out["validated_share"]
        parts["optimizer step"] = parts.pop("optimizer step")
        parts["Pyro tracing and the rest (remainder)"] = whole - sum(parts.values())
        step_ms = whole
        model.zero_grad(set_to_none=True)

        from torch.profiler import ProfilerActivity, profile

        steps = 3
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            for _ in range(steps):
                loss = sum(elbo_terms(trainer.stage_model, trainer.stage_guide, batch).values())
                trainer._optimizer.zero_grad(set_to_none=True)
                loss.backward()
                trainer._optimizer.step()
        matmul = [e for e in prof.events() if e.name in MATMUL_OPS and e.flops and not _in_sparse_layer(e)]
        flops = sum(e.flops for e in matmul) / steps
        matmul_s = sum(e.self_cpu_time_total for e in matmul) / 1e6 / steps
        out["stages"][stage.name] = {"step_ms": step_ms, "parts": parts, "matmul_gflop_per_step": flops / 1e9,
                                     "matmul_gflops": flops / matmul_s / 1e9 if matmul_s else float("nan"),
                                     "step_gflops": flops / step_wall / 1e9, "step_wall_ms": 1000 * step_wall}
    out["ceiling_gflops"] = fp32_ceiling()
    return out


def profile_table(prof: dict) -> str:
    stages = list(prof["stages"])
    lines = ["| part of one step | " + " | ".join(f"{s} CPU ms | {s} %" for s in stages) + " |",
             "|---|" + "---|---|" * len(stages)]
    names = list(prof["stages"][stages[0]]["parts"])
    for name in names:
        cells = []
        for s in stages:
            st = prof["stages"][s]
            key = name if name in st["parts"] else next(k for k in st["parts"] if k.split(" (")[0] == name.split(" (")[0])
            v = st["parts"][key]
            cells += [f"{v:.1f}", f"{100 * v / st['step_ms']:.0f}%"]
        lines.append(f"| {name.split(' (')[0] if name.startswith('encoder') else name} | " + " | ".join(cells) + " |")
    lines.append("| **whole step** | " + " | ".join(
        f"**{prof['stages'][s]['step_ms']:.1f}** | 100%" for s in stages) + " |")
    lines.append("")
    ceiling = prof["ceiling_gflops"]
    for s in stages:
        st = prof["stages"][s]
        lines.append(f"- {s}: {st['matmul_gflop_per_step']:.2f} GFLOP of dense matmuls per step; they run at "
                     f"{st['matmul_gflops']:.0f} GFLOP/s ({100 * st['matmul_gflops'] / ceiling:.0f}% of the fp32 "
                     f"ceiling), the whole step at {st['step_gflops']:.0f} GFLOP/s "
                     f"({100 * st['step_gflops'] / ceiling:.0f}%; {st['step_wall_ms']:.1f} ms wall per step in a timed epoch)")
    lines.append(f"- fp32 ceiling: {ceiling:.0f} GFLOP/s (4096 x 4096 sgemm, same threads); Pyro validation on "
                 f"{100 * prof['validated_share']:.0f}% of the training steps; package {prof['package']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["onek1k", "sim"], help="data sets: onek1k, sim (default both)")
    p.add_argument("--sim-size", default="50000x2000", help="simulated CELLSxGENES (default 50000x2000)")
    p.add_argument("--cells-per-donor", type=float, default=100.0, help="simulated cells per donor (default 100)")
    p.add_argument("--pairs", type=int, default=3, help="pairs of runs (ours, reference) per data set (default 3)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per stage (default 3; the first is left out)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every process (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--omp-wait-policy", default=None, metavar="PASSIVE|ACTIVE",
                   help="OMP_WAIT_POLICY of every process, given as --omp-wait-policy=VALUE (default: the "
                        "environment's, else PASSIVE)")
    p.add_argument("--profile", action="store_true", help="profile one step of this package instead (no reference)")
    p.add_argument("--repeats", type=int, default=10, help="repeats of each part in --profile (default 10)")
    p.add_argument("--json", type=Path, default=None, help="also write all numbers to this JSON file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child is not None:
        data = json.loads(args.child)
        print(json.dumps(run_ours(data["path"], data["donor_key"], args)))
        return
    info = machine_description("cpu")
    with tempfile.TemporaryDirectory(prefix="bench_livi_ref_") as tmp:
        sets = data_sets(args.data, Path(tmp), args)
        if args.profile:
            results = []
            for data in sets:
                prof = profile_ours(data, args)
                results.append(prof)
                print(f"\nWhere one step of this package goes: {data['name']}, batch {CONFIG['batch_size']}, "
                      f"{args.threads} threads (OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']}), {info['cpu']}; "
                      f"1-min load average {os.getloadavg()[0]:.1f}\n")
                print(profile_table(prof))
        else:
            for var in ("LIVI_REFERENCE", "LIVI_REFERENCE_PYTHON"):
                if not os.environ.get(var):
                    raise SystemExit(f"set {var} (the reference checkout and its Python), or use --profile")
            driver = Path(tmp) / "reference_driver.py"
            driver.write_text(REFERENCE_DRIVER)
            results = [compare(data, args, driver) for data in sets]
            ref = results[0]["runs"]["reference"][0]
            print(f"Machine: {info['cpu']}, {info['cores']} cores; this package: torch {info['torch']}, pyro "
                  f"{info['pyro']}; reference: torch {ref['torch']}, pytorch-lightning {ref['pl']}; "
                  f"{args.threads} torch threads per process, OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']}; "
                  f"{args.epochs} epochs per stage (median of the "
                  f"epochs after the first); 1-min load average at the end {os.getloadavg()[0]:.1f}")
            print(f"Configuration: K_C {CONFIG['n_cell_state']}, K_DxC {CONFIG['n_dxc']}, K_V "
                  f"{CONFIG['n_persistent']}, encoder {CONFIG['encoder_hidden']}, NB, lr {CONFIG['lr']}, batch "
                  f"{CONFIG['batch_size']}\n")
            print(table(results, args))
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
