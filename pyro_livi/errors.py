"""Errors raised on bad input or failed training; each message names where, what and the fix.

Messages name the fix in both interfaces, the CLI flag and the Python keyword (e.g.
``--resume`` / ``resume=True``), because the same checks serve ``pyro-livi`` and the Python API.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: the message says where (file, field) and how to fix it."""

    def __init__(self, source, field, problem, fix):
        self.source, self.field, self.problem, self.fix = str(source), field, problem, fix
        super().__init__(f"{self.source}: field '{field}': {problem}. Fix: {fix}")


class RunDirectoryError(InputError):
    """A run directory (``--out`` / ``out=``) cannot be used as asked: it holds another run, has
    no checkpoint to resume from, or its checkpoint was made with other settings."""


class TrainingDivergedError(RuntimeError):
    """Training failed numerically (a NaN/inf loss, parameter, gradient or distribution
    argument, or an exploding loss).

    Attributes: ``stage``, ``epoch`` (0-based, over all stages), ``batch`` (within the epoch),
    ``what`` (the site or parameter that went non-finite), ``checkpoint`` (path of the last
    checkpoint written, which holds finite parameters, or None when none was written),
    ``checkpoint_epoch`` (the epoch it was written after), ``lr``.
    """

    def __init__(self, what: str, *, stage: str, epoch: int, batch: int | None,
                 checkpoint=None, checkpoint_epoch: int | None = None, no_checkpoint_reason: str = "",
                 lr: float | None = None, group_lr: dict | None = None):
        self.what, self.stage, self.epoch, self.batch = what, stage, epoch, batch
        self.checkpoint, self.checkpoint_epoch, self.lr = checkpoint, checkpoint_epoch, lr
        where = f"in stage {stage!r} at epoch {epoch}" + ("" if batch is None else f" (batch {batch})")
        if checkpoint is not None:
            saved = f"Last good checkpoint: {checkpoint} (written after epoch {checkpoint_epoch})"
        else:
            saved = f"No checkpoint was written ({no_checkpoint_reason or 'none kept'})"
        if lr is not None:
            lower = f"{lr / 10:.3g}"
            fix = (f"lower the learning rate, e.g. ten-fold (--lr {lower} on the CLI, lr={lower} in "
                   f"Python; it was {lr:g})")
        else:
            fix = "lower the learning rate"
        if group_lr:
            fix += (f"; this stage also trains {sorted(group_lr)} at their own rates {group_lr}, "
                    "lower those too if the failing parameter is theirs (the model's *_lr option, e.g. "
                    "--donor-lr / donor_lr= of the LIVI family)")
        fix += (", then start again (--overwrite / overwrite=True over the same run directory); if it "
                "keeps failing, check the input (raw counts, no extreme values)")
        super().__init__(f"training diverged {where}: {what}. {saved}. Fix: {fix}")
