"""``kn bench throughput``: facts per hour in this process and on Ray workers, on the same
PARAREL facts in one run, and the wall time that implies for the whole of PARAREL."""

from __future__ import annotations

import logging
import os
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kn_plugin.attribution import KnowledgeAttribution, get_engine
from kn_plugin.data import load_pararel
from kn_plugin.defaults import PAPER_STEPS
from kn_plugin.distributed import PoolConfig, RayPool
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.hardware import cpu_name
from kn_plugin.locating import locate_many
from kn_plugin.models import LoadedModel
from kn_plugin.validation import positive_int

logger = logging.getLogger(__name__)

#: worker counts of the projection
PROJECT_WORKERS = (1, 8, 64)


@dataclass(frozen=True)
class ThroughputConfig:
    """Checked settings of ``kn bench throughput``."""

    facts: int = 6
    workers: tuple[int, ...] = (1, 2)
    threads_per_worker: int | None = None  # None: this machine's cores / workers
    steps: int = PAPER_STEPS
    batch_size: int | None = None  # None: the engine's choice
    engine: str = "fast"
    seed: int = 0

    def __post_init__(self):
        positive_int("--facts", self.facts)
        positive_int("--steps", self.steps)
        if self.batch_size is not None:
            positive_int("--batch-size", self.batch_size)
        if not self.workers:
            raise KnowledgeNeuronError("--workers needs at least one worker count, e.g. 1,2")
        for w in self.workers:
            positive_int("--workers", w)
        if self.threads_per_worker is not None:
            positive_int("--threads-per-worker", self.threads_per_worker)
        get_engine(self.engine)

    def threads(self, workers: int) -> int:
        return self.threads_per_worker or max(1, (os.cpu_count() or 1) // workers)


def sample_facts(data: dict, n: int, seed: int) -> list:
    """``n`` facts taken round-robin over the relations (each relation's facts shuffled by ``seed``)."""
    pools = {rel: random.Random(f"{seed}-{rel}").sample(facts, len(facts)) for rel, facts in sorted(data.items())}
    out = []
    while len(out) < n and any(pools.values()):
        for rel in sorted(pools):
            if pools[rel] and len(out) < n:
                out.append(pools[rel].pop())
    return out


def pararel_size(folder, masked: bool) -> dict:
    """Relations, facts and prompts of the whole of PARAREL as kn_plugin uses it for this kind of model."""
    data = load_pararel(folder, masked=masked)
    return {"relations": len(data), "facts": sum(len(v) for v in data.values()),
            "prompts": sum(len(f.prompts) for v in data.values() for f in v)}


def _timed_run(model, facts, options, pool, progress) -> tuple[dict, float]:
    t0 = time.perf_counter()
    results = dict(locate_many(model, facts, pool=pool, progress=progress, **options))
    return results, time.perf_counter() - t0


def _agreement(results: dict, reference: dict) -> tuple[int, float]:
    """Facts whose neurons equal the reference's, and the largest score difference relative
    to the largest score of the fact."""
    same, worst = 0, 0.0
    for key, ref in reference.items():
        got = results[key]
        same += [n.key for n in got.neurons] == [n.key for n in ref.neurons]
        for a, b in zip(got.attributions, ref.attributions):
            top = b.scores.abs().max().item() or 1.0
            worst = max(worst, (a.scores - b.scores).abs().max().item() / top)
    return same, worst


def run_throughput(model: LoadedModel, facts: list, config: ThroughputConfig, progress: bool = True) -> dict:
    """Locate ``facts`` serially, then on a fresh Ray pool for each worker count."""
    options = {"steps": config.steps, "batch_size": config.batch_size, "engine": config.engine}
    prompts = sum(len(f.prompts) for f in facts)
    rows = []
    serial, secs = _timed_run(model, facts, options, None, progress)
    rows.append({"mode": "serial", "workers": 1, "threads_per_worker": torch.get_num_threads(), "startup_s": 0.0,
                 "seconds": secs, "same_neurons": len(facts), "max_rel_diff": 0.0})
    for w in config.workers:
        threads = config.threads(w)
        t0 = time.perf_counter()
        with RayPool(model, PoolConfig(workers=w, threads_per_worker=threads)) as pool:
            startup = time.perf_counter() - t0
            results, secs = _timed_run(model, facts, options, pool, progress)
        same, worst = _agreement(results, serial)
        rows.append({"mode": "ray", "workers": w, "threads_per_worker": threads, "startup_s": startup,
                     "seconds": secs, "same_neurons": same, "max_rel_diff": worst})
    for row in rows:
        row["facts_per_hour"] = len(facts) / row["seconds"] * 3600
        row["seconds_per_prompt"] = row["seconds"] / prompts
        # what one worker costs per prompt: the basis of the projection
        row["worker_seconds_per_prompt"] = row["seconds"] * row["workers"] / prompts
        logger.info("%s", row)
    engines = sorted({a.engine for r in serial.values() for a in r.attributions})
    return {"facts": [f.key for f in facts], "n_facts": len(facts), "n_prompts": prompts, "engines": engines,
            "rows": rows, "prompt_batching": prompt_batching(model, facts[0], config)}


def prompt_batching(model: LoadedModel, fact, config: ThroughputConfig, max_prompts: int = 3) -> dict:
    """One fact's paraphrases (up to ``max_prompts``, of different lengths) attributed one at a
    time (the default fast engine, and the batched engine) and together in shared padded passes."""
    prompts = list(fact.prompts[:max_prompts])
    timings, results = {}, {}
    variants = (("fast, one prompt at a time", config.engine, False), ("batched, one prompt at a time", "batched", False),
                ("batched, prompts together", "batched", True))
    for name, engine, together in variants:
        ka = KnowledgeAttribution(model, engine)
        t0 = time.perf_counter()
        if together:
            res = ka.attribute_prompts(prompts, fact.target, steps=config.steps, batch_size=config.batch_size,
                                       progress=False)
        else:
            res = [ka.attribute(p, fact.target, steps=config.steps, batch_size=config.batch_size, progress=False)
                   for p in prompts]
        timings[name] = time.perf_counter() - t0
        results[name] = res
    ref = results["batched, one prompt at a time"]
    diff = max(((a.scores - b.scores).abs().max() / b.scores.abs().max()).item()
               for a, b in zip(results["batched, prompts together"], ref))
    tokens = [len(model.tokenizer(p)["input_ids"]) for p in prompts]
    return {"fact": fact.key, "prompts": prompts, "tokens": tokens, "seconds": timings,
            "together_vs_one_at_a_time_max_rel_diff": diff, "fastest": min(timings, key=timings.get)}


def project(run: dict, size: dict) -> dict:
    """Wall time of locating every PARAREL fact on 1, 8 and 64 workers like the ones measured.

    Basis: the worker-seconds per prompt of the Ray row with the most workers (it includes
    Ray's per-task overhead and the sharing of this machine's cores); startup is added once."""
    ray_rows = [r for r in run["rows"] if r["mode"] == "ray"]
    basis = max(ray_rows, key=lambda r: r["workers"]) if ray_rows else run["rows"][0]
    out = {}
    for w in PROJECT_WORKERS:
        seconds = size["prompts"] * basis["worker_seconds_per_prompt"] / w + basis["startup_s"]
        out[str(w)] = {"hours": seconds / 3600, "days": seconds / 86400}
    return {"basis": {k: basis[k] for k in ("mode", "workers", "threads_per_worker", "worker_seconds_per_prompt",
                                             "startup_s")}, "pararel": size, "workers": out}


def machine() -> dict:
    cuda = torch.cuda.is_available()
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(), "processor": cpu_name(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None}


def write_throughput_report(payload: dict, path, command: str) -> None:
    """docs/scale.md: the measured table, the projection and its assumptions."""
    run, proj, mach, cfg = payload["run"], payload["projection"], payload["machine"], payload["config"]
    rows = run["rows"]
    serial = rows[0]
    lines = [
        f"# Throughput and scale: {payload['model']}",
        "",
        "Facts per hour when locating knowledge neurons (IG on every layer, the paper's m = "
        f"{cfg['steps']}, adaptive refinement), in one process and on Ray workers, on the same "
        f"{run['n_facts']} PARAREL facts ({run['n_prompts']} prompts) in one run. Reproduce with:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Machine: {mach['cpu_count']} CPU cores ({mach['processor']}), torch {mach['torch']}, "
        f"{'GPU: ' + mach['gpu'] if mach['gpu'] else 'no GPU'}; engine(s) that ran: {', '.join(run['engines'])}.",
        "",
        "## Measured",
        "",
        "| mode | workers | threads/worker | startup (s) | wall (s) | facts/hour | s/prompt | worker-s/prompt "
        "| same neurons as serial | max score diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['workers']} | {r['threads_per_worker']} | {r['startup_s']:.1f} | "
                     f"{r['seconds']:.1f} | {r['facts_per_hour']:.0f} | {r['seconds_per_prompt']:.2f} | "
                     f"{r['worker_seconds_per_prompt']:.2f} | {r['same_neurons']}/{run['n_facts']} | "
                     f"{r['max_rel_diff']:.1e} |")
    best = max(rows, key=lambda r: r["facts_per_hour"])
    lines += [
        "",
        f"- Fastest here: {best['mode']} with {best['workers']} worker(s), {best['facts_per_hour']:.0f} facts/hour "
        f"({best['facts_per_hour'] / serial['facts_per_hour']:.2f}x the serial path, startup excluded).",
        "- Ray's startup (local cluster + actors loading the model) is paid once per run; the wall times exclude it.",
        "- Scores differ from the serial run only by floating-point summation order when the thread counts differ "
        "(bit-identical with equal counts, which the tests check).",
        "",
    ]
    pb = run["prompt_batching"]
    lines += [
        "## Several prompts in one pass",
        "",
        f"Fact {pb['fact']}, {len(pb['prompts'])} paraphrases of {', '.join(map(str, pb['tokens']))} tokens, "
        "attributed one at a time and together (right-padded into shared passes, `batch_prompts=True`):",
        "",
        "| variant | seconds |",
        "| --- | --- |",
        *[f"| {name} | {sec:.2f} |" for name, sec in pb["seconds"].items()],
        "",
        f"Together vs one at a time (batched engine): max score difference "
        f"{pb['together_vs_one_at_a_time_max_rel_diff']:.1e} of the largest score. Fastest: **{pb['fastest']}**"
        + (", so `locate` keeps attributing one prompt at a time on the fast engine by default; `batch_prompts=True` "
           "is there for devices and models where one prompt leaves the device idle."
           if pb["fastest"].startswith("fast") else
           ": on this machine the shared passes pay; pass `batch_prompts=True`."),
        "",
        "## GPU",
        "",
    ]
    if mach["gpu"]:
        lines.append(f"Measured on {mach['gpu']}: see the table above.")
    else:
        lines.append("No GPU was available for this run, so there is no measured per-fact cost on a GPU. On a GPU each "
                     "actor takes one device (`num_gpus=1`; the same `--workers` flag).")
    p = proj["pararel"]
    b = proj["basis"]
    lines += [
        "",
        "## Projection: the whole of PARAREL",
        "",
        f"PARAREL as kn_plugin uses it for this model: {p['relations']} relations, {p['facts']} facts, "
        f"{p['prompts']} prompts (one per usable template; causal models use templates whose answer comes last).",
        "",
        "| workers | projected wall time |",
        "| --- | --- |",
    ]
    for w, v in proj["workers"].items():
        lines.append(f"| {w} | {v['hours']:.1f} h ({v['days']:.2f} days) |")
    lines += [
        "",
        "Assumptions:",
        f"- Each worker costs {b['worker_seconds_per_prompt']:.2f} worker-seconds per prompt, as measured with "
        f"{b['workers']} Ray worker(s) of {b['threads_per_worker']} thread(s) each on this machine ({b['mode']} row); "
        "a worker of the projection is one such worker, on hardware like this.",
        "- Workers scale linearly: facts are independent tasks and results are small, so the driver is not the "
        "bottleneck at these rates; the one-time startup is added once.",
        "- Every fact is located on every usable prompt. `kn bench pararel` locates only the facts the model knows "
        "(its report says how many count) and adds interventions, so its cost per counted fact is higher and its "
        "number of located facts lower.",
        "- Prompt lengths as in the measured facts; longer prompts cost more per prompt.",
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")


def summary_payload(model: LoadedModel, run: dict, size: dict, config: ThroughputConfig, command: str) -> dict:
    return {"model": model.name, "command": command, "config": asdict(config), "machine": machine(),
            "run": run, "projection": project(run, size)}
