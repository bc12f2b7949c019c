"""Input checks shared by the Python API and the CLI: each failure is one KnowledgeNeuronError line.

Checks run before any model computes, so that a typo costs nothing: numbers must be finite,
indices plain integers (never bools, floats or strings), output paths writable and of a
format that can be written.
"""

from __future__ import annotations

import math
import operator
import os
import shutil
from pathlib import Path

from kn_plugin.errors import KnowledgeNeuronError

#: integration steps (and alpha batches) above this buy nothing, the rules converge long before,
#: and overflow the counters of the progress bars and of torch
MAX_STEPS = 100_000


def finite(name: str, value) -> float:
    """A real, finite number (NaN and infinities refused; bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KnowledgeNeuronError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def integer(name: str, value) -> int:
    """A plain integer: ints and integer-typed numpy/torch scalars; not bool, float or str."""
    if isinstance(value, bool):
        raise KnowledgeNeuronError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise KnowledgeNeuronError(f"{name} must be an integer, got {value!r}") from None


def positive_int(name: str, value) -> int:
    value = integer(name, value)
    if value < 1:
        raise KnowledgeNeuronError(f"{name} must be >= 1, got {value}")
    return value


def output_path(path: str | os.PathLike, what: str = "output", suffixes: tuple[str, ...] | None = None) -> Path:
    """A path that can be written: not a folder, its nearest existing ancestor a writable
    folder (missing folders are created when writing), and one of ``suffixes`` if given."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise KnowledgeNeuronError(f"{what} {path} is a folder, not a file")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise KnowledgeNeuronError(f"{what} {path}: use one of {', '.join(suffixes)}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise KnowledgeNeuronError(f"cannot write {what} {path}: {parent} is not a writable folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise KnowledgeNeuronError(f"cannot write {what} {path}: the file is read-only")
    return path


def output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise KnowledgeNeuronError(f"{what} {path} is a file, not a folder")
    output_path(path / "x", what)
    return path


def plot_suffixes() -> tuple[str, ...]:
    """File suffixes matplotlib can write here (``.png``, ``.pdf``, ``.svg``, ...): ``.pgf`` only
    where the TeX program matplotlib runs for it is installed."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    suffixes = tuple("." + s for s in FigureCanvasAgg(Figure()).get_supported_filetypes())
    if shutil.which(matplotlib.rcParams["pgf.texsystem"]) is None:
        suffixes = tuple(s for s in suffixes if s != ".pgf")
    return suffixes


def read_text(path: str | os.PathLike, what: str) -> str:
    """A UTF-8 text file's content, with one-line errors for missing or binary files."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KnowledgeNeuronError(f"{what} {path} is not UTF-8 text") from None
    except OSError as exc:
        raise KnowledgeNeuronError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
