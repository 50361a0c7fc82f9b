"""Data-parallel SVI over several processes with ``torch.distributed`` (DDP-style).

Every process holds the whole model and trains on its shard of every minibatch; after each
backward pass the gradients are averaged over the processes (one all-reduce), so that every
process takes the same optimiser step from the same parameters. With W processes and a global
minibatch of B cells, step k of an epoch uses the same B cells as one process with batch size
B would (the epoch's seeded permutation, :class:`~pyro_livi.data.loader.MinibatchLoader`), cut
into W contiguous shards of B/W cells (:class:`ShardedLoader`).

Scaling of the ELBO. Cell-level sites live in the plate ``cells`` of size N (the training cells)
subsampled at the cells of the minibatch, so Pyro scales their terms by N / b for a minibatch of
b cells. Process r holds b_r of the step's B cells; its cell-level terms are rescaled from
N / b_r to N W / B (:class:`CellPlateScale`), while the sites outside the plate (global latents,
donor factors, penalties) enter every process's loss once. The average over processes of the
per-process losses and of their gradients is then exactly the single-process estimate for the
global minibatch::

    (1/W) sum_r [ (N W / B) sum_{i in shard r} l_i + G ] = (N / B) sum_{i in batch} l_i + G

This holds for uneven shards (a last minibatch not divisible by W) and for a last minibatch with
fewer cells than processes (a process without a cell of its own reads one cell at weight 0).

What differs from one process: the Monte Carlo noise of the guide's samples (and dropout) is
drawn by each process for its own cells, from a stream seeded by (seed, epoch, rank), so the
loss trajectory equals the single-process one exactly only where the loss is a deterministic
function of parameters and data (e.g. guide samples replaced by their means); otherwise the
two are two draws of the same stochastic optimisation. BatchNorm layers normalise over each
process's shard (as ``DistributedDataParallel`` without SyncBatchNorm); their running
statistics are those of rank 0, broadcast after every step.

Launching: :func:`spawn_fit` (``pyro-livi fit --nproc N``, ``fit(..., nproc=N)``) starts N local
processes with a free local port; under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT`` set) :func:`pyro_livi.run.fit` joins the launched process
group itself. Backend: ``gloo`` on CPU, ``nccl`` on CUDA (device ``cuda:LOCAL_RANK``). Only rank
0 writes checkpoints, the run directory and the progress bar; every rank keeps the same history.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyro
import torch
import torch.distributed as dist
from pyro.poutine.messenger import Messenger

from ..data.batch import Batch
from ..data.loader import MinibatchLoader
from ..errors import InputError
from .trainer import Trainer

#: Name of the plate over cells in every model of the zoo (``pyro.plate("cells", batch.n_cells,
#: subsample=batch.index)``); its sites are the ones rescaled per process.
CELL_PLATE = "cells"
#: Key of :attr:`Batch.extra` holding a shard's rescaling of the cell plate (b_r W / B).
SHARD_SCALE = "shard_scale"

__all__ = ["CELL_PLATE", "CellPlateScale", "DistributedContext", "DistributedTrainer", "ShardedLoader",
           "is_main_process", "shard_of_step", "shutdown", "spawn_fit"]

_OPENED_HERE = False  # whether this module initialised the default process group


# ------------------------------------------------------------------------------ processes
@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a data-parallel run.

    rank: 0..world_size-1 (rank 0 writes every file); world_size: number of processes;
    local_rank: index of the process on its machine (its CUDA device); backend: ``gloo`` or
    ``nccl``; device: where the collectives' tensors live (``cpu``, or ``cuda:local_rank``).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "cpu") -> "DistributedContext | None":
        """The context of a process launched by ``torchrun`` or :func:`spawn_fit`, joining (and,
        when nobody has, initialising from ``MASTER_ADDR``/``MASTER_PORT``) the default process
        group; None in a single process (no ``WORLD_SIZE`` above 1 and no process group).

        Raises InputError when ``device`` is cuda and this process's ``LOCAL_RANK`` has no GPU.
        """
        global _OPENED_HERE
        cuda = str(device).startswith("cuda")
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            world = int(os.environ.get("WORLD_SIZE", "1") or 1)
            if world <= 1:
                return None
            rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if cuda:
            if local_rank >= torch.cuda.device_count():
                raise InputError("<environment>", "LOCAL_RANK",
                                 f"process {local_rank} of this machine has no GPU "
                                 f"({torch.cuda.device_count()} visible)",
                                 "start at most one process per GPU (torchrun --nproc-per-node, "
                                 "--nproc), or train on --device cpu")
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
            _OPENED_HERE = True
        backend = str(dist.get_backend())
        comm = f"cuda:{local_rank}" if backend == "nccl" else "cpu"
        return cls(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=comm)

    def barrier(self) -> None:
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()


def is_main_process() -> bool:
    """False only in a process of a data-parallel run other than rank 0 (launched or initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def shutdown() -> None:
    """Destroy the default process group if :meth:`DistributedContext.from_env` created it."""
    global _OPENED_HERE
    if _OPENED_HERE and dist.is_initialized():
        dist.destroy_process_group()
    _OPENED_HERE = False


# --------------------------------------------------------------------------------- shards
def shard_of_step(step: np.ndarray, rank: int, world_size: int) -> tuple[np.ndarray, float]:
    """Process ``rank``'s cells of one global minibatch ``step`` (cell positions, length B) and the
    factor b_r W / B that rescales its cell plate (:class:`CellPlateScale`).

    The shards are ``numpy.array_split(step, world_size)``: contiguous, disjoint, their union is
    ``step``, sizes differ by at most one. When B < world_size, a process left without a cell
    gets the step's first cell with factor 0 (it contributes nothing but its global terms).
    """
    step = np.asarray(step, dtype=np.int64)
    part = np.array_split(step, world_size)[rank]
    if len(part) == 0:
        return step[:1], 0.0
    return part, len(part) * world_size / len(step)


class ShardedLoader:
    """One process's shard of every minibatch of :class:`~pyro_livi.data.loader.MinibatchLoader`.

    Every process iterates the same global minibatches (batch size ``batch_size``, the
    permutation of epoch ``e`` drawn from ``(seed, e)``) and yields the ``rank``-th of
    ``world_size`` contiguous pieces of each (:func:`shard_of_step`), with the piece's plate
    rescaling in ``batch.extra[SHARD_SCALE]``. All processes make ``len(self)`` steps per epoch
    (ceil(n_cells / batch_size)), the same as one process; the pieces of a step are disjoint and
    their union is the single-process minibatch of that step.

    Raises InputError for ``batch_size`` < 1, or a rank outside 0..world_size-1.
    """

    def __init__(self, dataset, batch_size: int, rank: int, world_size: int, shuffle: bool = True,
                 seed: int = 0, chunk_size: int | None = None, buffer_batches: int | None = None):
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise InputError("<distributed>", "rank", f"rank {rank} of world size {world_size}",
                             "give 0 <= rank < world_size")
        self.dataset = dataset
        self.rank, self.world_size = int(rank), int(world_size)
        self._steps = MinibatchLoader(dataset, batch_size=batch_size, shuffle=shuffle, seed=seed,
                                      chunk_size=chunk_size, buffer_batches=buffer_batches)
        self.batch_size = self._steps.batch_size

    @property
    def epoch(self) -> int:
        return self._steps.epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use the order of ``epoch``."""
        self._steps.set_epoch(epoch)

    def order(self, epoch: int | None = None) -> np.ndarray:
        """The global order of cells in ``epoch`` (the same on every process)."""
        return self._steps.order(epoch)

    def __len__(self) -> int:
        return len(self._steps)

    def shards(self, epoch: int | None = None) -> list[tuple[np.ndarray, float]]:
        """``(cell positions, plate factor)`` of this process for every step of ``epoch``."""
        order = self.order(epoch)
        B = self.batch_size
        return [shard_of_step(order[k * B:(k + 1) * B], self.rank, self.world_size) for k in range(len(self))]

    def __iter__(self):
        for step, block in self._steps.steps(self.epoch):
            positions, factor = shard_of_step(step, self.rank, self.world_size)
            batch = self.dataset.batch(positions) if block is None else self.dataset.batch(positions, block=block)
            batch.extra[SHARD_SCALE] = factor
            yield batch
        self._steps.epoch += 1


class CellPlateScale(Messenger):
    """Multiply the scale of every sample site inside the plate ``cells`` by ``factor``.

    With the plate's own scale N / b_r, the site's terms get N b_r W / (b_r B) = N W / B: the
    scale of the global minibatch times the number of processes, undone by the average of the
    gradients over processes (module docstring).
    """

    def __init__(self, factor: float, plate: str = CELL_PLATE):
        super().__init__()
        self.factor, self.plate = float(factor), plate

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and any(f.name == self.plate for f in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] * self.factor


def _scaled(fn, args, kwargs):
    batch = args[0] if args else kwargs.get("batch")
    factor = batch.extra.get(SHARD_SCALE) if isinstance(batch, Batch) else None
    if factor is None or factor == 1.0:
        return fn(*args, **kwargs)
    with CellPlateScale(factor):
        return fn(*args, **kwargs)


def _rank_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of process ``rank``'s random draws (guide samples, dropout) in ``epoch``."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(rank), 0xDD9])
               .generate_state(1)[0])


# -------------------------------------------------------------------------------- trainer
class DistributedTrainer(Trainer):
    """:class:`~pyro_livi.infer.trainer.Trainer` in one process of a data-parallel run.

    Takes the Trainer's arguments and ``context`` (:class:`DistributedContext`). Before training,
    every rank's parameter names and shapes are compared and the parameters and buffers are
    broadcast from rank 0. Each step: the rank's shard (:class:`ShardedLoader`), the ELBO with
    its cell plate rescaled (:class:`CellPlateScale`), gradients averaged over the ranks (one
    all-reduce per dtype; a parameter without gradient on every rank keeps none, as Adam skips
    it in one process), BatchNorm running statistics broadcast from rank 0. Each epoch: the
    random streams seeded by (seed, epoch, rank), so a resumed run draws as an uninterrupted
    one; the history's loss terms averaged over the ranks (each rank's terms estimate the full
    data's, see the module docstring), ``cells_per_s`` of the slowest rank; the validation loss
    computed on shards of the held-out cells and summed over ranks; early stopping decided by
    rank 0 and broadcast. Checkpoints are written by rank 0 only. After training, the ranks'
    parameters are compared and a RuntimeError names those that differ.
    """

    def __init__(self, *args, context: DistributedContext, **kwargs):
        super().__init__(*args, **kwargs)
        self.context = context
        if not context.is_main and self.config.progress:
            self.config = replace(self.config, progress=False)

    # ------------------------------------------------------------------ collectives
    def _comm(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.context.device)

    def _check_same_model(self) -> None:
        mine = [(n, tuple(t.shape), str(t.dtype)) for n, t in self.model.state_dict().items()]
        every = [None] * self.context.world_size
        dist.all_gather_object(every, mine)
        for rank, theirs in enumerate(every):
            if theirs != mine:
                differ = sorted(set(map(tuple, theirs)) ^ set(map(tuple, mine)))[:5]
                raise RuntimeError(f"data-parallel training: rank {rank} holds other parameters or buffers "
                                   f"than rank {self.context.rank} (first differences: {differ}); every "
                                   "process must build the same model from the same data and options")

    @torch.no_grad()
    def _broadcast_state(self) -> None:
        """Parameters and buffers of rank 0 on every rank (the model's ``state_dict`` tensors)."""
        for tensor in self.model.state_dict().values():
            buf = self._comm(tensor)
            dist.broadcast(buf, src=0)
            if buf is not tensor:
                tensor.copy_(buf)

    def _bn_buffers(self) -> list[torch.Tensor]:
        return [b for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                for b in m.buffers()]

    @torch.no_grad()
    def _after_backward(self) -> None:
        """Average the gradients of the trained parameters over the ranks (one all-reduce per
        dtype, with a flag per parameter: a parameter without gradient on every rank keeps none)."""
        params = [p for group in self._optimizer.param_groups for p in group["params"]]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        W = self.context.world_size
        for dtype, ps in by_dtype.items():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]
                             + [torch.tensor([float(p.grad is not None) for p in ps], dtype=dtype,
                                             device=ps[0].device)])
            flat = self._comm(flat)
            dist.all_reduce(flat)
            flat = flat.to(ps[0].device)
            flags = flat[-len(ps):]
            offset = 0
            for p, flag in zip(ps, flags.tolist()):
                n = p.numel()
                if flag > 0:
                    p.grad = flat[offset:offset + n].view_as(p).div_(W).clone()
                else:
                    p.grad = None
                offset += n
        for buf in self._bn_buffers():
            comm = self._comm(buf)
            dist.broadcast(comm, src=0)
            if comm is not buf:
                buf.copy_(comm)

    def _reduce_record(self, record: dict) -> dict:
        """The epoch's loss terms averaged over ranks; ``cells_per_s`` of the slowest rank."""
        keys = sorted(k for k, v in record.items()
                      if isinstance(v, float) and k not in ("epoch", "beta", "cells_per_s"))
        sums = self._comm(torch.tensor([record[k] for k in keys], dtype=torch.float64))
        dist.all_reduce(sums)
        out = dict(record)
        out.update({k: v / self.context.world_size for k, v in zip(keys, sums.cpu().tolist())})
        if "cells_per_s" in record:
            speed = self._comm(torch.tensor([record["cells_per_s"]], dtype=torch.float64))
            dist.all_reduce(speed, op=dist.ReduceOp.MIN)
            out["cells_per_s"] = float(speed.item())
        return out

    @torch.no_grad()
    def _check_ranks_agree(self) -> None:
        named = [(n, p) for n, p in self.model.named_parameters()]
        if not named:
            return
        flat = self._comm(torch.cat([p.detach().reshape(-1).float() for _, p in named]))
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        differs = torch.zeros(len(named), device=flat.device)
        offset = 0
        for k, (_, p) in enumerate(named):
            n = p.numel()
            differs[k] = float(not torch.equal(flat[offset:offset + n], ref[offset:offset + n]))
            offset += n
        dist.all_reduce(differs)
        bad = [n for (n, _), d in zip(named, differs.tolist()) if d > 0]
        if bad:
            raise RuntimeError(f"data-parallel training: the parameters {bad[:5]} differ between ranks "
                               "after training (the gradient all-reduce must keep them equal)")

    # ------------------------------------------------------------------ Trainer hooks
    def fit(self, resume: bool = False):
        self.model.to(torch.device(self.config.device))
        self._check_same_model()
        self._broadcast_state()
        history = super().fit(resume=resume)
        self._check_ranks_agree()
        return history

    def _make_loader(self) -> ShardedLoader:
        return ShardedLoader(self.dataset, self.config.batch_size, self.context.rank, self.context.world_size,
                             shuffle=True, seed=self.config.seed, chunk_size=self.config.chunk_size,
                             buffer_batches=self.config.buffer_batches)

    def stage_model(self, *args, **kwargs):
        return _scaled(super().stage_model, args, kwargs)

    def stage_guide(self, *args, **kwargs):
        return _scaled(super().stage_guide, args, kwargs)

    def _run_epoch(self, stage, loader, n_cells, device) -> dict:
        pyro.set_rng_seed(_rank_seed(self.config.seed, self._position["epoch"], self.context.rank))
        return self._reduce_record(super()._run_epoch(stage, loader, n_cells, device))

    def _validation_batches(self, cells):
        """This rank's shard of every held-out minibatch (rescaled like training shards), with
        the number of held-out cells of the whole minibatch."""
        loader = ShardedLoader(cells, self.config.batch_size, self.context.rank, self.context.world_size,
                               shuffle=False)
        for k, batch in enumerate(loader):
            yield batch, min(loader.batch_size, cells.n_cells - k * loader.batch_size)

    def _combine_validation(self, total: float) -> float:
        """The ranks' held-out totals, averaged (each estimates the whole run's)."""
        summed = self._comm(torch.tensor([total], dtype=torch.float64))
        dist.all_reduce(summed)
        return float(summed.item()) / self.context.world_size

    def _stalled(self, *args, **kwargs) -> bool:
        """Rank 0's early-stopping decision, on every rank (each rank also updates its own state
        from the same reduced losses and parameters)."""
        stopped = [bool(super()._stalled(*args, **kwargs))]
        dist.broadcast_object_list(stopped, src=0, device=torch.device(self.context.device))
        return stopped[0]

    def save_checkpoint(self) -> None:
        if self.context.is_main:
            super().save_checkpoint()
        elif self.checkpoint_dir is not None and not self._nonfinite_parameters():
            self._checkpoint_epoch = self._position["epoch"] - 1


