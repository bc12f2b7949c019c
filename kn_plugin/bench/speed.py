"""``kn bench speed``: Captum's per-layer ``LayerIntegratedGradients`` against the fast
engines, on the same prompts, all layers, same alpha grid, in one process."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from kn_plugin.attribution import CONVERGED, KnowledgeAttribution, worst_relative_gap
from kn_plugin.bench.common import PeakMemory, neuron_jaccard
from kn_plugin.defaults import PAPER_STEPS
from kn_plugin.hardware import cpu_name, matmul_gflops
from kn_plugin.locating import coarse_neurons
from kn_plugin.models import LoadedModel
from kn_plugin.scoring import encode_fact

logger = logging.getLogger(__name__)

SPEED_PROMPTS = (
    ("The capital city of France is", " Paris"),
    ("In the history of Europe, after many long wars and treaties between kingdoms, "
     "the capital of France is", " Paris"),
)


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
    #: the engine the default ("fast") actually ran: "stepper" on SmolLM2
    fast_engine: str = ""
    #: the model-agnostic path (the model's own modules and cache API)
    cached_s: float = 0.0
    cached_ratio: float = 0.0
    cached_max_rel_diff: float = 0.0
    cached_peak_mb: float = 0.0
    #: the work each path did, in GFLOP of matrix products counted from their shapes
    #: (torch.utils.flop_counter: forward and backward, the engines' own checks included)
    captum_gflop: float = 0.0
    fast_gflop: float = 0.0
    cached_gflop: float = 0.0
    #: this machine's matmul rate, measured in the same run, in the model's dtype at the
    #: FFN's shape [steps x tokens, d_model] @ [d_model, d_mlp] (GFLOP/s)
    peak_gflops: float = 0.0
    #: with ``converged=True``: the converged preset (Gauss-Legendre, per-layer auto) timed on
    #: the fast engine, the layer-steps it ran, and the coarse-set Jaccard of it and of the
    #: paper's m against a Gauss-Legendre reference at ``reference_steps`` (0: not measured)
    converged_s: float = 0.0
    converged_gflop: float = 0.0
    converged_layer_steps: int = 0
    converged_worst_gap: float = 0.0
    converged_jaccard: float = 0.0
    paper_jaccard: float = 0.0
    reference_s: float = 0.0
    #: where the fast engine's time goes at the paper's m (and the converged preset's, with
    #: ``converged=True``): the operators with the most self CPU time (:func:`profile_run`)
    fast_profile: list = field(default_factory=list)
    converged_profile: list = field(default_factory=list)
    #: the same runs' seconds by phase of the attribution (:func:`profile_run`)
    fast_phases: dict = field(default_factory=dict)
    converged_phases: dict = field(default_factory=dict)
    #: Captum's time over the fast engine's in each round (every round times the paths back to
    #: back, so that a machine whose speed drifts slows both alike)
    paired_ratios: list = field(default_factory=list)

    def rate(self, engine: str) -> float:
        """Achieved GFLOP/s of ``engine`` ("captum", "fast", "cached" or "converged")."""
        secs = getattr(self, f"{engine}_s")
        return getattr(self, f"{engine}_gflop") / secs if secs > 0 else 0.0

    def of_peak(self, engine: str) -> float:
        """Achieved rate as a share of the measured matmul peak."""
        return self.rate(engine) / self.peak_gflops if self.peak_gflops > 0 else 0.0


def _timed(model: LoadedModel, engine: str, prompt: str, target: str, steps: int, batch_size: int):
    ka = KnowledgeAttribution(model, engine)
    with PeakMemory(model.device) as mem:
        t0 = time.perf_counter()
        res = ka.attribute(prompt, target, steps=steps, batch_size=batch_size, progress=False)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        seconds = time.perf_counter() - t0
    return res, seconds, mem.peak_mb


SPEED_ENGINES = ("captum", "fast", "cached")


def counted_gflop(model: LoadedModel, engine: str, prompt: str, target: str, steps: int, batch_size: int) -> float:
    """GFLOP of matrix products one attribution performs, counted from the shapes of every
    matmul, linear and attention product it dispatches (forward and backward), untimed."""
    ka = KnowledgeAttribution(model, engine)
    return count_gflop(lambda: ka.attribute(prompt, target, steps=steps, batch_size=batch_size, progress=False))


def count_gflop(fn) -> float:
    """GFLOP of the matrix products ``fn()`` dispatches (2 x m x k x n per [m, k] @ [k, n])."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def profile_run(fn, top: int = 8) -> tuple[list[dict], dict[str, float]]:
    """Where ``fn()``'s CPU time goes (``torch.profiler``, untimed run): by operator, the ``top``
    operators by self time, each with its seconds, its share of all operators' self time and its
    number of calls, and a last row ``other`` for the rest; and by phase of the attribution, the
    seconds in each ``kn::`` range (clean pass, reference, prepare, verify, integrate, refine;
    inclusive CPU time; ``verify`` only where the self-check runs in a pass of its own, before a
    mixed-precision integration)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    averages = prof.key_averages()
    phases = {e.key[len("kn::"):]: round(e.cpu_time_total / 1e6, 4) for e in averages if e.key.startswith("kn::")}
    events = sorted((e for e in averages if not e.key.startswith("kn::")), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 4),
             "share": round(e.self_cpu_time_total / total, 4), "calls": e.count} for e in events[:top]]
    rest = events[top:]
    if rest:
        t = sum(e.self_cpu_time_total for e in rest)
        rows.append({"op": "other", "self_s": round(t / 1e6, 4), "share": round(t / total, 4),
                     "calls": sum(e.count for e in rest)})
    return rows, phases


def layer_steps(result) -> int:
    """(layer, alpha) points an auto or adaptive attribution evaluated, over its layers."""
    if "evaluations_per_layer" in result.extras:  # steps="adaptive"
        return sum(m for m in result.extras["evaluations_per_layer"] if m)
    per = [m for m in result.extras["steps_per_layer"] if m is not None]
    return sum(m * sum(1 for x in per if x >= m) for m, _ in result.extras["auto_steps"])


def converged_columns(model: LoadedModel, prompt: str, target: str, paper, batch_size: int,
                      reference_steps: int = 100) -> dict:
    """The converged preset beside the paper's rule (``paper``: its result on this prompt)."""
    ka = KnowledgeAttribution(model, "fast")
    t0 = time.perf_counter()
    conv = ka.attribute(prompt, target, batch_size=batch_size, progress=False, **CONVERGED)
    conv_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = ka.attribute(prompt, target, steps=reference_steps, grid="gausslegendre", batch_size=batch_size,
                       progress=False)
    ref_s = time.perf_counter() - t0
    work = count_gflop(lambda: ka.attribute(prompt, target, batch_size=batch_size, progress=False, **CONVERGED))
    sets = {name: coarse_neurons(r) for name, r in (("conv", conv), ("paper", paper), ("ref", ref))}
    return {"converged_s": round(conv_s, 4), "converged_gflop": round(work, 3), "reference_s": round(ref_s, 4),
            "converged_layer_steps": layer_steps(conv),
            "converged_worst_gap": round(worst_relative_gap(conv), 5),
            "converged_jaccard": round(neuron_jaccard(sets["conv"], sets["ref"]), 4),
            "paper_jaccard": round(neuron_jaccard(sets["paper"], sets["ref"]), 4)}


