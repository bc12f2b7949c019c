"""``kn bench pararel``: the paper's experiments on PARAREL under its own protocol (resumable).

Follows the authors' released code (:mod:`kn_plugin.paper`) and adds what the paper lacks:
held-out paraphrases, matched random neurons, intervals and paired tests
(:mod:`kn_plugin.bench.pararel_summary`). Stages, each record written atomically and keyed by
the content of its inputs (a rerun reads what matches and computes only the rest):

1. ``facts/<key>.json``: every prompt's P(object), rank and top-1; for a fact the model knows,
   IG and activation coarse sets on ``locate_prompts`` of its prompts (drawn per fact with the
   seed; the others are held out).
2. refinement per relation (in the driver, cheap): the released code's relation-level p.
3. ``effects/<key>.json``: suppress (x0) / amplify (x2) on every prompt of the fact with its
   knowledge neurons, the activation-selected baseline and random neurons matched by layer and
   set size; ``unrelated/<key>.json``: the same neurons on an unrelated fact of another relation.
4. ``updates/<key>.json``: the update on facts the model answers, measured on those prompts.
5. ``erase/<relation>.json``: the released code's erase of the relation's 20 commonest neurons.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from kn_plugin import paper
from kn_plugin.attribution import AUTO_TOLERANCE
from kn_plugin.data import PAPER_ERASE_RELATIONS
from kn_plugin.distributed import run_tasks
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.models import LoadedModel
from kn_plugin.runs import check_run, clear_stale, content_stage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParaRelConfig:
    """Checked settings of ``kn bench pararel`` (the data selection, relations and facts per
    relation, is not part of them: a larger draw of the same run reuses its records)."""

    steps: int | str = 20
    grid: str = "riemann_right"
    tolerance: float = AUTO_TOLERANCE  # steps="auto": the completeness gap each layer must reach
    batch_size: int = 10
    max_rank: int = 10  # a prompt "knows" the fact when the object's first token ranks below this
    min_known: float = 0.5  # a fact counts when that holds for at least this share of its prompts
    locate_prompts: int = 3  # k prompts locate the neurons; the others are held out
    threshold: float = paper.IG_THRESHOLD
    base_threshold: float = paper.BASE_THRESHOLD
    share: float = paper.START_SHARE
    min_sharing: int = paper.MIN_SHARING
    random_draws: int = 3
    update_facts: int = 10
    lambda1: float = 1.0
    lambda2: float = 8.0
    controls: int = 5  # facts of the same / of other relations measured around each update
    erase_relations: tuple[str, ...] = PAPER_ERASE_RELATIONS
    erase_top: int = paper.ERASE_TOP
    erase_others: int = 50
    seed: int = 0
    engine: str = "fast"

    def __post_init__(self):
        from kn_plugin.attribution import check_grid, get_engine

        get_engine(self.engine)
        check_grid(self.grid)
        if self.steps != "auto" and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1):
            raise KnowledgeNeuronError(f"steps must be a positive integer or 'auto', got {self.steps!r}")
        for name in ("batch_size", "max_rank", "random_draws", "min_sharing", "erase_top", "controls"):
            if getattr(self, name) < 1:
                raise KnowledgeNeuronError(f"{name.replace('_', ' ')} must be >= 1")
        if self.locate_prompts < self.min_sharing:
            raise KnowledgeNeuronError(f"--locate-prompts {self.locate_prompts} is below the {self.min_sharing} "
                                       "prompts a refined neuron must be shared by")
        for name in ("min_known", "threshold", "base_threshold", "share"):
            if not 0 < getattr(self, name) <= 1:
                raise KnowledgeNeuronError(f"{name.replace('_', ' ')} must be in (0, 1], got {getattr(self, name)}")
        if self.update_facts < 0 or self.erase_others < 0:
            raise KnowledgeNeuronError("update facts and erase others must be >= 0")

    @property
    def min_prompts(self) -> int:
        """Usable prompts a fact needs: the locate prompts and at least one held out."""
        return self.locate_prompts + 1


def content_hash(*parts) -> str:
    """Identity of a record's inputs: a record is reused only for the same inputs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _r(x: float) -> float:
    return float(f"{x:.6g}")


def draw_facts(data: dict, facts_per_relation: int | None, seed: int) -> dict:
    """Per relation a seeded shuffle of its facts, the first ``facts_per_relation`` kept (in
    file order): the draw of n facts is part of the draw of n + 1, so growing a run reuses it."""
    out = {}
    for rel, facts in data.items():
        order = list(range(len(facts)))
        random.Random(f"{seed}-{rel}").shuffle(order)
        keep = sorted(order[:facts_per_relation] if facts_per_relation is not None else order)
        out[rel] = [facts[i] for i in keep]
    return out


