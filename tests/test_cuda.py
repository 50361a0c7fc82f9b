"""The CUDA path of every registered model, end to end: data, model, trainer, checkpoints and
outputs. Skipped on machines without a CUDA GPU, except the device-discipline check, which runs
everywhere: no tensor made inside training or a forward pass is left on the default device.

For each model: training really runs on the GPU (parameters and minibatches on CUDA in every
epoch); the fitted model and every output come back on the CPU; a checkpoint written on the GPU
resumes on the CPU and gives the same outputs; the encoder, the ELBO terms and posterior
predictive draws on CUDA equal (encoder) or match (shapes, finiteness) the CPU ones. The command
line (`pyro-livi fit --device cuda`, then `evaluate`) runs once.
"""

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pyro.infer import Predictive
from torch.overrides import TorchFunctionMode

from pyro_livi.cli import main
from pyro_livi.infer import Trainer, elbo_terms
from pyro_livi.infer.trainer import CHECKPOINT_NAME
from pyro_livi.models import MODELS
from pyro_livi.run import fit
from pyro_livi.rundir import CHECKPOINT_DIR
from pyro_livi.simulate import SimulationConfig, simulate
from test_zoo_contract import N_CELLS, ONE_EPOCH, TINY, built, tiny_data

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU here (torch.cuda.is_available() is False); "
                                       "these checks run on a machine with an NVIDIA GPU")


def _fit(name, data, spec, out, device, **extra):
    return fit(data, model=name, donor_key=spec.donor_key, modalities=spec.modalities,
               optional_modalities=spec.optional_modalities,
               continuous_modalities=spec.continuous_modalities, covariate_keys=spec.covariate_keys,
               label_keys=spec.label_keys, epochs=2, batch_size=16, progress=False, out=out,
               device=device, **TINY[name], **ONE_EPOCH.get(name, {}), **extra)


@needs_cuda
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fit_on_cuda_returns_cpu_outputs_and_resumes_on_cpu(name, tmp_path, monkeypatch):
    seen = []
    run_epoch = Trainer._run_epoch

    def spy(self, stage, loader, n_cells, device):
        seen.append((device.type, {p.device.type for p in self.model.parameters()}))
        return run_epoch(self, stage, loader, n_cells, device)

    monkeypatch.setattr(Trainer, "_run_epoch", spy)
    data, spec = tiny_data(name)
    result = _fit(name, data, spec, tmp_path, "cuda")
    assert seen and all(d == "cuda" and kinds == {"cuda"} for d, kinds in seen), seen
    assert np.isfinite(result.history["loss"]).all()
    assert {p.device.type for p in result.model.parameters()} == {"cpu"}
    assert {b.device.type for b in result.model.buffers()} <= {"cpu"}
    for table_name, table in result.tables.items():
        values = table.select_dtypes("number").to_numpy()
        missing = np.isnan(values)  # whole rows only: cells that lack a modality
        assert not np.isinf(values).any() and (missing.all(1) | ~missing.any(1)).all(), table_name

    # the finished run, resumed on the CPU from its GPU checkpoint: the same outputs
    seen.clear()
    again = _fit(name, data, spec, tmp_path, "cpu", resume=True)
    latent = result.model.latent_name
    pd.testing.assert_frame_equal(again.tables[latent], result.tables[latent], rtol=1e-5, atol=1e-6)
    assert len(again.history) == len(result.history)


@needs_cuda
@pytest.mark.parametrize("name", sorted(MODELS))
def test_encoder_elbo_and_predictive_on_cuda(name):
    model, dataset = built(name)
    model.eval()
    batch = dataset.batch(np.arange(N_CELLS))
    on_cpu = model.encode(batch)[0]
    model.to("cuda")
    gpu_batch = batch.to(torch.device("cuda"))
    on_gpu = model.encode(gpu_batch)[0]
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-5)
    terms = elbo_terms(model.model, model.guide, gpu_batch)
    assert terms and all(np.isfinite(float(v)) for v in terms.values()), terms
    draws = Predictive(model.model, guide=model.guide, num_samples=2)(gpu_batch, observed=False)
    for m in dataset.modalities:
        site = draws[f"obs_{m}"]
        assert site.device.type == "cuda" and site.shape == (2, N_CELLS, dataset.n_features[m])
        assert torch.isfinite(site).all()


