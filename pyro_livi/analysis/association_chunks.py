"""SNP chunks of the association scan: where they are read from, the work done on each,
and where that work runs (this process, or the workers of a Dask cluster).

The association (:func:`~pyro_livi.analysis.association.associate_factors`) walks the
SNPs in chunks of ``chunk_size`` twice at most: once for QC counts and the kinship
(only when the kinship is computed from the genotypes), once for the scan. Each chunk is
one task, a module-level function of picklable arguments:

- :func:`qc_kinship_task`: SNP QC of the chunk and its kinship contribution
  ``Z Z^T`` (:class:`~pyro_livi.data.kinship.KinshipAccumulator`), in total or per
  chromosome (leave-one-chromosome-out kinships);
- :func:`scan_task`: SNP QC, the rotation ``Q0^T G`` and the test of every factor
  (:class:`~pyro_livi.analysis.association.ScanPlan`).

A :class:`ChunkSource` reads a chunk's dosages for the analysed donors: a PLINK ``.bed``
read by column window with bed-reader (memory: one chunk), or an in-memory matrix whose
chunk travels with the task. :class:`LocalExecutor` runs the tasks one after the other
in this process; :class:`DaskExecutor` submits them to a ``dask.distributed`` cluster
(``pip install "pyro-livi[distributed]"``), a bounded number at a time, and returns the
results in chunk order, so both give the same numbers. PLINK paths must be readable by
the workers at the same path (a shared file system).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from pyro_livi.errors import InputError

#: What to install for the distributed scan.
DISTRIBUTED_INSTALL = 'pip install "pyro-livi[distributed]"'


# --------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------


@dataclass
class ChunkSource:
    """Where the dosages of the analysed donors come from.

    ``bed``: path of a PLINK ``.bed`` (``iid_count`` donors x ``sid_count`` SNPs in the
    file; ``rows``: positions of the analysed donors in its ``.fam``, in analysis order),
    or None for an in-memory matrix, whose chunks are passed with each task.
    """

    bed: str | None = None
    iid_count: int = 0
    sid_count: int = 0
    rows: np.ndarray | None = None

    @classmethod
    def from_genotypes(cls, geno, donors) -> "ChunkSource":
        """``geno``: a PlinkReader (read lazily) or a Genotypes already restricted to
        ``donors`` in that order (in memory)."""
        from pyro_livi.data.genotypes import PlinkReader

        if isinstance(geno, PlinkReader):
            pos = {d: i for i, d in enumerate(geno.donors)}
            rows = np.array([pos[str(d)] for d in donors], dtype=np.intp)
            return cls(geno.source, geno.n_donors, geno.n_snps, rows)
        return cls()

    def payload(self, geno, idx: np.ndarray):
        """What a task needs to get the dosages of SNPs ``idx``: the indices (PLINK) or
        the (n_donors, len(idx)) block itself (memory)."""
        if self.bed is not None:
            return idx
        return geno.dosages[:, idx]

    def read(self, payload) -> np.ndarray:
        """(n_donors, m) float64 dosages (NaN = missing) of a payload."""
        if self.bed is None:
            return np.asarray(payload, dtype=np.float64)
        idx = np.asarray(payload)
        contiguous = idx.size and idx[-1] - idx[0] + 1 == idx.size
        cols = slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx
        try:
            bed = _open_bed(self.bed, self.iid_count, self.sid_count)
            return bed.read(index=np.s_[self.rows, cols], dtype="float64", order="C")
        except (OSError, ValueError) as err:
            raise InputError(self.bed, "bed", f"cannot read SNPs {int(idx[0])}.."
                             f"{int(idx[-1])}: {err}", "on a Dask cluster, every worker "
                             "must see the PLINK files at the same path (shared file "
                             "system)") from err


_BED_CACHE: dict = {}


def _open_bed(path: str, iid_count: int, sid_count: int):
    """bed-reader's ``open_bed`` with known counts (no .fam/.bim parsing), one per
    process and file."""
    key = (path, iid_count, sid_count)
    bed = _BED_CACHE.get(key)
    if bed is None:
        from bed_reader import open_bed

        bed = open_bed(path, iid_count=iid_count, sid_count=sid_count)
        _BED_CACHE.clear()
        _BED_CACHE[key] = bed
    return bed


# --------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------


def qc_kinship_task(payload, idx: np.ndarray, maf: float, kinship: bool,
                    chrom_codes: np.ndarray | None = None, *, source: ChunkSource) -> dict:
    """QC counts of one chunk and, when ``kinship``, its contribution to the kinship.

    ``payload``: :meth:`ChunkSource.payload` of the chunk; ``idx``: its SNP indices;
    ``chrom_codes``: per SNP of the chunk, an integer
    chromosome code (a leave-one-chromosome-out kinship keeps one accumulator per
    chromosome), or None (one accumulator). Returns ``kept`` (SNP indices passing QC),
    ``counts`` and ``kinship``: None, a KinshipAccumulator, or {code: accumulator}.
    """
    from pyro_livi.data.genotypes import qc_dosage_block
    from pyro_livi.data.kinship import KinshipAccumulator

    block = qc_dosage_block(source.read(payload), maf, copy=False)
    out = {"kept": idx[block.keep], "counts": block.counts, "kinship": None}
    if not kinship or block.dosages.shape[1] == 0:
        return out
    n = block.dosages.shape[0]
    if chrom_codes is None:
        acc = KinshipAccumulator(n)
        acc.add(block.dosages)
        out["kinship"] = acc
        return out
    codes = np.asarray(chrom_codes)[block.keep]
    parts = {}
    for code in dict.fromkeys(codes.tolist()):
        acc = KinshipAccumulator(n)
        acc.add(block.dosages[:, codes == code])
        parts[int(code)] = acc
    out["kinship"] = parts
    return out


def scan_task(payload, idx: np.ndarray, maf: float, *, source: ChunkSource, plan) -> dict:
    """QC, rotation and the test of every factor of ``plan`` (a ScanPlan) on one chunk.

    Returns ``kept`` (SNP indices tested), ``counts`` (QC), ``maf`` (minor-allele
    frequency of each kept SNP) and (K, kept) arrays ``beta``, ``se``, ``pvalue``.
    """
    from pyro_livi.data.genotypes import qc_dosage_block

    block = qc_dosage_block(source.read(payload), maf, copy=False)
    G = block.dosages
    out = {"kept": idx[block.keep], "counts": block.counts}
    K = plan.n_factors
    if G.shape[1] == 0:
        empty = np.empty((K, 0))
        out.update(maf=np.empty(0), beta=empty, se=empty, pvalue=empty)
        return out
    freq = G.mean(axis=0) / 2.0
    out["maf"] = np.minimum(freq, 1.0 - freq)
    r = plan.scan(plan.rotate(G))
    out.update(beta=r["beta"], se=r["se"], pvalue=r["pvalue"])
    return out


# --------------------------------------------------------------------------------------
# executors
# --------------------------------------------------------------------------------------


class LocalExecutor:
    """Run chunk tasks one after the other in this process."""

    description = "this process"

    def map(self, func: Callable, arguments: Iterable[tuple], **shared) -> Iterator[Any]:
        """``func(*args, **shared)`` for each tuple of ``arguments``, in order."""
        for args in arguments:
            yield func(*args, **shared)

    def close(self) -> None:
        pass


class DaskExecutor:
    """Run chunk tasks on a ``dask.distributed`` cluster.

    ``client``: a ``distributed.Client``. ``shared`` keyword arguments of :meth:`map`
    (the chunk source, the scan plan) are sent to every worker once
    (``Client.scatter(..., broadcast=True)``); at most ``max_in_flight`` tasks are
    pending at a time (default: twice the cluster's threads), and results come back in
    chunk order.
    """

    def __init__(self, client, max_in_flight: int | None = None, own_client: bool = False):
        self.client = client
        self.own_client = own_client
        if max_in_flight is None:
            threads = sum(client.nthreads().values()) or 1
            max_in_flight = 2 * threads
        self.max_in_flight = max(1, int(max_in_flight))
        self.description = f"Dask cluster at {client.scheduler.address}"

    def map(self, func: Callable, arguments: Iterable[tuple], **shared) -> Iterator[Any]:
        from collections import deque

        futures_shared = {k: self.client.scatter(v, broadcast=True, hash=False)
                          for k, v in shared.items()}
        pending: deque = deque()
        try:
            for args in arguments:
                pending.append(self.client.submit(func, *args, **futures_shared,
                                                  pure=False))
                if len(pending) >= self.max_in_flight:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()
            for fut in futures_shared.values():
                fut.release()

    def close(self) -> None:
        if self.own_client:
            self.client.close()


def _import_distributed():
    try:
        import distributed
    except ImportError as err:
        raise InputError("dask_scheduler", "--dask-scheduler", "the distributed scan needs "
                         "dask.distributed, which is not installed", f"{DISTRIBUTED_INSTALL}"
                         " (or run without --dask-scheduler)") from err
    return distributed


def make_executor(dask_scheduler=None):
    """The executor of the chunk tasks.

    ``dask_scheduler``: None (this process), a ``distributed.Client``, or a scheduler
    address (``"tcp://host:8786"``; a client is opened and closed with the executor).
    Raises InputError when dask.distributed is missing or the scheduler cannot be
    reached.
    """
    if dask_scheduler is None:
        return LocalExecutor()
    distributed = _import_distributed()
    if isinstance(dask_scheduler, distributed.Client):
        return DaskExecutor(dask_scheduler)
    if not isinstance(dask_scheduler, str) or not dask_scheduler.strip():
        raise InputError("dask_scheduler", "--dask-scheduler", f"expected a scheduler "
                         f"address or a distributed.Client, got {dask_scheduler!r}",
                         "pass the address the scheduler prints, e.g. tcp://host:8786")
    try:
        client = distributed.Client(dask_scheduler.strip(), timeout="20s")
    except (OSError, TimeoutError) as err:
        raise InputError("dask_scheduler", "--dask-scheduler", f"cannot connect to the "
                         f"Dask scheduler at {dask_scheduler!r}: {err}", "start one "
                         "(`dask scheduler`, then `dask worker ADDRESS` on each machine) "
                         "and pass the address it prints") from err
    return DaskExecutor(client, own_client=True)


def progress(iterable, total: int, desc: str, enabled: bool):
    """tqdm progress bar on stderr (disabled when ``enabled`` is false)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, file=sys.stderr,
                leave=False)