def pararel_protocol_data(model: LoadedModel, folder, relations: list[str] | None,
                          facts_per_relation: int | None, config: ParaRelConfig) -> dict:
    """The facts a run uses: PARAREL relations with more than 3 templates and at least
    ``config.min_prompts`` usable prompts (k to locate, one or more held out), objects of one
    token (as the paper's BERT vocabulary), then ``facts_per_relation`` drawn per relation.

    A relation asked for by name that cannot be used is a one-line error (naming why)."""
    from kn_plugin.data import load_pararel

    if facts_per_relation is not None and facts_per_relation < 1:
        raise KnowledgeNeuronError(f"facts per relation must be >= 1, got {facts_per_relation}")
    if relations is not None and len(set(relations)) != len(relations):
        raise KnowledgeNeuronError(f"relations given twice: {sorted({r for r in relations if relations.count(r) > 1})}")
    try:
        data = load_pararel(folder, relations, masked=model.is_masked,
                            mask_token=model.tokenizer.mask_token if model.is_masked else None,
                            min_prompts=config.min_prompts, tokenizer=model.tokenizer, single_token=True)
    except KnowledgeNeuronError as exc:
        if relations is None or "no PARAREL relation is usable" not in str(exc):
            raise
        data = {}  # every relation asked for is unusable: named below
    if relations is not None:
        missing = [r for r in relations if r not in data]
        if missing:
            raise KnowledgeNeuronError(
                f"relations {missing} have no usable fact: each needs {config.min_prompts} usable prompts "
                f"(--locate-prompts {config.locate_prompts} + 1 held out) and one-token objects; "
                "lower --locate-prompts or drop them")
    return draw_facts(data, facts_per_relation, config.seed)


def locate_indices(key: str, n_prompts: int, k: int, seed: int) -> list[int]:
    """The ``k`` prompts that locate a fact's neurons, drawn per fact with the seed."""
    return sorted(random.Random(f"{seed}-{key}-locate").sample(range(n_prompts), k))


# --- stage 1 --------------------------------------------------------------------------------

def fact_task(model: LoadedModel, fact, config: ParaRelConfig) -> dict:
    """Assess every prompt of a PARAREL fact; for a fact the model knows, the IG and activation
    coarse sets of its locate prompts (in this process or on a Ray worker)."""
    from kn_plugin.assess import assess, encode_fact
    from kn_plugin.refinement import LowProbabilityWarning, locate_quietly

    t0 = time.perf_counter()
    rec = {"key": fact.key, "relation": fact.relation, "subject": fact.subject, "target": fact.target,
           "content": content_hash(fact.prompts, fact.target), "prompts": [], "prob": [], "rank": [], "top": []}
    for p in fact.prompts:
        try:
            a = assess(model, p, fact.target, k=1)
        except KnowledgeNeuronError as exc:
            logger.info("%s: skipping prompt %r (%s)", fact.key, p, exc)
            continue
        rec["prompts"].append(p)
        rec["prob"].append(_r(a.prob))
        rec["rank"].append(a.rank)
        rec["top"].append(a.rank == 0)
    rec["target_id"] = encode_fact(model, fact.prompts[0], fact.target).target_ids[0]
    known = [r < config.max_rank for r in rec["rank"]]
    rec["known_share"] = sum(known) / len(known) if known else 0.0
    rec["counted"] = len(known) >= config.min_prompts and rec["known_share"] >= config.min_known
    if rec["counted"]:
        idx = locate_indices(fact.key, len(rec["prompts"]), config.locate_prompts, config.seed)
        with warnings.catch_warnings():  # the record keeps every prompt's probability
            warnings.simplefilter("ignore", LowProbabilityWarning)
            res = locate_quietly(model, [rec["prompts"][i] for i in idx], fact.target, steps=config.steps,
                                 grid=config.grid, tolerance=config.tolerance, share=config.share, adaptive=False,
                                 batch_size=config.batch_size, engine=config.engine, progress=False)
        atts = res.attributions
        rec["locate"] = idx
        rec["ig_coarse"] = [paper.coarse_set(a.scores, config.threshold) for a in atts]
        rec["base_coarse"] = [paper.coarse_set(a.activations, config.base_threshold) for a in atts]
        rec["steps_used"] = [a.steps for a in atts]
        if config.steps == "auto":  # each layer's own m
            rec["steps_per_layer"] = [a.extras.get("steps_per_layer") for a in atts]
        effect = [(a.target_prob - a.zeroed_prob).abs() for a in atts]
        rec["max_gap"] = [_r(float((a.completeness_gap.abs() / (e + 1e-4)).max())) for a, e in zip(atts, effect)]
        rec["engine"] = sorted({a.engine for a in atts})
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


