"""Shared pieces of the benchmarks: peak memory, atomic JSON records."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import torch

from kn_plugin.files import clear_own_temps, write_json_atomic
from kn_plugin.stats import jaccard

logger = logging.getLogger(__name__)


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a block, in MB above its start: CUDA allocator stats on a GPU; on Linux
    the kernel's resident-set high-water mark (reset through ``/proc/self/clear_refs``, so it
    costs nothing while the block runs); elsewhere the resident set sampled by a thread."""

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device = device
        self.interval = interval
        self.peak_mb = 0.0
        self._thread = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self._start = _proc_status_kb("VmRSS") * 1024
            return self
        except (OSError, TypeError):
            pass
        import psutil

        self._proc = psutil.Process(os.getpid())
        self._start = self._proc.memory_info().rss
        self._max = self._start
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._max = max(self._max, self._proc.memory_info().rss)
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is None:
            peak = _proc_status_kb("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, self._proc.memory_info().rss)
        self.peak_mb = max(0.0, (peak - self._start) / 2**20)
        return False


def neuron_jaccard(a, b) -> float:
    """Jaccard index of two neuron lists (by (layer, index)); 1.0 when both are empty."""
    return jaccard([n.key for n in a], [n.key for n in b])


def write_atomic(path: Path, payload: dict, compact: bool = False) -> None:
    """Write JSON so that a kill leaves either the old file or the new one, never half of one."""
    write_json_atomic(path, payload, compact)


def resumable(out: Path, folder: str, jobs, desc: str, progress: bool = True) -> list[dict]:
    """One JSON record per ``(key, compute)`` job under ``out/folder/<key>.json``: read when it is
    there, else ``compute()`` and written atomically (a rerun skips finished work)."""
    from tqdm.auto import tqdm

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
                  progress: bool = True) -> tuple[dict[str, dict], dict[str, str]]:
    """Records ``out/folder/<key>.json`` of ``jobs`` ``(key, content hash, payload)``: a record
    is reused when it holds the same ``input`` hash, else ``run(todo)`` (``todo``: the
    ``(key, payload)`` pairs to compute) yields ``(key, record)`` pairs, each written atomically
    as it comes. Returns ``({key: record}, {key: hash})`` (the hashes: the run's manifest)."""
    from tqdm.auto import tqdm

    done = {}
    for key, content, _ in jobs:
        rec = read_json(out / folder / f"{key}.json")
        done[key] = rec if rec is not None and rec.get("input") == content else None
    todo = [(key, payload) for key, _, payload in jobs if done[key] is None]
    hashes = {key: content for key, content, _ in jobs}
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit=desc.rstrip("s"),
              disable=not progress or not jobs) as bar:
        for key, rec in run(todo):
            rec["input"] = hashes[key]
            write_atomic(out / folder / f"{key}.json", rec, compact=True)  # compact: records are committed
            done[key] = rec
            bar.update(1)
    return done, hashes


def read_stages(folder: Path, records: dict[str, dict[str, str]], command: str) -> dict[str, dict[str, dict]]:
    """The records a run manifest names (``{stage: {key: content hash}}``), each checked to
    hold the inputs the manifest gives it: a missing or foreign record is a one-line error."""
    from kn_plugin.errors import KnowledgeNeuronError

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


def pct(x) -> str:
    """A relative change: +12.3%."""
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def rate(x, digits: int = 1) -> str:
    """A share: 12.3%."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def num(x) -> str:
    """A number of any size, three significant digits."""
    if x is None:
        return "n/a"
    return f"{x:.3g}" if abs(x) < 1e5 else f"{x:.2e}"


def report_header(title: str, intro: str, command: str) -> list[str]:
    """The opening lines every benchmark report shares: title, what it is, the command that reproduces it."""
    return [f"# {title}", "", f"{intro} Reproduce with:".lstrip(), "", "```bash", command, "```", ""]


RUN_FILE = ".kn_run"  # JSON; not "*.json": result listings and fact keys never meet it


def check_run(out: Path, signature: dict) -> None:
    """Records under ``out`` are reused only by a run with the same model and settings: the
    first run writes ``out/.kn_run``; a later run with other settings is refused in one line
    instead of mixing its results with the old ones."""
    from kn_plugin.errors import KnowledgeNeuronError

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


def assess_fact(model, fact, max_rank: int, min_known: float) -> dict:
    """A PARAREL fact's record: each prompt's probability and rank of the object (prompts the
    model cannot take, e.g. longer than its context, are dropped); the fact counts when at
    least two prompts remain and a share ``min_known`` of them rank the object below ``max_rank``."""
    from kn_plugin.assess import assess
    from kn_plugin.errors import KnowledgeNeuronError

    record = {"key": fact.key, "relation": fact.relation, "subject": fact.subject,
              "target": fact.target, "prompts": [], "prob": [], "rank": []}
    for p in fact.prompts:
        try:
            a = assess(model, p, fact.target)
        except KnowledgeNeuronError as exc:
            logger.info("%s: skipping prompt %r (%s)", fact.key, p, exc)
            continue
        record["prompts"].append(p)
        record["prob"].append(a.prob)
        record["rank"].append(a.rank)
        record["n_target_tokens"] = a.n_target_tokens
    known = [r < max_rank for r in record["rank"]]
    record["known_share"] = sum(known) / len(known) if known else 0.0
    record["counted"] = len(known) >= 2 and record["known_share"] >= min_known
    return record


def intervention_record(model, prompts: list[str], target: str, before: list[float], neurons, unrelated,
                        seed: int, random_draws: int) -> dict:
    """Suppress (x0) and amplify (x2) ``neurons`` on the fact's prompts, with the controls: the
    same neurons on ``unrelated`` (a fact of another relation, its first prompt) and random
    neurons of the same layers. ``before``: the prompts' clean probabilities, already measured."""
    from kn_plugin.assess import encode_fact
    from kn_plugin.evaluation import intervention_effect

    facts = [encode_fact(model, p, target) for p in prompts]
    other = [encode_fact(model, unrelated.prompts[0], unrelated.target)]
    out, unrelated_before = {}, None
    for name, factor in (("suppress", 0.0), ("amplify", 2.0)):
        eff = intervention_effect(model, facts, neurons, factor, seed=seed, unrelated=other,
                                  random_draws=random_draws, before=before, unrelated_before=unrelated_before)
        unrelated_before = eff.unrelated_before
        out[name] = {"before": eff.before, "after": eff.after, "random_after": eff.random_after,
                     "unrelated": unrelated.key, "unrelated_before": eff.unrelated_before,
                     "unrelated_after": eff.unrelated_after}
    return out
