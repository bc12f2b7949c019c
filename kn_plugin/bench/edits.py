"""``kn bench edits``: knowledge-neuron updates and the rank-one editor (ROME) on the same
counterfactual edits, scored as the editing field scores them (:mod:`kn_plugin.edit_metrics`).

The edits are built from a finished ``kn bench pararel`` run on the same model (``source``):
its facts the model knows, with the knowledge neurons that run located on k prompts of each
fact. For a fact <s, r, t> (CounterFact's recipe on PARAREL's sentences):

* **rewrite prompt**: of its locate prompts (those naming the subject), the one on which the
  model gives t the highest probability (the fact is one the run counts as known);
* **paraphrases**: its held-out prompts (never used to locate the neurons nor to calibrate);
* **t'**: another object of the relation with another first token, drawn with the seed (as
  the run's own update experiment draws it);
* **neighbourhood**: of each of ``neighbours`` other known facts of the relation whose object
  does not start as t' does (:func:`kn_plugin.paper.control_facts`), the prompt on which the
  model gives its object the highest probability, with that object;
* **other relations**: as many known facts of other relations (the paper's inter-relation
  perplexity);
* **generation prompt**: the rewrite prompt (fluency: ``generation_tokens`` sampled tokens).

Every method edits the same facts. Editors (:data:`EDITORS`; one that cannot edit a fact
leaves the model as it is, and its record says why):

* ``kn-paper``: the paper's rule as written on the refined neurons' value slots,
  ``v - lambda1 e(t) + lambda2 e(t')`` with lambda1 = 1, lambda2 = 8;
* ``kn-authors``: the released code's: the 10% rule (neurons in more than 10% of the relation's
  sets left out; where none is left, no edit), each slot moved by its own norm times the unit
  embeddings, signed by the neuron's mean activation on the locate prompts;
* ``kn-calibrated``: kn's default :func:`~kn_plugin.editing.update_fact`: the smallest
  lambda2 of the ladder that puts t' on top of every locate prompt (sign-aware);
* ``kn-constrained``: :func:`~kn_plugin.editing.constrained_update` on the refined neurons:
  ROME's constrained least squares on their value slots alone, the neurons' key statistics
  over the first ``constrained_texts`` texts of the corpus, scaled as little as puts t' on
  top of every locate prompt;
* ``rome``: the rank-one editor (:mod:`kn_plugin.rome`) at one layer for every edit, chosen
  by the causal trace averaged over the first ``trace_cases`` cases (ROME fixes one layer per
  model the same way), unless ``rome_layer`` is given; key statistics over ``corpus_texts``
  texts of ``corpus_tokens`` tokens the model writes (seed 0), kept in ``inputs/corpus.json``.

Records, each written atomically and keyed by the content of its inputs (a rerun reads what
matches and computes only the rest; growing ``edits_per_relation`` reuses every record):
``cases/<key>.json`` (the case and its scores before any edit), ``<method>/<key>.json`` (the
scores with the edit applied, fluency, the seconds the editor took, what it reports),
``inputs/`` (corpus, prefixes, trace). The summary and report (:mod:`kn_plugin.bench.edits_summary`)
are recomputed from these records alone.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kn_plugin import paper
from kn_plugin.bench.edits_methods import CORPUS_EDITORS, EDITORS, RomeSetup
from kn_plugin.bench.pararel_data import content_hash
from kn_plugin.edit_metrics import EditCase, case_metrics, case_scores, fluency, mean_token_nlls
from kn_plugin.editing import CONSTRAINED_LADDER, LAMBDA2_LADDER, PAPER_LAMBDA2, unchanged_since, weight_snapshot
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.key_stats import corpus_keys
from kn_plugin.models import LoadedModel
from kn_plugin.rome import context_prefixes, generated_corpus, key_statistics, trace_layers
from kn_plugin.runs import check_run, clear_stale, content_stage, read_json, write_atomic
from kn_plugin.validation import finite


@dataclass(frozen=True)
class EditsConfig:
    """Checked settings of ``kn bench edits`` (``methods`` and ``edits_per_relation`` are not
    part of a run's identity: adding a method or growing the draw reuses the records)."""

    #: editors run, in this order (names of :data:`~kn_plugin.bench.edits_methods.EDITORS`)
    methods: tuple[str, ...] = ("kn-paper", "kn-authors", "kn-calibrated", "kn-constrained", "rome")
    edits_per_relation: int = 10
    #: draw of edits, new objects and neighbours; sampling
    seed: int = 0
    #: neighbourhood facts of the same relation, and as many facts of other relations, per edit
    neighbours: int = 5
    #: tokens sampled after the rewrite prompt for fluency
    generation_tokens: int = 100
    #: the layer the rank-one editor edits (None: the causal trace's peak over ``trace_cases`` cases)
    rome_layer: int | None = None
    trace_cases: int = 5
    #: the rank-one editor's key statistics: texts the model writes, and their length in tokens
    corpus_texts: int = 200
    corpus_tokens: int = 64
    #: most Adam steps of the rank-one editor's v* optimisation (ROME: 20)
    rome_steps: int = 20
    #: kn-constrained: corpus texts its neurons' key statistics are taken over
    constrained_texts: int = 25
    #: kn-paper and kn-authors: the weights of -e(t) and +e(t')
    lambda1: float = 1.0
    lambda2: float = PAPER_LAMBDA2

    def __post_init__(self):
        if not self.methods:
            raise KnowledgeNeuronError(f"give at least one method of {', '.join(EDITORS)}")
        unknown = [m for m in self.methods if m not in EDITORS]
        if unknown:
            raise KnowledgeNeuronError(f"unknown edit methods {unknown}: use {', '.join(EDITORS)}")
        if len(set(self.methods)) != len(self.methods):
            raise KnowledgeNeuronError(f"methods given twice: {list(self.methods)}")
        for name in ("edits_per_relation", "neighbours", "generation_tokens", "trace_cases", "corpus_texts",
                     "corpus_tokens", "rome_steps", "constrained_texts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KnowledgeNeuronError(f"{name.replace('_', ' ')} must be an integer >= 1, got {value!r}")
        if self.rome_layer is not None and (isinstance(self.rome_layer, bool) or not isinstance(self.rome_layer, int)):
            raise KnowledgeNeuronError(f"the ROME layer must be an integer, got {self.rome_layer!r}")
        for name in ("lambda1", "lambda2"):
            if finite(name, getattr(self, name)) < 0:
                raise KnowledgeNeuronError(f"{name} must be >= 0, got {getattr(self, name)}")

    def identity(self) -> dict:
        """What a run folder records of the settings (all but the method list and the draw size)."""
        return {k: v for k, v in asdict(self).items() if k not in ("methods", "edits_per_relation")}


def _first_token(model: LoadedModel, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"][:1]


def _best(rec: dict, among=None) -> str:
    """The prompt (of ``among``, default all) on which the model gives the fact's object the highest P."""
    idx = list(range(len(rec["prompts"]))) if among is None else list(among)
    return rec["prompts"][max(idx, key=lambda i: (rec["prob"][i], -i))]


def build_cases(model: LoadedModel, run: dict, config: EditsConfig) -> list[dict]:
    """The counterfactual edits of a ``kn bench pararel`` run (see the module docstring), per
    relation at most ``edits_per_relation`` in a seeded order of its located facts; the draw of
    n edits per relation is part of the draw of n + 1."""
    sets = run["refined"]["sets"]
    cases = []
    rels = sorted(run["facts"])
    for rel in rels:
        facts = run["facts"][rel]
        known = [r for r in facts if r["counted"]]
        located = [r for r in facts if sets.get(r["key"], {}).get("kn")]
        bags = [sets[r["key"]]["kn"] for r in located]
        objects = sorted({r["target"] for r in facts})
        rng = random.Random(f"{config.seed}-{rel}-edits")
        order = located[:]
        rng.shuffle(order)
        n = 0
        for rec in order:
            if n >= config.edits_per_relation:
                break
            locate = [i for i in rec["locate"] if rec["subject"] in rec["prompts"][i]]
            candidates = [o for o in objects if _first_token(model, o) != _first_token(model, rec["target"])]
            held = [p for i, p in enumerate(rec["prompts"]) if i not in set(rec["locate"])]
            if not locate or not candidates or not held:
                continue
            new = rng.choice(candidates)
            new_first = _first_token(model, new)
            near = [r for r in known if _first_token(model, r["target"]) != new_first]
            neighbours = paper.control_facts(near, rec["key"], new, config.neighbours, rng)
            others = [r for o in rels if o != rel for r in run["facts"][o] if r["counted"]]
            other = rng.sample(others, min(config.neighbours, len(others)))
            cases.append({
                "key": rec["key"], "relation": rel, "subject": rec["subject"],
                "prompt": _best(rec, locate), "target_true": rec["target"], "target_new": new,
                "paraphrases": held,
                "neighbours": [[_best(r), r["target"]] for r in neighbours],
                "others": [[_best(r), r["target"]] for r in other],
                "locate_prompts": [rec["prompts"][i] for i in rec["locate"]],
                "neurons": [list(x) for x in sets[rec["key"]]["kn"]],
                "kept": [list(x) for x in paper.update_neurons(sets[rec["key"]]["kn"], bags)],
                "fact_input": rec["input"],
            })
            n += 1
    return cases


def edit_case(case: dict):
    """The :class:`~kn_plugin.edit_metrics.EditCase` of a case record."""
    return EditCase(case["subject"], case["prompt"], case["target_true"], case["target_new"],
                    tuple(case["paraphrases"]), tuple(tuple(x) for x in case["neighbours"]),
                    (case["prompt"],), case["key"], case["relation"])


def _r(x: float) -> float:
    return float(f"{x:.6g}")


def _rounded(scores: dict) -> dict:
    return {kind: [{k: _r(v) for k, v in row.items()} for row in rows] for kind, rows in scores.items()}


def measure_case(model: LoadedModel, case: dict, config: EditsConfig) -> dict:
    """A case's CounterFact scores, its other-relation NLLs and fluency, as the model is now."""
    scores = case_scores(model, edit_case(case))
    others = [_r(x) for x in mean_token_nlls(model, [tuple(x) for x in case["others"]])]
    ge = fluency(model, [case["prompt"]], config.generation_tokens, config.seed)["ngram_entropy"]
    return {"scores": _rounded(scores), "others": others, "fluency": _r(ge)}


def _editor_settings(method: str, config: EditsConfig, rome_inputs: dict | None) -> dict:
    if method == "rome":
        return {"steps": config.rome_steps, **(rome_inputs or {})}
    if method == "kn-calibrated":
        return {"ladder": list(LAMBDA2_LADDER)}
    if method == "kn-constrained":
        return {"ladder": list(CONSTRAINED_LADDER), "texts": config.constrained_texts, **(rome_inputs or {})}
    return {"lambda1": config.lambda1, "lambda2": config.lambda2}


def edit_task(model: LoadedModel, method: str, case: dict, config: EditsConfig, rome: RomeSetup | None) -> dict:
    """Make the edit, measure the case with it applied, undo (checked bit-exact). ``case``
    holds its scores before any edit: an editor that makes no edit keeps them."""

    snapshot = weight_snapshot(model)
    t0 = time.perf_counter()
    edit = EDITORS[method](model, case, config, rome)
    seconds = time.perf_counter() - t0
    head = {"key": case["key"], "relation": case["relation"], "method": method}
    if isinstance(edit, str):
        before = case["before"]
        return {**head, **before, "metrics": case_metrics(before["scores"]), "slots": 0, "weight_change": 0.0,
                "edit_seconds": round(seconds, 2), "meta": {}, "skipped": edit}
    with edit.applied(model):
        after = measure_case(model, case, config)
    if not unchanged_since(snapshot):
        raise KnowledgeNeuronError(f"the {method} edit of {case['key']} was not undone exactly")
    change = float(torch.linalg.vector_norm(edit.new.double() - edit.old.double()))
    meta = {k: v for k, v in edit.meta.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {**head, **after, "metrics": case_metrics(after["scores"]), "slots": len(edit.slots),
            "weight_change": _r(change), "edit_seconds": round(seconds, 2), "meta": meta, "skipped": None}


def _input_file(out: Path, name: str, make: Callable[[], dict], content: str) -> dict:
    """``out/inputs/<name>.json``, made once (reused while its ``input`` hash matches)."""
    path = out / "inputs" / f"{name}.json"
    rec = read_json(path)
    if rec is None or rec.get("input") != content:
        rec = {**make(), "input": content}
        write_atomic(path, rec, compact=True)
    return rec


def corpus_input(model: LoadedModel, out: Path, config: EditsConfig) -> dict:
    """The texts the model writes for the key statistics, kept in ``out/inputs/corpus.json``."""
    def make():
        t0 = time.perf_counter()
        texts = generated_corpus(model, config.corpus_texts, config.corpus_tokens)
        return {"texts": texts, "seconds": round(time.perf_counter() - t0, 1)}

    base = content_hash(model.fingerprint, model.weights_digest(), config.seed)
    return _input_file(out, "corpus", make, content_hash(base, config.corpus_texts, config.corpus_tokens))


def rome_inputs(model: LoadedModel, out: Path, cases: list[dict], config: EditsConfig) -> dict:
    """The layer (given, or the causal trace's peak averaged over the first cases) and the
    context prefixes, kept under ``out/inputs``."""
    base = content_hash(model.fingerprint, model.weights_digest(), config.seed)
    if config.rome_layer is not None:
        layer = model.adapter.check_layer(config.rome_layer)
        trace = None
    else:
        traced = cases[:config.trace_cases]

        def make_trace():
            t0 = time.perf_counter()
            effects = [trace_layers(model, c["prompt"], c["subject"], c["target_true"]) for c in traced]
            mean = [sum(e[i] for e in effects) / len(effects) for i in range(model.n_layers)]
            return {"cases": [c["key"] for c in traced], "effects": [[_r(x) for x in e] for e in effects],
                    "mean": [_r(x) for x in mean], "layer": max(range(len(mean)), key=mean.__getitem__),
                    "seconds": round(time.perf_counter() - t0, 1)}

        trace = _input_file(out, "trace", make_trace, content_hash(base, [c["key"] for c in traced]))
        layer = trace["layer"]
    prefixes = _input_file(out, "prefixes", lambda: {"texts": context_prefixes(model)}, base)
    return {"layer": layer, "trace": trace, "prefixes": prefixes}


def _setup(model: LoadedModel, setup: RomeSetup, method: str, rome: dict | None, config: EditsConfig) -> None:
    """Fill in what ``method`` needs (the rank-one editor's key statistics: once)."""
    if method == "kn-constrained" and setup.keys is None:
        setup.keys = corpus_keys(model, setup.corpus[:config.constrained_texts])
    if method == "rome" and setup.stats is None:
        spec = f"{config.corpus_texts} texts of {config.corpus_tokens} tokens written by the model (top-k 5, seed 0)"
        setup.layer, setup.prefixes = rome["layer"], rome["prefixes"]["texts"]
        setup.stats = key_statistics(model, rome["layer"], setup.corpus, corpus=spec)


def check_source(model: LoadedModel, run: dict, source) -> None:
    """The neurons of ``source`` were located on this model, as it is now."""
    identity = model.identity()
    if (run.get("fingerprint"), run.get("weights"), run.get("dtype")) != (
            identity["model"], identity["weights"], identity["dtype"]):
        raise KnowledgeNeuronError(f"{source} was made with another model, weights or dtype than {model.name} "
                                   f"({identity['dtype']}) as loaded now: locate on this model first")


def run_edits(model: LoadedModel, run: dict, source, out: str | Path, config: EditsConfig,
              progress: bool = True, reverse: bool = False) -> dict:
    """Run (or resume) the benchmark on the facts of ``run`` (:func:`~kn_plugin.bench.pararel_summary.load_run`).

    ``reverse``: each stage hands its pending edits out from the last
    (:func:`~kn_plugin.runs.content_stage`), for a second process on the same folder."""
    if model.is_masked:
        raise KnowledgeNeuronError(f"{model.name} is a masked LM: `kn bench edits` scores causal LMs "
                                   "(the rank-one editor and fluency write text left to right)")
    check_source(model, run, source)
    if config.rome_layer is not None:
        model.adapter.check_layer(config.rome_layer)
    cases = build_cases(model, run, config)
    if not cases:
        raise KnowledgeNeuronError(f"{source} has no fact to edit: none is known with knowledge neurons, "
                                   "a held-out prompt and another object in its relation")
    out = Path(out)
    check_run(out, {**model.identity(), **config.identity()})
    clear_stale(out)
    manifest: dict[str, dict[str, str]] = {}

    def serial(task):
        return lambda todo: ((key, task(payload)) for key, payload in todo)

    with torch.no_grad():
        jobs = [(c["key"], content_hash(c, config.generation_tokens, config.seed), c) for c in cases]
        before, manifest["cases"] = content_stage(
            out, "cases", jobs, serial(lambda c: {**c, "before": measure_case(model, c, config)}), "cases", progress,
            reverse)
        corpus = corpus_input(model, out, config) if set(CORPUS_EDITORS) & set(config.methods) else None
        rome = rome_inputs(model, out, cases, config) if "rome" in config.methods else None
        setup = RomeSetup(corpus["texts"]) if corpus is not None else None
        for method in config.methods:
            used = None
            if method == "rome":
                used = {"layer": rome["layer"], "corpus": corpus["input"], "prefixes": rome["prefixes"]["input"]}
            elif method in CORPUS_EDITORS:
                used = {"corpus": corpus["input"]}
            settings = _editor_settings(method, config, used)
            jobs = [(c["key"], content_hash(before[c["key"]]["input"], method, settings), before[c["key"]])
                    for c in cases]
            if method in CORPUS_EDITORS and any(
                    (read_json(out / method / f"{k}.json") or {}).get("input") != h for k, h, _ in jobs):
                _setup(model, setup, method, rome, config)
            _, manifest[method] = content_stage(
                out, method, jobs, serial(lambda c, m=method: edit_task(model, m, c, config, setup)), method, progress,
                reverse)
    rome_info = None
    if rome is not None:
        rome_info = {"layer": rome["layer"], "trace": rome["trace"] and {
                         k: rome["trace"][k] for k in ("cases", "mean", "layer", "seconds")},
                     "corpus_seconds": corpus["seconds"], "corpus_texts": config.corpus_texts,
                     "corpus_tokens": config.corpus_tokens}
    return {"protocol": "edits", "model": model.name, "fingerprint": model.fingerprint,
            "dtype": str(model.dtype).removeprefix("torch."), "weights": model.weights_digest(),
            "source": str(source), "config": asdict(config), "records": manifest, "rome": rome_info}
