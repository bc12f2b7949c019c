"""``kn edit``: update, rome, erase, apply."""

from __future__ import annotations

from kn_plugin.cli.common import _write_json
from kn_plugin.data import read_facts_jsonl
from kn_plugin.editing import (
    CONSTRAINED_CORPUS,
    WeightEdit,
    check_model_folder,
    constrained_update,
    erase_relation,
    unchanged_since,
    update_fact,
    weight_snapshot,
    write_edited_model,
)
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.evaluation import edit_probabilities, erase_effect, update_report
from kn_plugin.inspection import read_corpus
from kn_plugin.locating import locate_many, read_neurons_file
from kn_plugin.models import load_model
from kn_plugin.rome import DEFAULT_CORPUS, RomeConfig, generated_corpus, key_statistics, rome_edit, trace_layers
from kn_plugin.scoring import encode_fact


def cmd_edit_update(args) -> int:
    if args.constrained and (args.lambda1 != 1.0 or args.lambda2 != "auto" or args.scale != "none"):
        raise KnowledgeNeuronError("--constrained sets the update itself: drop --lambda1, --lambda2 and --scale")
    if args.corpus and not args.constrained:
        raise KnowledgeNeuronError("--corpus is for --constrained (the key statistics of its neurons)")
    controls = read_facts_jsonl(args.control) if args.control else []
    texts = read_corpus(args.corpus) if args.corpus else None  # a bad file fails before the model loads
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    neurons, _ = read_neurons_file(args.neurons, model)
    if args.constrained:
        if texts is not None:
            corpus = f"{len(texts)} lines of {args.corpus}"
        elif model.is_masked:
            raise KnowledgeNeuronError(f"{model.name} is a masked LM and writes no text for the key statistics: "
                                       "give them with --corpus FILE")
        else:
            n, tokens = CONSTRAINED_CORPUS
            texts, corpus = generated_corpus(model, n, tokens), f"{n} texts of {tokens} tokens written by the model"
        edit, lam, reached = constrained_update(model, neurons, args.old, args.new, args.prompt, texts)
        rule = f"constrained, scale {lam:g}{'' if reached else ' (the ladder top)'}, key statistics over {corpus}"
    else:
        edit = update_fact(model, neurons, args.old, args.new, lambda1=args.lambda1,
                           lambda2=args.lambda2, scale=args.scale, prompts=args.prompt)
        rule = (f"lambda1={args.lambda1}, lambda2={edit.meta['lambda2']:g}"
                f"{' calibrated' if edit.meta.get('calibrated') else ''}, scale={args.scale}")
    report = update_report(model, edit, args.prompt, args.old, args.new, controls)
    if args.save:
        edit.save(args.save)
        print(f"wrote {args.save}")
    print(f"update {args.old!r} -> {args.new!r} on {len(edit.slots)} value slots ({rule}):")
    pp = report["per_prompt"]
    for p, ob, oa, nb, na, t in zip(args.prompt, pp["old_before"], pp["old_after"], pp["new_before"],
                                    pp["new_after"], pp["top_after"]):
        print(f"  P(old) {ob:.4f} -> {oa:.4f}   P(new) {nb:.4f} -> {na:.4f}   top: {t!r}   {p!r}")
    new_is_top = report["new_is_top"]
    if not all(new_is_top):
        print(f"note: after the edit {args.new!r} is not the top prediction on {new_is_top.count(False)} of "
              f"{len(new_is_top)} prompts (raise --lambda2 or locate with more paraphrases)")
    cb, ca = report["control_spread_before"], report["control_spread_after"]
    if controls:
        print(f"perplexity of {len(controls)} control facts: median {cb['median']:.2f} -> {ca['median']:.2f}, "
              f"geometric mean {cb['geometric']:.2f} -> {ca['geometric']:.2f}, mean {cb['mean']:.2f} -> {ca['mean']:.2f}")
    print(f"undo restored every weight bit for bit: {report['undo_exact']}")
    _write_json(args.json, report)
    return 0 if report["undo_exact"] else 1


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
    probs = edit_probabilities(model, edit, prompts, args.new, args.old)
    if args.save:
        edit.save(args.save)
        print(f"wrote {args.save}")
    print(f"rank-one edit of layer {layer} ({model.d_mlp} value slots; key statistics from {stats.n_tokens} tokens "
          f"of {corpus}; v* after {edit.meta['steps_run']} steps):")
    for i, p in enumerate(prompts):
        old = f"P(old) {probs['old_before'][i]:.4f} -> {probs['old_after'][i]:.4f}   " if args.old else ""
        print(f"  {old}P(new) {probs['new_before'][i]:.4f} -> {probs['new_after'][i]:.4f}   "
              f"top: {probs['top_after'][i]!r}   {p!r}")
    print(f"undo restored every weight bit for bit: {probs['undo_exact']}")
    _write_json(args.json, {
        "model": model.name, "layer": layer, "prompts": prompts, "subject": args.subject, "old": args.old,
        "new": args.new, **probs, **{k: v for k, v in edit.meta.items() if k not in ("prompt", "subject")},
    })
    return 0 if probs["undo_exact"] else 1


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
    check_model_folder(args.out, args.force)  # before the model loads
    edit = WeightEdit.load(args.edit)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    out = write_edited_model(model, edit, args.out, force=args.force, source=str(args.edit))
    print(f"applied a {edit.kind} edit of {len(edit.slots)} value slots to {model.name}; wrote {out} "
          "(load it with load_model or transformers' from_pretrained)")
    return 0
