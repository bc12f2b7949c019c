"""Evaluation: the paper's metrics for interventions and edits on knowledge neurons."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from kn_plugin.editing import WeightEdit, unchanged_since, weight_snapshot
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.interventions import group_by_layer, scale_neurons
from kn_plugin.models import LoadedModel, accepts_model
from kn_plugin.scoring import EncodedFact, encode_fact, target_log_prob


@accepts_model
@torch.no_grad()
def target_probs(model: LoadedModel, facts: Sequence[EncodedFact]) -> list[float]:
    """P(target | prompt) for each encoded fact."""
    return [target_log_prob(model.hf_model(f.input_ids).logits, f).exp()[0].item() for f in facts]


@accepts_model
def intervened_probs(model: LoadedModel, facts: Sequence[EncodedFact], neurons: Iterable,
                     factor: float, all_positions: bool = False) -> list[float]:
    """P(target) with the neurons scaled by ``factor`` at each fact's prediction position
    (or at every position with ``all_positions=True``)."""
    neurons = list(neurons)
    out = []
    for f in facts:
        with scale_neurons(model, neurons, factor, position=None if all_positions else f):
            out.extend(target_probs(model, [f]))
    return out


@accepts_model
@torch.no_grad()
def variant_probs(model: LoadedModel, fact: EncodedFact, variants: Sequence[tuple[Iterable, float]]
                  ) -> tuple[list[float], list[int]]:
    """P(target) and the top-1 token with each variant applied at the fact's prediction
    position, all in one batched forward: row ``k`` scales the neurons ``variants[k][0]`` by
    ``variants[k][1]`` (an empty neuron list is the clean model). Equal to
    :func:`intervened_probs` one variant at a time (tested)."""
    variants = [(list(group_by_layer(n, model.n_layers, model.d_mlp).items()), float(f)) for n, f in variants]
    if not variants:
        return [], []
    rows: dict[int, list[tuple[int, torch.Tensor, float]]] = {}
    for k, (groups, factor) in enumerate(variants):
        for layer, idx in groups:
            rows.setdefault(layer, []).append((k, idx, factor))
    pos = fact.pred_pos

    def hook(entries):
        def fn(act):
            out = act.clone()
            for k, idx, factor in entries:
                out[k, pos, idx.to(act.device)] *= factor
            return out
        return fn

    with model.adapter.patched({layer: hook(entries) for layer, entries in rows.items()}):
        logits = model.hf_model(fact.input_ids.expand(len(variants), -1)).logits
    probs = target_log_prob(logits, fact).exp().tolist()
    return probs, logits[:, pos].argmax(-1).tolist()


def relative_change(before: Sequence[float], after: Sequence[float]) -> float:
    """Ratio of means, as the paper reports it: (mean(after) - mean(before)) / mean(before)."""
    if not before:
        raise KnowledgeNeuronError("no probabilities to compare")
    b = sum(before) / len(before)
    a = sum(after) / len(after)
    return (a - b) / b if b > 0 else float("nan")


def random_neurons(neurons: Iterable, d_mlp: int, seed: int = 0) -> list[tuple[int, int]]:
    """Random control: as many neurons per layer as ``neurons`` has, none of them, fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for layer, idx in sorted(group_by_layer(neurons).items()):
        taken = set(idx.tolist())
        if 2 * len(taken) > d_mlp:
            raise KnowledgeNeuronError(f"layer {layer}: {len(taken)} of its {d_mlp} neurons are in the set, so no "
                                       "random set of the same size can avoid them; the random control is undefined")
        pool = torch.tensor([i for i in range(d_mlp) if i not in taken])
        pick = pool[torch.randperm(len(pool), generator=gen)[: len(idx)]]
        out.extend((layer, int(i)) for i in sorted(pick.tolist()))
    return out


@dataclass
class InterventionEffect:
    """Probabilities of the correct answer before/after scaling neurons, with controls."""

    factor: float
    before: list[float]
    after: list[float]
    relative_change: float
    random_after: list[float]
    random_relative_change: float
    unrelated_before: list[float] = field(default_factory=list)
    unrelated_after: list[float] = field(default_factory=list)
    unrelated_relative_change: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@accepts_model
