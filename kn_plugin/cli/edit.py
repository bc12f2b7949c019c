"""``kn edit``: update, rome, erase, apply."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from kn_plugin.cli.common import _write_json
from kn_plugin.data import read_facts_jsonl
from kn_plugin.editing import WeightEdit, erase_relation, unchanged_since, update_fact, weight_snapshot
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.evaluation import erase_effect, per_fact_perplexities, predictions, spread, update_measures
from kn_plugin.files import temp_path
from kn_plugin.inspection import read_corpus
from kn_plugin.locating import locate_many, read_neurons_file
from kn_plugin.models import load_model
from kn_plugin.rome import DEFAULT_CORPUS, RomeConfig, generated_corpus, key_statistics, rome_edit, trace_layers
from kn_plugin.scoring import encode_fact


def cmd_edit_update(args) -> int:

    controls = read_facts_jsonl(args.control) if args.control else []
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    neurons, _ = read_neurons_file(args.neurons, model)
    edit = update_fact(model, neurons, args.old, args.new, lambda1=args.lambda1,
                       lambda2=args.lambda2, scale=args.scale, prompts=args.prompt)
    old_facts = [encode_fact(model, p, args.old) for p in args.prompt]
    new_facts = [encode_fact(model, p, args.new) for p in args.prompt]
    control = [encode_fact(model, f.prompts[0], f.target) for f in controls]
    snapshot = weight_snapshot(model)
    before = update_measures(model, old_facts, new_facts, controls=control)
    with edit.applied(model):
        after = update_measures(model, old_facts, new_facts, controls=control)
    old_before, new_before = ([math.exp(x) for x in before[k]] for k in ("old_logp", "new_logp"))
    old_after, new_after = ([math.exp(x) for x in after[k]] for k in ("old_logp", "new_logp"))
    control_before = per_fact_perplexities(control, before["control_logp"])
    control_after = per_fact_perplexities(control, after["control_logp"])
    top_ids = after["top"]
    tops = [model.tokenizer.decode([t]) for t in top_ids]
    new_is_top = [t == f.target_ids[0] for t, f in zip(top_ids, new_facts)]
    undo_exact = unchanged_since(snapshot)
    if args.save:
        edit.save(args.save)
        print(f"wrote {args.save}")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"update {args.old!r} -> {args.new!r} on {len(edit.slots)} value slots "
          f"(lambda1={args.lambda1}, lambda2={edit.meta['lambda2']:g}"
          f"{' calibrated' if edit.meta.get('calibrated') else ''}, scale={args.scale}):")
    for p, ob, oa, nb, na, t in zip(args.prompt, old_before, old_after, new_before, new_after, tops):
        print(f"  P(old) {ob:.4f} -> {oa:.4f}   P(new) {nb:.4f} -> {na:.4f}   top: {t!r}   {p!r}")
    if not all(new_is_top):
        print(f"note: after the edit {args.new!r} is not the top prediction on {new_is_top.count(False)} of "
              f"{len(new_is_top)} prompts (raise --lambda2 or locate with more paraphrases)")
    cb, ca = spread(control_before), spread(control_after)
    if control:
        print(f"perplexity of {len(control)} control facts: median {cb['median']:.2f} -> {ca['median']:.2f}, "
              f"geometric mean {cb['geometric']:.2f} -> {ca['geometric']:.2f}, mean {cb['mean']:.2f} -> {ca['mean']:.2f}")
    print(f"undo restored every weight bit for bit: {undo_exact}")
    _write_json(args.json, {
        "model": model.name, "prompts": args.prompt, "old": args.old, "new": args.new,
        "new_is_top": new_is_top, "control_ppl_before": control_before, "control_ppl_after": control_after,
        "control_spread_before": cb, "control_spread_after": ca,
        "old_before": mean(old_before), "old_after": mean(old_after),
        "new_before": mean(new_before), "new_after": mean(new_after), "top_after": tops[0],
        "per_prompt": {"old_before": old_before, "old_after": old_after, "new_before": new_before,
                       "new_after": new_after, "top_after": tops},
        "undo_exact": undo_exact, "slots": edit.slots, **{k: v for k, v in edit.meta.items()
                                                          if k != "skipped"},
    })
    return 0 if undo_exact else 1


def cmd_edit_rome(args) -> int:

    config = RomeConfig(steps=args.steps)
    if args.old is not None and args.old.strip() == args.new.strip():
        raise KnowledgeNeuronError(f"the new object equals the old one ({args.old!r})")
    if not args.subject or args.subject not in args.prompt:
        raise KnowledgeNeuronError(f"the subject {args.subject!r} does not occur in the prompt {args.prompt!r}")
    if args.layer == "trace" and args.old is None:
        raise KnowledgeNeuronError("--layer trace finds the layer from P(--old): give --old")
    texts = read_corpus(args.corpus) if args.corpus else None
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    prompts = [args.prompt, *(args.paraphrase or [])]
    if args.layer == "trace":
        effects = trace_layers(model, args.prompt, args.subject, args.old)
        layer = max(range(len(effects)), key=effects.__getitem__)
        print(f"causal trace: the FFN outputs of layer {layer} restore P({args.old!r}) most "
              f"(indirect effect {effects[layer]:+.4f})")
    else:
        layer = model.adapter.check_layer(int(args.layer))
    if texts is None:
        n, tokens = DEFAULT_CORPUS
        texts, corpus = generated_corpus(model, n, tokens), f"{n} texts of {tokens} tokens written by the model"
    else:
        corpus = f"{len(texts)} lines of {args.corpus}"
    stats = key_statistics(model, layer, texts, corpus=corpus)
    edit = rome_edit(model, args.prompt, args.subject, args.new, layer, stats, config=config, old_target=args.old)
    new_facts = [encode_fact(model, p, args.new) for p in prompts]
    old_facts = [encode_fact(model, p, args.old) for p in prompts] if args.old else []
    snapshot = weight_snapshot(model)

    def measure():
        tops, new_logp = predictions(model, new_facts)
        return tops, [math.exp(x) for x in new_logp], [math.exp(x) for x in predictions(model, old_facts)[1]]

    before = measure()
    with edit.applied(model):
        after = measure()
    undo_exact = unchanged_since(snapshot)
    if args.save:
        edit.save(args.save)
        print(f"wrote {args.save}")
    print(f"rank-one edit of layer {layer} ({model.d_mlp} value slots; key statistics from {stats.n_tokens} tokens "
          f"of {corpus}; v* after {edit.meta['steps_run']} steps):")
    for i, p in enumerate(prompts):
        old = f"P(old) {before[2][i]:.4f} -> {after[2][i]:.4f}   " if args.old else ""
        top = model.tokenizer.decode([after[0][i]])
        print(f"  {old}P(new) {before[1][i]:.4f} -> {after[1][i]:.4f}   top: {top!r}   {p!r}")
    print(f"undo restored every weight bit for bit: {undo_exact}")
    _write_json(args.json, {
        "model": model.name, "layer": layer, "prompts": prompts, "subject": args.subject, "old": args.old,
        "new": args.new, "new_before": before[1], "new_after": after[1], "old_before": before[2],
        "old_after": after[2], "top_after": [model.tokenizer.decode([t]) for t in after[0]],
        "undo_exact": undo_exact, **{k: v for k, v in edit.meta.items() if k not in ("prompt", "subject")},
    })
    return 0 if undo_exact else 1


def cmd_edit_erase(args) -> int:
    facts = read_facts_jsonl(args.facts)
    if args.min_facts > len(facts):  # checked before any fact is located
        raise KnowledgeNeuronError(f"--min-facts {args.min_facts} is more than the {len(facts)} facts in "
                                   f"{args.facts}: no neuron could be shared by that many")
    others = read_facts_jsonl(args.other) if args.other else []
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    sets = [res.neurons for _, res in locate_many(model, facts, progress=not args.quiet, steps=args.steps,
                                                  adaptive=True, engine=args.engine)]
    edit = erase_relation(model, sets, min_facts=args.min_facts, replacement=args.replacement)
    relation = [encode_fact(model, p, f.target) for f in facts for p in f.prompts]
    other = [encode_fact(model, p, f.target) for f in others for p in f.prompts]
    snapshot = weight_snapshot(model)
    effect = erase_effect(model, edit, relation, other)
    undo_exact = unchanged_since(snapshot)
    if args.save:
        edit.save(args.save)
        print(f"wrote {args.save}")
    b, a = effect["before"], effect["after"]
    print(f"erased {len(edit.slots)} neurons shared by >= {args.min_facts} of {len(facts)} facts "
          f"(slots set to {edit.meta['replacement']})")
    for what, label in (("relation", "the relation"), ("other", "other facts")):
        if what == "other" and not other:
            continue
        sb, sa = b[f"{what}_spread"], a[f"{what}_spread"]
        print(f"  perplexity of {label}: {b[f'{what}_ppl']:.2f} -> {a[f'{what}_ppl']:.2f} (per fact: median "
              f"{sb['median']:.2f} -> {sa['median']:.2f}, geometric mean {sb['geometric']:.2f} -> {sa['geometric']:.2f})")
    print(f"undo restored every weight bit for bit: {undo_exact}")
    _write_json(args.json, {"model": model.name, **effect, "slots": edit.slots,
                            **edit.meta, "undo_exact": undo_exact})
    return 0 if undo_exact else 1


def cmd_edit_apply(args) -> int:

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.force:
            raise KnowledgeNeuronError(f"--out {out} exists and is not empty: kn writes an edited model only into a "
                                       "new folder (--force replaces a folder an earlier `kn edit apply` wrote)")
        if not (out / "kn_plugin_edit.json").is_file():
            raise KnowledgeNeuronError(f"--out {out} was not written by `kn edit apply` (no kn_plugin_edit.json): "
                                       "kn does not replace it, even with --force")
    edit = WeightEdit.load(args.edit)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    edit.apply(model)  # checks the fingerprint; stays applied: the folder gets the edited weights
    # written beside the destination, then moved into place: a kill leaves no half-written model
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    try:
        model.hf_model.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        (tmp / "kn_plugin_edit.json").write_text(json.dumps({
            "base_model": model.name, "base_fingerprint": model.fingerprint, "edit": str(args.edit),
            "kind": edit.kind, "slots": edit.slots, **{k: v for k, v in edit.meta.items() if k != "skipped"},
        }, indent=2, default=str))
        old = None
        if out.exists():
            old = temp_path(out, ".old")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"applied a {edit.kind} edit of {len(edit.slots)} value slots to {model.name}; wrote {out} "
          "(load it with load_model or transformers' from_pretrained)")
    return 0
