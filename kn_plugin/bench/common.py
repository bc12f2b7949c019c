"""Shared pieces of the benchmarks: peak memory, report formatting, fact records."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import psutil
import torch

from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.evaluation import intervention_effect
from kn_plugin.scoring import assess, encode_fact
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


def assess_fact(model, fact, max_rank: int, min_known: float) -> dict:
    """A PARAREL fact's record: each prompt's probability and rank of the object (prompts the
    model cannot take, e.g. longer than its context, are dropped); the fact counts when at
    least two prompts remain and a share ``min_known`` of them rank the object below ``max_rank``."""
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
