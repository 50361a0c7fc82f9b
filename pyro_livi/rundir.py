"""Run directories: what a run wrote, and the rule that a run directory is never silently mixed
or clobbered (refuse, resume after checking the settings and data, or overwrite only a run's own
files)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import RunDirectoryError
from .infer.trainer import CHECKPOINT_NAME, read_checkpoint, shown_setting
from .models import MODELS
from .outputs import remove_outputs
from .persistence import MODEL_FILE

#: Files every run writes at the top of RUN_DIR (besides its tables, ``<name>.tsv``).
RUN_FILES = (MODEL_FILE, "run.json", "history.tsv", "loss_curve.png")
CHECKPOINT_DIR = "checkpoints"
#: CLI flag of each argument of :func:`fit` that a resume compares (model options: --name-with-dashes).
_FLAGS = {"model": "--model", "epochs": "--epochs", "patience": "--patience", "batch_size": "--batch-size",
          "lr": "--lr", "seed": "--seed", "likelihoods": "--likelihood / --protein-likelihood",
          "modalities": "--modalities / --layer", "donor_key": "--donor-key",
          "covariate_keys": "--covariate-keys", "label_keys": "--label-keys",
          "optional_modalities": "--optional-modalities", "continuous_modalities": "--continuous-modalities",
          "data": "--data"}


def data_fingerprint(dataset) -> dict:
    """What identifies the data of a run cheaply: cell and feature counts and a hash of the cell
    ids and feature names (the values are not hashed)."""
    digest = hashlib.sha256()
    digest.update("\x1f".join(map(str, dataset.obs_names)).encode())
    for m in dataset.modalities:
        digest.update(f"\x1e{m}\x1e".encode() + "\x1f".join(map(str, dataset.feature_names[m])).encode())
    return {"n_cells": int(dataset.n_cells), "n_features": {m: int(n) for m, n in dataset.n_features.items()},
            "ids_sha256": digest.hexdigest()[:16]}


def run_outputs(out: str | Path) -> list[Path]:
    """The files in ``out`` that a run wrote: those listed in its ``run.json`` (``"outputs"``),
    the fixed names (:data:`RUN_FILES`), the checkpoint, and, for runs written before the list
    existed, the tables a model of the zoo can write (its latent table, D, V, A, loadings_*,
    dispersions_*, specific_state_*). Other files (your notes, association results saved with
    another name) are never listed."""
    out = Path(out)
    if not out.is_dir():
        return []
    names = set(RUN_FILES)
    listed = None
    try:
        listed = json.loads((out / "run.json").read_text()).get("outputs")
    except (OSError, ValueError, AttributeError):
        pass
    if isinstance(listed, list):
        names |= {n for n in listed if isinstance(n, str) and "/" not in n and "\\" not in n}
    else:
        stems = {"D", "V", "A"} | {cls.latent_name for cls in MODELS.values()}
        names |= {f"{stem}.tsv" for stem in stems}
        names |= {p.name for prefix in ("loadings_", "dispersions_", "specific_state_")
                  for p in out.glob(f"{prefix}*.tsv")}
    found = [out / n for n in sorted(names) if (out / n).is_file()]
    checkpoints = out / CHECKPOINT_DIR
    for n in (CHECKPOINT_NAME, Path(CHECKPOINT_NAME).with_suffix(".tmp").name):
        if (checkpoints / n).is_file():
            found.append(checkpoints / n)
    return found


def _describe_run(out: Path) -> str:
    """"a finished run of model 'scvi' (run.json, model.pt and 4 more)" or "an unfinished run ..."."""
    files = run_outputs(out)
    names = [str(p.relative_to(out)) for p in files]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    model, state = None, "a finished run"
    checkpoint = out / CHECKPOINT_DIR / CHECKPOINT_NAME
    try:
        model = json.loads((out / "run.json").read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        state = "an unfinished run (no run.json; interrupted or failed)"
        if checkpoint.is_file():
            try:
                ck = read_checkpoint(checkpoint)
                model = ((ck.get("run") or {}).get("arguments") or {}).get("model", ck.get("model_class"))
                state = f"an unfinished run (last checkpoint after epoch {ck['position']['epoch'] - 1})"
            except Exception:  # noqa: BLE001 - a description must not fail
                pass
    return f"{state}{'' if model is None else f' of model {model!r}'} ({shown})"


def prepare_run_dir(out: str | Path, *, resume: bool = False, overwrite: bool = False,
                    run_info: dict | None = None) -> Path:
    """Make ``out`` ready for a run, or refuse (RunDirectoryError) when that would mix or clobber
    another run.

    - ``out`` empty, absent or without run outputs (:func:`run_outputs`): used as is.
    - it holds a run, and neither ``resume`` nor ``overwrite``: refused, naming both.
    - ``overwrite``: the old run's outputs (only those, :func:`run_outputs`) are removed.
    - ``resume``: needs ``out/checkpoints/checkpoint.pt``; its stored arguments and data spec
      are compared with ``run_info`` and every setting that differs is named.
    """
    out = Path(out)
    if resume and overwrite:
        raise RunDirectoryError(out, "resume/overwrite", "both resume and overwrite were asked for",
                                "choose one: --resume (resume=True) continues the run, --overwrite "
                                "(overwrite=True) discards it and starts again")
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(out, "out", "exists and is not a directory",
                                "give a directory for the run's outputs (--out / out=)")
    checkpoint = out / CHECKPOINT_DIR / CHECKPOINT_NAME
    if resume:
        if not checkpoint.is_file():
            held = f"; it holds {_describe_run(out)}" if run_outputs(out) else ""
            raise RunDirectoryError(out, "resume", f"no checkpoint to resume from at {checkpoint}{held}",
                                    "run without --resume (resume=False) to start a new run; add "
                                    "--overwrite (overwrite=True) to replace what is there")
        if run_info is not None:
            _check_same_settings(out, checkpoint, run_info)
        return out
    old = run_outputs(out)
    if old and not overwrite:
        raise RunDirectoryError(out, "out", f"the directory already holds {_describe_run(out)}",
                                "continue that run with --resume (resume=True in Python), replace it "
                                "with --overwrite (overwrite=True; removes only the files a run writes), "
                                "or choose another --out (out=)")
    remove_outputs(out, old)
    return out


def _flag(name: str) -> str:
    return _FLAGS.get(name, f"--{name.replace('_', '-')}")


def _check_same_settings(out: Path, checkpoint: Path, run_info: dict) -> None:
    """Compare the stored arguments and spec of the checkpoint's run with the new request."""
    from .infer.trainer import _differences

    try:
        stored = read_checkpoint(checkpoint).get("run")
    except Exception as err:  # noqa: BLE001
        raise RunDirectoryError(checkpoint, "resume", f"the checkpoint could not be read ({type(err).__name__}: "
                                f"{err})", "start again with --overwrite (overwrite=True)") from err
    if not stored:
        return  # a checkpoint written by Trainer alone: the Trainer compares model and config
    now_args = json.loads(json.dumps(run_info["arguments"], default=str))
    differ = [(k, a, b) for k, a, b in _differences(stored.get("arguments", {}), now_args)]
    differ += [(k, a, b) for k, a, b in _differences(stored.get("spec", {}), run_info.get("spec", {}))]
    if differ:
        listed = "; ".join(f"{k} ({_flag(k)}): {shown_setting(k, a)} in the checkpoint, "
                           f"{shown_setting(k, b)} now"
                           for k, a, b in differ)
        raise RunDirectoryError(
            out, "resume", f"the run in this directory was made with other settings: {listed}",
            "resume with the run's own settings (see its checkpoint, or run.json once finished), or "
            "start a new run with these settings: --overwrite (overwrite=True) or another --out (out=)")


def fitted_data_fingerprint(out: str | Path) -> dict | None:
    """The :func:`data_fingerprint` of the data a run in ``out`` was trained on, from its
    checkpoint; None when the run has no checkpoint (or one from before fingerprints)."""
    checkpoint = Path(out) / CHECKPOINT_DIR / CHECKPOINT_NAME
    if not checkpoint.is_file():
        return None
    return (read_checkpoint(checkpoint).get("run") or {}).get("data_fingerprint")


def check_same_data(out: Path, run_info: dict) -> None:
    stored = fitted_data_fingerprint(out)
    now = run_info["data_fingerprint"]
    if stored and stored != now:
        raise RunDirectoryError(
            out, "resume", f"the data differ from those the run was trained on (cells, features or "
            f"their ids): {stored} in the checkpoint, {now} now (data: {run_info.get('data')})",
            "resume with the run's own data (--data / data=), or start a new run: --overwrite "
            "(overwrite=True) or another --out (out=)")