# --- stage 2 --------------------------------------------------------------------------------

def refine_relations(facts: dict[str, list[dict]], config: ParaRelConfig) -> dict:
    """Per relation the released code's p tuning, for IG and for the activation baseline:
    ``{"relations": {rel: {...}}, "sets": {key: {"kn": [...], "base": [...]}}}``."""
    out = {"relations": {}, "sets": {}}
    for rel, recs in facts.items():
        located = [r for r in recs if r.get("ig_coarse") is not None]
        if not located:
            continue
        info = {}
        for name, field in (("kn", "ig_coarse"), ("base", "base_coarse")):
            sets, used, mean = paper.tune_relation([r[field] for r in located], share=config.share,
                                                   min_sharing=config.min_sharing)
            info[name] = {"share": used, "mean_size": mean}
            for r, s in zip(located, sets):
                out["sets"].setdefault(r["key"], {})[name] = [list(n) for n in s]
        out["relations"][rel] = info
    return out


# --- stage 3 --------------------------------------------------------------------------------

def unrelated_fact(rec: dict, facts: dict[str, list[dict]], seed: int) -> dict | None:
    """A counted fact of another relation, drawn with the seed: the relation from the other
    relations, then the fact from that relation's counted facts."""
    rng = random.Random(f"{seed}-{rec['key']}-unrelated")
    others = sorted(r for r in facts if r != rec["relation"] and any(f["counted"] for f in facts[r]))
    if not others:
        return None
    rel = rng.choice(others)
    return rng.choice([f for f in facts[rel] if f["counted"]])


def effect_task(model: LoadedModel, rec: dict, sets: dict, config: ParaRelConfig) -> dict:
    """Suppress and amplify on every prompt of the fact (one batched forward per prompt)."""
    from kn_plugin.assess import encode_fact
    from kn_plugin.evaluation import random_neurons, variant_probs

    t0 = time.perf_counter()
    kn, base = [tuple(n) for n in sets["kn"]], [tuple(n) for n in sets.get("base", [])]
    draws = [random_neurons(kn, model.d_mlp, seed=int(content_hash(rec["key"], d, config.seed), 16) % 2**31)
             for d in range(config.random_draws)]
    groups = [("kn", kn), ("base", base)] + [(f"random{d}", s) for d, s in enumerate(draws)]
    variants = [([], 1.0)] + [(s, f) for _, s in groups for f in (0.0, 2.0)]
    out = {"key": rec["key"], "relation": rec["relation"], "kn": [list(n) for n in kn],
           "base": [list(n) for n in base], "locate": rec["locate"]}
    cols: dict[str, list[float]] = {}
    for p in rec["prompts"]:
        probs, _ = variant_probs(model, encode_fact(model, p, rec["target"]), variants)
        cols.setdefault("before", []).append(_r(probs[0]))
        for g, (name, _) in enumerate(groups):
            for j, op in enumerate(("suppress", "amplify")):
                cols.setdefault(f"{name}_{op}", []).append(probs[1 + 2 * g + j])
    for op in ("suppress", "amplify"):
        out[f"kn_{op}"] = [_r(x) for x in cols[f"kn_{op}"]]
        out[f"base_{op}"] = [_r(x) for x in cols[f"base_{op}"]]
        out[f"random_{op}"] = [_r(sum(col) / len(draws)) for col in
                               zip(*(cols[f"random{d}_{op}"] for d in range(len(draws))))]
    out["before"] = cols["before"]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def unrelated_task(model: LoadedModel, rec: dict, neurons: list, unrelated: dict) -> dict:
    """A fact's knowledge neurons suppressed and amplified on every prompt of an unrelated fact
    (its own record: growing a run redraws the unrelated fact, not the fact's effects)."""
    from kn_plugin.assess import encode_fact
    from kn_plugin.evaluation import variant_probs

    t0 = time.perf_counter()
    kn = [tuple(n) for n in neurons]
    out = {"key": rec["key"], "relation": rec["relation"], "unrelated": unrelated["key"],
           "unrelated_relation": unrelated["relation"], "before": [], "suppress": [], "amplify": []}
    for p in unrelated["prompts"]:
        probs, _ = variant_probs(model, encode_fact(model, p, unrelated["target"]), [([], 1.0), (kn, 0.0), (kn, 2.0)])
        for name, x in zip(("before", "suppress", "amplify"), probs):
            out[name].append(_r(x))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