@needs_cuda
def test_cli_fit_and_evaluate_on_cuda(tmp_path):
    config = SimulationConfig(n_donors=8, cells_per_donor=25, vary_cells_per_donor=False, n_snps=20,
                              n_genes=60, k_c=4, k_dxc=2, k_v=1, n_cell_types=3)
    data = tmp_path / "sim.h5ad"
    simulate(config, seed=0).adata.write_h5ad(data)
    run = tmp_path / "run"
    assert main(["fit", "--data", str(data), "--donor-key", "donor", "--device", "cuda", "--epochs-vae", "2",
                 "--epochs", "2", "--n-cell-state", "4", "--n-dxc", "2", "--n-persistent", "1",
                 "--batch-size", "64", "--out", str(run)]) == 0
    D = pd.read_csv(run / "D.tsv", sep="\t", index_col=0)
    assert D.shape == (8, 2) and np.isfinite(D.to_numpy()).all()
    assert main(["evaluate", "--run", str(run), "--data", str(data), "--label-keys", "cell_type",
                 "--ppc-cells", "80", "--ppc-samples", "5", "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "metrics.tsv").is_file()


_FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.linspace, torch.eye,
              torch.rand, torch.randn, torch.randint, torch.randperm, torch.tensor, torch.as_tensor,
              torch.scalar_tensor}
_PACKAGE = Path(__import__("pyro_livi").__file__).parent


class _DefaultDeviceFactories(TorchFunctionMode):
    """Records where package code (outside the data loaders, which build batches on the CPU and
    move them) calls a tensor factory without ``device=``: on a GPU run such a tensor lands on the
    CPU beside CUDA ones."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        from_tensor = func is torch.as_tensor and args and torch.is_tensor(args[0])
        if func in _FACTORIES and kwargs.get("device") is None and not from_tensor:
            frame = sys._getframe(1)
            path = Path(frame.f_code.co_filename)
            if _PACKAGE in path.parents and (_PACKAGE / "data") not in path.parents:
                self.calls[f"{path.relative_to(_PACKAGE)}:{frame.f_lineno} torch.{func.__name__}"] += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_and_forward_passes_make_tensors_on_the_data_device(name, tmp_path, monkeypatch):
    """Runs on the CPU everywhere: every tensor made in a training epoch (model, guide, ELBO,
    backward, optimiser, frozen-encoder cache) or in a forward pass (encoder, ELBO terms, posterior
    predictive) takes its device from the data or the parameters, so ``--device cuda`` cannot mix
    devices. Factories called while building a model are exempt: the model is built on the CPU and
    moved as a whole."""
    mode = _DefaultDeviceFactories()
    run_epoch = Trainer._run_epoch

    def watched(self, stage, loader, n_cells, device):
        with mode:
            return run_epoch(self, stage, loader, n_cells, device)

    monkeypatch.setattr(Trainer, "_run_epoch", watched)
    data, spec = tiny_data(name)
    _fit(name, data, spec, tmp_path, "cpu")
    model, dataset = built(name)
    batch = dataset.batch(np.arange(N_CELLS))
    with mode:
        model.encode(batch)
        elbo_terms(model.model, model.guide, batch)
        Predictive(model.model, guide=model.guide, num_samples=2)(batch, observed=False)
    assert not mode.calls, f"tensor factories without device= in {name}'s training or forward passes: " \
                           f"{dict(mode.calls)}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_checkpoint_written_on_a_gpu_resumes_on_a_machine_without_one(tmp_path, monkeypatch):
    """Checkpoints are saved with their tensors' devices; this one's storages are tagged as
    ``cuda:0`` (what ``torch.save`` writes on a GPU), and resuming it here, without a GPU, works."""
    monkeypatch.setattr(torch.serialization, "_package_registry", list(torch.serialization._package_registry))
    torch.serialization.register_package(1, lambda storage: "cuda:0", lambda storage, location: None)
    data, spec = tiny_data("scvi")
    first = _fit("scvi", data, spec, tmp_path, "cpu")
    with pytest.raises(RuntimeError, match="CUDA"):  # the tag took: a plain load needs a GPU
        torch.load(tmp_path / CHECKPOINT_DIR / CHECKPOINT_NAME, weights_only=False)
    again = _fit("scvi", data, spec, tmp_path, "cpu", resume=True)
    pd.testing.assert_frame_equal(again.tables["latent"], first.tables["latent"], rtol=1e-5, atol=1e-6)