def intervention_effect(model: LoadedModel, facts: Sequence[EncodedFact], neurons: Iterable,
                        factor: float, seed: int = 0, unrelated: Sequence[EncodedFact] = (),
                        all_positions: bool = False, random_draws: int = 1,
                        before: Sequence[float] | None = None,
                        unrelated_before: Sequence[float] | None = None) -> InterventionEffect:
    """Scale ``neurons`` by ``factor`` (0: suppress, 2: amplify) on ``facts``, and the same with
    random neurons (same count per layer; ``random_draws`` draws from seeds ``seed, seed+1, ...``,
    probabilities averaged per prompt) and on ``unrelated`` facts of another relation.
    ``before``/``unrelated_before``: the clean probabilities, when the caller already has them."""
    neurons = list(neurons)
    group_by_layer(neurons, model.n_layers, model.d_mlp)
    if random_draws < 1:
        raise KnowledgeNeuronError(f"random_draws must be >= 1, got {random_draws}")
    before = list(before) if before is not None else target_probs(model, facts)
    after = intervened_probs(model, facts, neurons, factor, all_positions)
    draws = [intervened_probs(model, facts, random_neurons(neurons, model.d_mlp, seed + k), factor,
                              all_positions) for k in range(random_draws)]
    rand = [sum(col) / random_draws for col in zip(*draws)]
    effect = InterventionEffect(factor, before, after, relative_change(before, after), rand,
                                relative_change(before, rand))
    if unrelated:
        effect.unrelated_before = (list(unrelated_before) if unrelated_before is not None
                                   else target_probs(model, unrelated))
        effect.unrelated_after = intervened_probs(model, unrelated, neurons, factor, all_positions)
        effect.unrelated_relative_change = relative_change(effect.unrelated_before,
                                                           effect.unrelated_after)
    return effect


@accepts_model
@torch.no_grad()
def predictions(model: LoadedModel, facts: Sequence[EncodedFact]) -> tuple[list[int], list[float]]:
    """One forward per fact: the token predicted at the prediction position and log P(target)."""
    tops, logps = [], []
    for f in facts:
        logits = model.hf_model(f.input_ids).logits
        tops.append(int(logits[0, f.pred_pos].argmax()))
        logps.append(target_log_prob(logits, f)[0].item())
    return tops, logps


def pooled_perplexity(facts: Sequence[EncodedFact], log_probs: Sequence[float]) -> float:
    """exp of the mean negative log-likelihood per target token over ``facts``."""
    if not facts:
        return float("nan")
    return math.exp(-sum(log_probs) / sum(len(f.target_ids) for f in facts))


def per_fact_perplexities(facts: Sequence[EncodedFact], log_probs: Sequence[float]) -> list[float]:
    """Per fact: exp of its mean negative log-likelihood per target token."""
    return [math.exp(-lp / len(f.target_ids)) for f, lp in zip(facts, log_probs)]


def perplexity(model: LoadedModel, facts: Sequence[EncodedFact]) -> float:
    """exp of the mean negative log-likelihood per target token over ``facts``."""
    return pooled_perplexity(facts, predictions(model, facts)[1])


def fact_perplexities(model: LoadedModel, facts: Sequence[EncodedFact]) -> list[float]:
    """Per fact: exp of its mean negative log-likelihood per target token."""
    return per_fact_perplexities(facts, predictions(model, facts)[1])


