"""Run folders: one JSON record per finished piece of work, reused on a rerun only when it
holds the same inputs, under a folder whose ``.kn_run`` file names the model and settings that
made it (a run with other settings is refused instead of mixing with the old results).

Every write is atomic (:mod:`kn_plugin.files`): a kill leaves the old record or the new one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm.auto import tqdm

from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.files import clear_own_temps, write_json_atomic

logger = logging.getLogger(__name__)


def write_atomic(path: Path, payload: dict, compact: bool = False) -> None:
    """Write JSON so that a kill leaves either the old file or the new one, never half of one."""
    write_json_atomic(path, payload, compact)


def resumable(out: Path, folder: str, jobs, desc: str, progress: bool = True) -> list[dict]:
    """One JSON record per ``(key, compute)`` job under ``out/folder/<key>.json``: read when it is
    there, else ``compute()`` and written atomically (a rerun skips finished work)."""
    records = []
    for key, compute in tqdm(jobs, desc=desc, unit="item", disable=not progress or not jobs):
        path = out / folder / f"{key}.json"
        rec = read_json(path)
        if rec is None:
            rec = compute()
            write_atomic(path, rec)
        records.append(rec)
    return records


def content_stage(out: Path, folder: str, jobs: list[tuple[str, str, object]], run, desc: str,
                  progress: bool = True, reverse: bool = False) -> tuple[dict[str, dict], dict[str, str]]:
    """Records ``out/folder/<key>.json`` of ``jobs`` ``(key, content hash, payload)``: a record
    is reused when it holds the same ``input`` hash, else ``run(todo)`` (``todo``: the
    ``(key, payload)`` pairs to compute) yields ``(key, record)`` pairs, each written atomically
    as it comes. Returns ``({key: record}, {key: hash})`` (the hashes: the run's manifest).

    ``todo`` is consumed lazily: just before a job is handed out, its record is read again, so
    that a record another process wrote meanwhile (several runs on one folder, on disjoint or
    overlapping parts) is used instead of computed twice. ``reverse``: hand the pending jobs out
    from the last: a second run on the same folder and inputs then works toward the first one
    instead of computing the same record at the same time."""
    hashes = {key: content for key, content, _ in jobs}

    def fresh(key: str) -> dict | None:
        rec = read_json(out / folder / f"{key}.json")
        return rec if rec is not None and rec.get("input") == hashes[key] else None

    done = {key: fresh(key) for key, _, _ in jobs}
    todo = [(key, payload) for key, _, payload in jobs if done[key] is None]
    if reverse:
        todo.reverse()

    def pending():
        for key, payload in todo:
            rec = fresh(key)
            if rec is None:
                yield key, payload
            else:  # written meanwhile by another run on this folder
                done[key] = rec
                bar.update(1)

    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit=desc.rstrip("s"),
              disable=not progress or not jobs) as bar:
        for key, rec in run(pending()):
            rec["input"] = hashes[key]
            write_atomic(out / folder / f"{key}.json", rec, compact=True)  # compact: records are committed
            done[key] = rec
            bar.update(1)
    return done, hashes


def read_stages(folder: Path, records: dict[str, dict[str, str]], command: str) -> dict[str, dict[str, dict]]:
    """The records a run manifest names (``{stage: {key: content hash}}``), each checked to
    hold the inputs the manifest gives it: a missing or foreign record is a one-line error."""
    stages = {}
    for name, hashes in records.items():
        recs = {}
        for key, content in hashes.items():
            rec = read_json(folder / name / f"{key}.json")
            if rec is None or rec.get("input") != content:
                raise KnowledgeNeuronError(f"{folder / name / key}.json is missing or belongs to other inputs: "
                                           f"rerun {command} with the command in report.md")
            recs[key] = rec
        stages[name] = recs
    return stages


RUN_FILE = ".kn_run"  # JSON; not "*.json": result listings and fact keys never meet it


def check_run(out: Path, signature: dict) -> None:
    """Records under ``out`` are reused only by a run with the same model and settings: the
    first run writes ``out/.kn_run``; a later run with other settings is refused in one line
    instead of mixing its results with the old ones."""
    signature = json.loads(json.dumps(signature))  # tuples -> lists, as read back
    path = out / RUN_FILE
    before = read_json(path)
    if before is None and path.exists():
        raise KnowledgeNeuronError(f"{path} is unreadable: cannot tell which settings made {out}'s results; "
                                   "use another output folder")
    if before is None and out.is_dir() and any(out.glob("*/*.json")):
        raise KnowledgeNeuronError(f"{out} holds records but no {RUN_FILE}: cannot tell which model and settings "
                                   "made them; use another output folder")
    if before is None:
        write_atomic(path, signature)
    elif before != signature:
        changed = sorted(k for k in set(before) | set(signature) if before.get(k) != signature.get(k))
        raise KnowledgeNeuronError(f"{out} holds results of a run with other settings ({', '.join(changed)}): "
                                   "use another output folder, or the same settings to resume")


def clear_stale(out: Path) -> None:
    """Temporary files left by a kn run killed while writing (only kn's own temporary names,
    in ``out`` and the record folders directly under it)."""
    if out.is_dir():
        clear_own_temps(out, tuple(p.name for p in out.iterdir() if p.is_dir() and not p.is_symlink()))


def read_json(path: Path) -> dict | None:
    """A record, or None when it is missing or unreadable (a truncated or corrupt record is
    then computed again and written over, atomically)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("%s is unreadable (%s): computing it again", path, exc)
        return None
    return data if isinstance(data, dict) else None