# --- stage 4 --------------------------------------------------------------------------------

def _log_ppl(model, recs: list[dict]) -> list[float]:
    """Per control fact: mean over its prompts of -log P(object) (the released code's log-ppl)."""
    from kn_plugin.assess import encode_fact
    from kn_plugin.evaluation import predictions

    out = []
    for r in recs:
        lps = predictions(model, [encode_fact(model, p, r["target"]) for p in r["prompts"]])[1]
        out.append(_r(-sum(lps) / len(lps)))
    return out


def update_task(model: LoadedModel, rec: dict, neurons: list, new_target: str, intra: list[dict],
                inter: list[dict], config: ParaRelConfig) -> dict:
    """Update one fact to ``new_target`` (the authors' rule), measure on the prompts the model
    answered correctly before, and around it on control facts; undo."""
    from kn_plugin.assess import encode_fact
    from kn_plugin.editing import update_fact
    from kn_plugin.evaluation import predictions

    t0 = time.perf_counter()
    right = [p for p, top in zip(rec["prompts"], rec["top"]) if top]
    edit = update_fact(model, [tuple(n) for n in neurons], rec["target"], new_target, lambda1=config.lambda1,
                       lambda2=config.lambda2, scale="norm", prompts=right)
    old = [encode_fact(model, p, rec["target"]) for p in right]
    new = [encode_fact(model, p, new_target) for p in right]

    def measure():
        tops, old_lp = predictions(model, old)
        return {"top": tops, "old": [_r(pow(2.718281828459045, x)) for x in old_lp],
                "new": [_r(pow(2.718281828459045, x)) for x in predictions(model, new)[1]],
                "intra_log_ppl": _log_ppl(model, intra), "inter_log_ppl": _log_ppl(model, inter)}

    before = measure()
    with edit.applied(model):
        after = measure()
    rates = paper.update_rates(before["top"], after["top"], old[0].target_ids[0], new[0].target_ids[0])
    return {"key": rec["key"], "relation": rec["relation"], "old": rec["target"], "new": new_target,
            "neurons": [list(n) for n in neurons], "n_slots": len(edit.slots), "answered": right,
            "intra": [r["key"] for r in intra], "inter": [r["key"] for r in inter],
            "before": before, "after": after, **rates, "seconds": round(time.perf_counter() - t0, 2)}


# --- stage 5 --------------------------------------------------------------------------------

def erase_task(model: LoadedModel, relation: str, neurons: list, relation_facts: list[dict],
               others: list[dict], config: ParaRelConfig) -> dict:
    """Zero the value slots of ``neurons`` (the released code's erase), measure, undo."""
    import torch

    from kn_plugin.assess import encode_fact
    from kn_plugin.editing import WeightEdit, read_slots
    from kn_plugin.evaluation import predictions

    slots = [tuple(n) for n in neurons]
    old = read_slots(model, slots)
    edit = WeightEdit(model.name, model.n_layers, model.d_mlp, slots, old, torch.zeros_like(old), "erase",
                      {"rule": f"released code: top {config.erase_top}, zeroed"}, model.fingerprint)

    def measure(recs):
        facts = [encode_fact(model, p, r["target"]) for r in recs for p in r["prompts"]]
        tops, lps = predictions(model, facts)
        return {"log_ppl": [_r(-x) for x in lps],
                "correct": [t == f.target_ids[0] for t, f in zip(tops, facts)]}

    before = {"relation": measure(relation_facts), "other": measure(others)}
    with edit.applied(model):
        after = {"relation": measure(relation_facts), "other": measure(others)}
    return {"relation": relation, "neurons": [list(n) for n in slots], "facts": [r["key"] for r in relation_facts],
            "others": [r["key"] for r in others], "before": before, "after": after}


# --- the run --------------------------------------------------------------------------------