def spread(values: Sequence[float]) -> dict:
    """Median, geometric mean and arithmetic mean: a mean alone hides whether most facts are
    fine and a few collapse."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "geometric": None, "mean": None, "n": 0}
    ordered = sorted(vals)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    logs = [math.log(v) if v > 0 else float("-inf") for v in vals]
    return {"median": median, "geometric": math.exp(sum(logs) / len(logs)), "mean": sum(vals) / len(vals),
            "n": len(vals)}


@accepts_model
def update_measures(model: LoadedModel, old_facts: Sequence[EncodedFact], new_facts: Sequence[EncodedFact],
                    held: Sequence[EncodedFact] = (), controls: Sequence[EncodedFact] = ()) -> dict:
    """What an update ``<h, r, t> -> <h, r, t'>`` is judged by, as the model is now: call it
    before the edit and with the edit applied. One forward per prompt gives, on the edited
    prompts, the top-1 token id and log P(t) (``old_facts``) and log P(t') (``new_facts``, the
    same prompts with t' as target); the top-1 on held-out prompts (``held``); the top-1 and
    log P(target) of control facts (``controls``).

    The one computation behind ``kn edit update``, the update sweep of ``kn bench findings`` and
    the update stage of ``kn bench pararel``; each summarizes it by its own rule."""
    top, old_logp = predictions(model, old_facts)
    control_top, control_logp = predictions(model, controls)
    return {"top": top, "old_logp": old_logp, "new_logp": predictions(model, new_facts)[1],
            "held_top": predictions(model, held)[0], "control_top": control_top, "control_logp": control_logp}


@accepts_model
def erase_effect(model: LoadedModel, edit: WeightEdit, relation: Sequence[EncodedFact],
                 others: Sequence[EncodedFact] = ()) -> dict:
    """Perplexity of the erased relation and of other relations, before and after the erase."""
    def measure():  # one forward per fact gives both the pooled and the per-fact numbers
        out = {}
        for name, facts in (("relation", relation), ("other", others)):
            log_probs = predictions(model, facts)[1]
            per_fact = per_fact_perplexities(facts, log_probs)
            out.update({f"{name}_ppl": pooled_perplexity(facts, log_probs), f"{name}_per_fact": per_fact,
                        f"{name}_spread": spread(per_fact)})
        return out

    before = measure()
    with edit.applied(model):
        after = measure()
    return {"before": before, "after": after, "n_erased": len(edit.slots)}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


@accepts_model
def update_report(model: LoadedModel, edit: WeightEdit, prompts: Sequence[str], old: str, new: str,
                  controls: Sequence = ()) -> dict:
    """What an update ``old -> new`` does (``kn edit update --json``): P(old), P(new) and the top
    prediction on each prompt before and with the edit (:func:`update_measures`), the
    perplexity of each control fact (``controls``: facts, measured on their first prompt) and
    its spread, and ``undo_exact``: whether undoing it restored every weight bit for bit."""
    old_facts = [encode_fact(model, p, old) for p in prompts]
    new_facts = [encode_fact(model, p, new) for p in prompts]
    control = [encode_fact(model, f.prompts[0], f.target) for f in controls]
    snapshot = weight_snapshot(model)
    before = update_measures(model, old_facts, new_facts, controls=control)
    with edit.applied(model):
        after = update_measures(model, old_facts, new_facts, controls=control)
    undo_exact = unchanged_since(snapshot)
    per_prompt = {f"{k}_{when}": [math.exp(x) for x in m[f"{k}_logp"]]
                  for k in ("old", "new") for when, m in (("before", before), ("after", after))}
    per_prompt["top_after"] = [model.tokenizer.decode([t]) for t in after["top"]]
    control_before = per_fact_perplexities(control, before["control_logp"])
    control_after = per_fact_perplexities(control, after["control_logp"])
    return {
        "model": model.name, "prompts": list(prompts), "old": old, "new": new,
        "new_is_top": [t == f.target_ids[0] for t, f in zip(after["top"], new_facts)],
        "control_ppl_before": control_before, "control_ppl_after": control_after,
        "control_spread_before": spread(control_before), "control_spread_after": spread(control_after),
        **{k: _mean(per_prompt[k]) for k in ("old_before", "old_after", "new_before", "new_after")},
        "top_after": per_prompt["top_after"][0], "per_prompt": per_prompt, "undo_exact": undo_exact,
        "slots": edit.slots, **{k: v for k, v in edit.meta.items() if k != "skipped"},
    }


@accepts_model
def edit_probabilities(model: LoadedModel, edit: WeightEdit, prompts: Sequence[str], new: str,
                       old: str | None = None) -> dict:
    """P(new) (and P(old) when given) on each prompt before and with ``edit``, the top
    prediction with it, and ``undo_exact`` (``kn edit rome --json``)."""
    new_facts = [encode_fact(model, p, new) for p in prompts]
    old_facts = [encode_fact(model, p, old) for p in prompts] if old is not None else []
    snapshot = weight_snapshot(model)

    def measure():
        tops, new_logp = predictions(model, new_facts)
        return tops, [math.exp(x) for x in new_logp], [math.exp(x) for x in predictions(model, old_facts)[1]]

    before = measure()
    with edit.applied(model):
        after = measure()
    return {"new_before": before[1], "new_after": after[1], "old_before": before[2], "old_after": after[2],
            "top_after": [model.tokenizer.decode([t]) for t in after[0]], "undo_exact": unchanged_since(snapshot)}