# ---------------------------------------------------------------------------- launching
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _save_error(folder: str, rank: int, err: BaseException) -> None:
    info = {"time": time.time(), "rank": rank, "type": type(err), "args": err.args,
            "state": dict(getattr(err, "__dict__", {})),
            "traceback": "".join(traceback.format_exception(err))}
    try:
        blob = pickle.dumps(info)
        pickle.loads(blob)
    except Exception:  # noqa: BLE001 - an exception that does not pickle is reported by its text
        blob = pickle.dumps({**info, "type": RuntimeError, "args": (f"{type(err).__name__}: {err}",),
                             "state": {}})
    Path(folder, f"error-{rank}.pkl").write_bytes(blob)


def _first_error(folder: str) -> BaseException | None:
    """The earliest exception raised by a worker (the others usually follow from it)."""
    found = []
    for path in Path(folder).glob("error-*.pkl"):
        try:
            found.append(pickle.loads(path.read_bytes()))
        except Exception:  # noqa: BLE001
            continue
    if not found:
        return None
    info = min(found, key=lambda i: i["time"])
    cls = info["type"]
    err = cls.__new__(cls)
    BaseException.__init__(err, *info["args"])
    try:
        err.__dict__.update(info["state"])
    except (AttributeError, TypeError):
        pass
    err.add_note(f"raised in process {info['rank']} of the data-parallel run:\n{info['traceback']}")
    return err


