"""Minibatches over a :class:`~pyro_livi.data.expression.SingleCellDataset`.

Two shuffles, both a pure function of ``(seed, epoch)`` and both visiting every cell exactly once
per epoch:

- **cell-level** (``chunk_size=1``, the default for data in memory): a uniform random
  permutation of the cells; each minibatch reads its own rows.
- **chunked, buffered** (``chunk_size > 1``, the default for backed data, 128 cells): the cells
  are cut into contiguous chunks of ``chunk_size`` rows, the chunks are shuffled, consecutive
  shuffled chunks are gathered into a buffer of ``buffer_batches * batch_size`` cells, the
  cells of the buffer are shuffled, and the buffer is cut into minibatches. A buffer is read
  from disk in one contiguous slice per chunk (:meth:`SingleCellDataset.prefetch`) and stays
  sparse as stored; only the rows of a minibatch are made dense. Random single-row reads from
  a backed CSR file cost one HDF5 read per row; this costs one per chunk.

The chunked order mixes cells less than a full permutation: a minibatch draws its cells from the
``buffer_batches * batch_size / chunk_size`` chunks of its buffer (256 with the defaults and
batch size 1024), about ``batch_size / that`` cells from each. Cells stored next to each other
(often of one donor or sample) therefore meet in a minibatch more often than by chance, but a
minibatch never consists of one chunk (the same idea as the block shuffling of
scvi-tools' and anndata's on-disk loaders).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pyro_livi.data.batch import Batch
from pyro_livi.errors import InputError

#: Cells per contiguous chunk of the chunked shuffle, used for backed data when ``chunk_size`` is None.
DEFAULT_CHUNK_SIZE = 128

#: Minibatches' worth of cells in one shuffle buffer when ``buffer_batches`` is None.
DEFAULT_BUFFER_BATCHES = 32


def unset_defaults(chunk_size, buffer_batches, backed: bool) -> tuple:
    """``(chunk_size, buffer_batches)`` with a value equal to its default for this data (chunks of
    :data:`DEFAULT_CHUNK_SIZE` cells when ``backed``, else 1; :data:`DEFAULT_BUFFER_BATCHES`)
    replaced by None, so that a run records, and compares on resume, the same settings whether
    the defaults were spelled out or left unset. Other values, valid or not, pass unchanged."""
    default_chunk = DEFAULT_CHUNK_SIZE if backed else 1
    return (None if chunk_size is not None and chunk_size == default_chunk else chunk_size,
            None if buffer_batches is not None and buffer_batches == DEFAULT_BUFFER_BATCHES else buffer_batches)


def chunked_order(n_cells: int, chunk_size: int, buffer_cells: int,
                  rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``0..n_cells-1`` made of shuffled contiguous chunks, shuffled within buffers.

    The cells are cut into ``ceil(n_cells / chunk_size)`` chunks ``[k * chunk_size, (k + 1) *
    chunk_size)`` (the last may be shorter); the chunks are put in a random order; the resulting
    sequence is cut into consecutive buffers of ``buffer_cells`` cells (the last may be shorter)
    and the cells of each buffer are permuted. Returns int64, shape (n_cells,).
    """
    n, c = int(n_cells), int(chunk_size)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    n_chunks = -(-n // c)
    starts = rng.permutation(n_chunks).astype(np.int64) * c
    lengths = np.minimum(c, n - starts)
    offsets = np.cumsum(lengths) - lengths
    order = np.arange(n, dtype=np.int64) + np.repeat(starts - offsets, lengths)
    for s in range(0, n, int(buffer_cells)):
        part = order[s:s + int(buffer_cells)]
        order[s:s + part.size] = part[rng.permutation(part.size)]
    return order


class MinibatchLoader:
    """Iterate over a dataset in minibatches of cells, each cell once per epoch.

    The order of epoch ``e`` is a pure function of ``(seed, e)``: drawn from
    ``numpy.random.default_rng([seed, e])`` (or ``0..n_cells-1`` with ``shuffle=False``),
    so a run resumed at epoch ``e`` (``set_epoch(e)``) sees the same batches as an
    uninterrupted one. With ``chunk_size`` 1 it is a permutation of the cells; with
    ``chunk_size`` > 1 the chunked, buffered order of :func:`chunked_order` (module docstring),
    whose buffers are each read at once.

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
    chunk_size : int or None
        Cells per contiguous chunk of the shuffle. None: :data:`DEFAULT_CHUNK_SIZE` (128) when
        the dataset is backed (read from disk), 1 (a permutation of the cells) in memory. 1 gives
        the cell-level permutation for any data. Larger chunks read faster and mix less.
    buffer_batches : int or None
        Minibatches' worth of cells gathered and shuffled together (None:
        :data:`DEFAULT_BUFFER_BATCHES`, 32). Memory of a buffer: ``buffer_batches * batch_size``
        cells as stored (sparse: their non-zero values). Only with a chunked shuffle.

    Raises InputError for a batch size, chunk size or buffer size below 1, for ``buffer_batches``
    with the cell-level shuffle (``chunk_size`` 1, given or the in-memory default), which has no
    buffer, and for ``drop_last`` with fewer cells than one batch.
    """

    def __init__(self, dataset, batch_size: int = 1024, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, chunk_size: int | None = None,
                 buffer_batches: int | None = None):
        if int(batch_size) < 1:
            raise InputError(dataset.source, "batch_size", f"must be >= 1, got {batch_size}",
                             "give a positive batch size")
        if drop_last and dataset.n_cells < batch_size:
            raise InputError(dataset.source, "batch_size",
                             f"drop_last=True with batch_size={batch_size} larger than the "
                             f"{dataset.n_cells} cells would give no batch at all",
                             "use a smaller batch size, or drop_last=False")
        for name, value in (("chunk_size", chunk_size), ("buffer_batches", buffer_batches)):
            if value is not None and (int(value) != value or int(value) < 1):
                raise InputError(dataset.source, name, f"must be a whole number >= 1, got {value!r}",
                                 f"give {name} >= 1 (--{name.replace('_', '-')} on the CLI), or leave "
                                 "it unset for the default")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        if chunk_size is None:
            chunk_size = DEFAULT_CHUNK_SIZE if getattr(dataset, "backed", False) else 1
        if int(chunk_size) == 1 and buffer_batches is not None:
            raise InputError(dataset.source, "buffer_batches",
                             f"is {buffer_batches}, but the shuffle is cell-level (chunk_size 1"
                             + ("" if getattr(dataset, "backed", False) else ", the default for data in memory")
                             + "), which has no shuffle buffer",
                             "give chunk_size > 1 (--chunk-size on the CLI) for a chunked, buffered "
                             "shuffle, or leave buffer_batches (--buffer-batches) unset")
        #: resolved chunk size (1: cell-level permutation)
        self.chunk_size = int(chunk_size)
        #: resolved number of minibatches per shuffle buffer
        self.buffer_batches = int(DEFAULT_BUFFER_BATCHES if buffer_batches is None else buffer_batches)
        self.epoch = 0

    @property
    def buffered(self) -> bool:
        """Whether a pass reads whole buffers (chunked shuffle) rather than minibatch by minibatch."""
        return self.shuffle and self.chunk_size > 1

    @property
    def buffer_cells(self) -> int:
        """Cells per shuffle buffer, ``buffer_batches * batch_size``."""
        return self.buffer_batches * self.batch_size

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
        rng = np.random.default_rng([self.seed, epoch])
        if self.chunk_size == 1:
            return rng.permutation(n).astype(np.int64)
        return chunked_order(n, self.chunk_size, self.buffer_cells, rng)

    def __len__(self) -> int:
        n = self.dataset.n_cells
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def steps(self, epoch: int | None = None) -> Iterator[tuple[np.ndarray, object]]:
        """``(cell positions, prefetched rows or None)`` of every minibatch of ``epoch``.

        With the chunked shuffle, the rows of each buffer are read once
        (:meth:`SingleCellDataset.prefetch`, sparse as stored) and handed with each of its
        minibatches; otherwise the second element is None and each minibatch reads its own rows.
        """
        order = self.order(epoch)
        B, n_batches = self.batch_size, len(self)
        if not self.buffered:
            for k in range(n_batches):
                yield order[k * B:(k + 1) * B], None
            return
        used = min(order.size, n_batches * B)
        per = self.buffer_cells
        for s in range(0, used, per):
            block = self.dataset.prefetch(order[s:min(s + per, used)])
            for k in range(s // B, min(n_batches, (s + per) // B)):
                yield order[k * B:(k + 1) * B], block
            del block

    def __iter__(self) -> Iterator[Batch]:
        for positions, block in self.steps(self.epoch):
            yield self.dataset.batch(positions) if block is None else self.dataset.batch(positions, block=block)
        self.epoch += 1
