"""Minibatches over a :class:`~pyro_livi.data.expression.SingleCellDataset`."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pyro_livi.data.batch import Batch
from pyro_livi.errors import InputError


class MinibatchLoader:
    """Iterate over a dataset in minibatches of cells, each cell once per epoch.

    The order of epoch ``e`` is a pure function of ``(seed, e)``: a permutation drawn from
    ``numpy.random.default_rng([seed, e])`` (or ``0..n_cells-1`` with ``shuffle=False``),
    so a run resumed at epoch ``e`` (``set_epoch(e)``) sees the same batches as an
    uninterrupted one.

    ``epoch`` is the epoch the next iteration uses. A completed pass advances it by one, so
    plain ``for batch in loader`` loops see a new order every epoch; a pass left early
    (``break``) does not advance it. Calling ``set_epoch(e)`` before each pass, as a
    training loop that checkpoints does, gives the same result.

    Parameters
    ----------
    dataset : SingleCellDataset
    batch_size : int
        Cells per batch (the last batch may be smaller unless ``drop_last``).
    shuffle : bool
    seed : int
    drop_last : bool
        Skip the last, smaller batch (its cells are then not seen in that epoch).
    """

    def __init__(self, dataset, batch_size: int = 1024, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        if int(batch_size) < 1:
            raise InputError(dataset.source, "batch_size", f"must be >= 1, got {batch_size}",
                             "give a positive batch size")
        if drop_last and dataset.n_cells < batch_size:
            raise InputError(dataset.source, "batch_size",
                             f"drop_last=True with batch_size={batch_size} larger than the "
                             f"{dataset.n_cells} cells would give no batch at all",
                             "use a smaller batch size, or drop_last=False")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use the order of ``epoch``."""
        if int(epoch) < 0:
            raise InputError(self.dataset.source, "epoch", f"must be >= 0, got {epoch}",
                             "give a non-negative epoch number")
        self.epoch = int(epoch)

    def order(self, epoch: int | None = None) -> np.ndarray:
        """Cell positions in the order of ``epoch`` (default: the current one), int64."""
        epoch = self.epoch if epoch is None else int(epoch)
        n = self.dataset.n_cells
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(n).astype(np.int64)

    def __len__(self) -> int:
        n = self.dataset.n_cells
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        order = self.order(self.epoch)
        for k in range(len(self)):
            yield self.dataset.batch(order[k * self.batch_size:(k + 1) * self.batch_size])
        self.epoch += 1