def _worker_main(folder: str) -> None:
    """One process started by :func:`spawn_fit` (rank and rendezvous in its environment): runs
    :func:`pyro_livi.run.fit`; rank 0 saves what the parent returns; an exception is saved for
    the parent and ends the process with status 1."""
    rank = int(os.environ["RANK"])
    try:
        job = torch.load(Path(folder, "job.pt"), weights_only=False)
        torch.set_num_threads(job["threads"])
        from ..run import fit

        result = fit(**job["fit_kwargs"])
        if rank == 0:
            model = result.model
            torch.save({"model": type(model).registry_name, "config": model.config,
                        "state": {k: v.cpu() for k, v in model.state_dict().items()},
                        "history": result.history, "validation": result.validation,
                        "spec": result.dataset.spec.to_dict()}, Path(folder, "result.pt"))
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the parent
        _save_error(folder, rank, err)
        raise SystemExit(1) from None
    finally:
        shutdown()


def _launch(folder: str, nproc: int) -> None:
    """Start ``nproc`` worker processes on this machine and wait for them; when one fails, the
    others are stopped and the first exception raised is raised here."""
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    code = "import sys; from pyro_livi.infer.distributed import _worker_main; _worker_main(sys.argv[1])"
    procs = []
    try:
        for rank in range(nproc):
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                       WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0")
            procs.append(subprocess.Popen([sys.executable, "-c", code, folder], env=dict(env)))
        failed = None
        while failed is None and any(p.poll() is None for p in procs):
            failed = next((p for p in procs if p.poll() not in (None, 0)), None)
            time.sleep(0.05)
        failed = failed or next((p for p in procs if p.returncode != 0), None)
        if failed is not None:
            cause = _first_error(folder)
            if cause is not None:
                raise cause
            raise RuntimeError(f"data-parallel training failed: process {procs.index(failed)} exited with "
                               f"status {failed.returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def spawn_fit(fit_kwargs: dict, nproc: int):
    """:func:`pyro_livi.run.fit` data-parallel in ``nproc`` local processes; returns its
    :class:`~pyro_livi.run.FitResult` (the model trained by the processes, the data read again
    here, the history; the tables when ``out`` is given, which rank 0 wrote).

    ``fit_kwargs``: the arguments of :func:`~pyro_livi.run.fit` (without ``nproc``), handed to
    the processes through a temporary file (an in-memory AnnData/MuData is pickled there). The
    processes are fresh interpreters (``python -c``, this process's ``sys.path``; a script
    calling this needs no ``if __name__ == "__main__"`` guard); they rendezvous on 127.0.0.1
    at a free port with the environment torchrun would give them (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), use ``gloo`` (``nccl`` with
    ``device="cuda"``, one GPU per process) and share this process's torch threads (each gets
    ``max(1, torch.get_num_threads() // nproc)``). An exception in a process stops the others
    and is raised here (same type and message), with the process's traceback as a note.
    Raises InputError inside an already launched run (torchrun), or with more CUDA processes
    than GPUs.
    """
    from ..analysis.latents import output_tables
    from ..data import read_dataset
    from ..models import MODELS
    from ..run import FitResult

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 or (dist.is_available() and dist.is_initialized()):
        raise InputError("<arguments>", "nproc", "this process is already one of a data-parallel run "
                         "(WORLD_SIZE is set, e.g. by torchrun)",
                         "drop --nproc (nproc=) under torchrun: torchrun starts the processes")
    device = str(fit_kwargs.get("device", "cpu"))
    if device.startswith("cuda") and nproc > torch.cuda.device_count():
        raise InputError("<arguments>", "nproc", f"{nproc} processes on CUDA but {torch.cuda.device_count()} "
                         "GPU(s) visible", "give at most one process per GPU")
    threads = max(1, torch.get_num_threads() // nproc)
    with tempfile.TemporaryDirectory(prefix="pyro_livi_ddp_") as folder:
        torch.save({"fit_kwargs": dict(fit_kwargs), "threads": threads}, Path(folder, "job.pt"))
        _launch(folder, nproc)
        saved = torch.load(Path(folder, "result.pt"), weights_only=False)
    model = MODELS[saved["model"]](**saved["config"])
    model.load_state_dict(saved["state"])
    dataset = read_dataset(fit_kwargs["data"], saved["spec"])
    result = FitResult(model=model, dataset=dataset, history=saved["history"], validation=saved["validation"])
    result.tables = output_tables(model, dataset)
    out = fit_kwargs.get("out")
    if out is not None:
        result.run_dir = Path(out)
    return result
