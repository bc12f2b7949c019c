"""Writing files so that a kill never leaves something that loads wrong, and cleaning up only
what kn itself left behind.

Every temporary file kn writes is named ``.<name>.kn-<pid>.tmp`` (``.npz`` added for arrays)
beside its destination and moved into place with :func:`os.replace`; :func:`clear_own_temps`
removes only names of exactly that form whose process is gone, so a user's own hidden files
(``.notes.tmp``, ``.cache.tmp1``) are never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

_TEMP = re.compile(r"^\..+\.kn-(\d+)\.tmp(\.npz)?$")


def temp_path(path: Path, suffix: str = "") -> Path:
    """The temporary name this process writes ``path`` under."""
    return path.with_name(f".{path.name}.kn-{os.getpid()}.tmp{suffix}")


def is_own_temp(path: Path) -> bool:
    """Whether ``path`` is a temporary file of a kn process that no longer runs."""
    m = _TEMP.match(path.name)
    if not m or not path.is_file() or path.is_symlink():
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False  # that process still runs (it may be writing this file)


def clear_own_temps(folder: Path, subfolders: tuple[str, ...] = ()) -> list[Path]:
    """Remove kn's leftover temporary files in ``folder`` and in its named ``subfolders``
    (never recursively elsewhere); returns what was removed."""
    removed = []
    for d in [folder, *(folder / s for s in subfolders)]:
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if is_own_temp(p):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds either its old content or ``text`` whatever moment a kill comes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload, compact: bool = False) -> None:
    """JSON written atomically; ``compact``: one line without spaces (records read by programs)."""
    write_text_atomic(path, json.dumps(payload, separators=(",", ":")) if compact else json.dumps(payload, indent=1))


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (binds a result's JSON to its arrays)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
