"""Earlier outputs in an output folder: refused unless the user asks to replace them, and then
removed (only the files a command wrote itself; everything else in the folder stays)."""

from __future__ import annotations

from pathlib import Path

from .errors import InputError

#: Earlier outputs named in a refusal before "and N more".
SHOWN_OUTPUTS = 6


def refuse_earlier_outputs(folder: Path, found: list[Path], what: str, fix: str) -> None:
    """An :class:`~pyro_livi.errors.InputError` (file ``folder``, field ``--out``) saying that
    ``folder`` holds ``what``, naming the first :data:`SHOWN_OUTPUTS` of ``found`` (paths
    relative to ``folder``), with ``fix``; nothing when ``found`` is empty."""
    if not found:
        return
    names = [p.relative_to(folder).as_posix() for p in found]
    shown = ", ".join(names[:SHOWN_OUTPUTS])
    if len(names) > SHOWN_OUTPUTS:
        shown += f" and {len(names) - SHOWN_OUTPUTS} more"
    raise InputError(folder, "--out", f"{what} ({shown})", fix)


def remove_outputs(folder: Path, found: list[Path]) -> None:
    """Delete the files ``found`` (below ``folder``), then the folders below ``folder`` that this
    leaves empty, deepest first; ``folder`` itself stays."""
    for path in found:
        path.unlink()
    for parent in sorted({p.parent for p in found}, key=lambda d: len(d.parts), reverse=True):
        while parent != folder and folder in parent.parents and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