def run_pararel(model: LoadedModel, data: dict, out: str | os.PathLike, config: ParaRelConfig,
                progress: bool = True, pool=None) -> dict:
    """Run (or resume) the protocol on ``data`` ({relation: [ParaRelFact]}, already drawn).

    ``pool``: a started :class:`~kn_plugin.distributed.RayPool`; the tasks then run on its
    workers (the same functions as here) and the driver writes the records."""
    if not data:
        raise KnowledgeNeuronError("no PARAREL relation is usable with these settings")
    out = Path(out)
    identity = model.identity()
    check_run(out, {**identity, **asdict(config)})
    clear_stale(out)
    manifest: dict[str, dict[str, str]] = {}

    def stage(task: Callable, folder: str, jobs: list[tuple[str, str, tuple]], desc: str) -> dict[str, dict]:
        """jobs: (key, content hash, payload); a record is reused when its hash matches."""
        done, manifest[folder] = content_stage(out, folder, jobs, lambda todo: run_tasks(model, task, todo, pool),
                                               desc, progress)
        return done

    rels = sorted(data)
    settings = asdict(config)
    locate_keys = ("steps", "grid", "tolerance", "batch_size", "max_rank", "min_known", "locate_prompts", "threshold",
                   "base_threshold", "seed", "engine")
    fact_settings = {k: settings[k] for k in locate_keys}
    jobs = [(f.key, content_hash(f.prompts, f.target, fact_settings), (f, config)) for rel in rels for f in data[rel]]
    done = stage(fact_task, "facts", jobs, "facts")
    facts = {rel: [done[f.key] for f in data[rel]] for rel in rels}

    refined = refine_relations(facts, config)
    sets = refined["sets"]
    located = [rec for rel in rels for rec in facts[rel] if sets.get(rec["key"], {}).get("kn")]
    jobs = [(rec["key"], content_hash(rec["input"], sets[rec["key"]], config.random_draws, config.seed),
             (rec, sets[rec["key"]], config)) for rec in located]
    stage(effect_task, "effects", jobs, "effects")
    jobs = []
    for rec in located:
        unrel = unrelated_fact(rec, facts, config.seed)
        if unrel is not None:
            kn = sets[rec["key"]]["kn"]
            jobs.append((rec["key"], content_hash(rec["input"], kn, unrel["input"]), (rec, kn, unrel)))
    stage(unrelated_task, "unrelated", jobs, "unrelated facts")

    jobs = update_jobs(model, facts, sets, config)
    stage(update_task, "updates", jobs, "updates")

    jobs = []
    for rel in [r for r in config.erase_relations if r in facts]:
        kn_sets = [sets[r["key"]]["kn"] for r in facts[rel] if sets.get(r["key"], {}).get("kn")]
        if not kn_sets:
            continue
        neurons = [list(n) for n in paper.top_shared(kn_sets, config.erase_top)]
        rng = random.Random(f"{config.seed}-{rel}-erase")
        pool_other = [r for o in rels if o != rel for r in facts[o] if r["counted"]]
        others = rng.sample(pool_other, min(config.erase_others, len(pool_other)))
        rel_facts = [r for r in facts[rel] if r["counted"]]
        content = content_hash(neurons, [r["input"] for r in rel_facts], [r["input"] for r in others])
        jobs.append((rel, content, (rel, neurons, rel_facts, others, config)))
    stage(erase_task, "erase", jobs, "erasures")
    return {"protocol": "paper", "model": model.name, "fingerprint": model.fingerprint,
            "dtype": identity["dtype"], "weights": identity["weights"], "config": settings,
            "relations": {rel: [f.key for f in data[rel]] for rel in rels}, "records": manifest,
            "refined": refined}


def update_jobs(model, facts: dict[str, list[dict]], sets: dict, config: ParaRelConfig) -> list:
    """Per relation up to ``update_facts`` edits, in a seeded order of its located facts: the
    new object is another object of the relation (another first token); facts without a
    correctly answered prompt or without neurons left after the 10% rule are passed over."""
    first = lambda t: model.tokenizer(t, add_special_tokens=False)["input_ids"][:1]  # noqa: E731
    jobs = []
    rels = sorted(facts)
    for rel in rels:
        located = [r for r in facts[rel] if sets.get(r["key"], {}).get("kn")]
        bags = [sets[r["key"]]["kn"] for r in located]
        rng = random.Random(f"{config.seed}-{rel}-update")
        order = located[:]
        rng.shuffle(order)
        objects = sorted({r["target"] for r in facts[rel]})
        n = 0
        for rec in order:
            if n >= config.update_facts:
                break
            neurons = paper.update_neurons(sets[rec["key"]]["kn"], bags)
            candidates = [o for o in objects if first(o) != first(rec["target"])]
            if not neurons or not candidates or not any(rec["top"]):
                continue
            new = rng.choice(candidates)
            intra = paper.control_facts([r for r in facts[rel] if r["counted"]], rec["key"], new, config.controls, rng)
            inter_pool = [r for o in rels if o != rel for r in facts[o] if r["counted"]]
            inter = rng.sample(inter_pool, min(config.controls, len(inter_pool)))
            content = content_hash(rec["input"], neurons, new, [r["input"] for r in intra],
                                   [r["input"] for r in inter], config.lambda1, config.lambda2)
            jobs.append((rec["key"], content, (rec, [list(x) for x in neurons], new, intra, inter, config)))
            n += 1
    return jobs