def speed_benchmark(model: LoadedModel, prompts=SPEED_PROMPTS, steps: int = PAPER_STEPS,
                    batch_size: int | None = None, repeat: int = 1, converged: bool = False) -> list[SpeedRow]:
    """Time Captum, the default fast engine and the model-agnostic cached engine on each
    ``(prompt, target)``; all layers, ``steps`` Riemann steps.

    With ``repeat > 1`` each path runs that many times, in rounds that time every path back to
    back, and the median time is kept (``paired_ratios``: each round's Captum / fast).
    ``converged``: also the converged preset and a Gauss-Legendre m = 100 reference
    (:func:`converged_columns`)."""
    # warm-up (allocator, kernels, lazy imports) on one layer, not timed
    p0, t0 = prompts[0]
    for engine in SPEED_ENGINES:
        KnowledgeAttribution(model, engine).attribute(p0, t0, steps=2, layers=[0], progress=False)
    rows = []
    for prompt, target in prompts:
        runs = {engine: [] for engine in SPEED_ENGINES}
        for _ in range(repeat):
            for engine in SPEED_ENGINES:
                runs[engine].append(_timed(model, engine, prompt, target, steps, batch_size))
        ref = runs["captum"][0][0]
        secs = {e: round(statistics.median(r[1] for r in runs[e]), 4) for e in SPEED_ENGINES}
        peak = {e: round(max(r[2] for r in runs[e]), 1) for e in SPEED_ENGINES}

        def diff(engine, runs=runs, ref=ref):
            return ((runs[engine][0][0].scores - ref.scores).abs().max() / ref.scores.abs().max()).item()

        tokens = encode_fact(model, prompt, target).seq_len
        work = {e: round(counted_gflop(model, e, prompt, target, steps, batch_size), 3) for e in SPEED_ENGINES}
        limit = matmul_gflops(steps * tokens, model.adapter.d_model, model.d_mlp, model.dtype, model.device)
        row = SpeedRow(prompt, target, tokens, secs["captum"], secs["fast"],
                       round(secs["captum"] / secs["fast"], 2), diff("fast"), peak["captum"], peak["fast"],
                       runs["fast"][0][0].engine, secs["cached"], round(secs["captum"] / secs["cached"], 2),
                       diff("cached"), peak["cached"], work["captum"], work["fast"], work["cached"],
                       round(limit, 1))
        row.paired_ratios = [round(c[1] / f[1], 2) for c, f in zip(runs["captum"], runs["fast"])]
        fast = KnowledgeAttribution(model, "fast")
        args = dict(prompt=prompt, target=target, batch_size=batch_size, progress=False)
        row.fast_profile, row.fast_phases = profile_run(lambda f=fast, a=args: f.attribute(steps=steps, **a))
        if converged:
            for name, value in converged_columns(model, prompt, target, runs["fast"][0][0], batch_size).items():
                setattr(row, name, value)
            row.converged_profile, row.converged_phases = profile_run(lambda f=fast, a=args: f.attribute(**a, **CONVERGED))
        logger.info("%s", row)
        rows.append(row)
    return rows


def _timed_paths(row: SpeedRow) -> tuple[str, ...]:
    return SPEED_ENGINES + (("converged",) if row.converged_s > 0 else ())


def speed_report(model: LoadedModel, rows: list[SpeedRow], steps: int, repeat: int = 1) -> dict:
    device = model.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "model": model.name, "device": name, "cpu": cpu_name(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "steps": steps, "layers": model.n_layers, "repeat": repeat,
        "prompts": [{**asdict(r), **{f"{e}_gflops": round(r.rate(e), 2) for e in _timed_paths(r)},
                     **{f"{e}_of_peak": round(r.of_peak(e), 4) for e in _timed_paths(r)}} for r in rows],
    }
