"""The minibatch every model in the zoo consumes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class Batch:
    """One minibatch of cells, dense only at batch size.

    Attributes
    ----------
    index : LongTensor, shape (B,)
        Row of each cell in the full dataset (used as the ``subsample`` of the cell plate).
    n_cells : int
        Number of cells in the full dataset (the cell plate's size, so the plate scales
        cell-level terms by ``n_cells / B``).
    x : dict[str, Tensor]
        Modality name -> values, float32, shape (B, n_features[modality]): raw counts, or
        continuous values for the dataset's continuous modalities.
    size_factor : dict[str, Tensor]
        Modality name -> total count of each cell in that modality, shape (B,), in counts
        (1.0 for continuous modalities).
    present : dict[str, BoolTensor]
        Modality name -> whether the cell was measured in that modality, shape (B,).
        Cells absent from a modality have zeros in ``x`` and must be masked out of its
        observation site.
    donor : LongTensor, shape (B,), or None
        Integer donor code of each cell (see :class:`pyro_livi.data.DonorIndex`); None for
        data read without a donor key.
    covariates : LongTensor, shape (B, n_covariates)
        Integer category code of each categorical covariate (may have zero columns).
    """

    index: torch.Tensor
    n_cells: int
    x: dict[str, torch.Tensor]
    size_factor: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    donor: torch.Tensor | None
    covariates: torch.Tensor
    extra: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.index.shape[0])

    def to(self, device) -> "Batch":
        """The same batch with every tensor on ``device``."""
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return replace(
            self,
            index=self.index.to(device),
            x=move(self.x),
            size_factor=move(self.size_factor),
            present=move(self.present),
            donor=None if self.donor is None else self.donor.to(device),
            covariates=self.covariates.to(device),
        )
