"""Training: the SVI loop, stages, checkpoints, early stopping, progress."""

from .elbo import elbo_terms
from .stages import EarlyStopping, KLWarmup, Stage
from .trainer import Trainer, TrainingConfig, TrainingDivergedError, seed_everything

__all__ = ["elbo_terms", "EarlyStopping", "KLWarmup", "Stage", "Trainer", "TrainingConfig",
           "TrainingDivergedError", "seed_everything"]
