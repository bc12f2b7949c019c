"""Benchmarks that print and save numbers (no timed assertions).

``speed_benchmark``: Captum's per-layer ``LayerIntegratedGradients`` path against the fast
engine, on the same prompts, all layers, same alpha grid, in one process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass

import torch

from kn_plugin.assess import encode_fact
from kn_plugin.attribution import KnowledgeAttribution
from kn_plugin.models import LoadedModel

logger = logging.getLogger(__name__)

SPEED_PROMPTS = (
    ("The capital city of France is", " Paris"),
    ("In the history of Europe, after many long wars and treaties between kingdoms, "
     "the capital of France is", " Paris"),
)


class PeakMemory:
    """Peak memory of a block, in MB above its start: CUDA allocator stats on a GPU, resident
    set size sampled every few milliseconds on the CPU."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device = device
        self.interval = interval
        self.peak_mb = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
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
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, self._proc.memory_info().rss)
        self.peak_mb = (peak - self._start) / 2**20
        return False


@dataclass
class SpeedRow:
    prompt: str
    target: str
    tokens: int
    captum_s: float
    fast_s: float
    ratio: float
    max_rel_diff: float
    captum_peak_mb: float
    fast_peak_mb: float


def _timed(model: LoadedModel, engine: str, prompt: str, target: str, steps: int, batch_size: int):
    ka = KnowledgeAttribution(model, engine)
    with PeakMemory(model.device) as mem:
        t0 = time.perf_counter()
        res = ka.attribute(prompt, target, steps=steps, batch_size=batch_size, progress=False)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        seconds = time.perf_counter() - t0
    return res, seconds, mem.peak_mb


def speed_benchmark(model: LoadedModel, prompts=SPEED_PROMPTS, steps: int = 20,
                    batch_size: int = 10) -> list[SpeedRow]:
    """Time both paths on each ``(prompt, target)``; all layers, ``steps`` Riemann steps."""
    # warm-up (allocator, kernels, lazy imports) on one layer, not timed
    p0, t0 = prompts[0]
    for engine in ("captum", "fast"):
        KnowledgeAttribution(model, engine).attribute(p0, t0, steps=2, layers=[0], progress=False)
    rows = []
    for prompt, target in prompts:
        ref, captum_s, captum_mb = _timed(model, "captum", prompt, target, steps, batch_size)
        fast, fast_s, fast_mb = _timed(model, "fast", prompt, target, steps, batch_size)
        diff = ((fast.scores - ref.scores).abs().max() / ref.scores.abs().max()).item()
        tokens = encode_fact(model, prompt, target).seq_len
        row = SpeedRow(prompt, target, tokens, round(captum_s, 3), round(fast_s, 3),
                       round(captum_s / fast_s, 2), diff, round(captum_mb, 1), round(fast_mb, 1))
        logger.info("%s", row)
        rows.append(row)
    return rows


def speed_report(model: LoadedModel, rows: list[SpeedRow], steps: int) -> dict:
    device = model.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "model": model.name, "device": name, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "steps": steps, "layers": model.n_layers,
        "prompts": [asdict(r) for r in rows],
    }
