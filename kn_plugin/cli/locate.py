"""``kn locate``, ``plot``, ``demo``, ``suppress``/``amplify``, ``inspect``, ``families``."""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

from kn_plugin.attribution.methods import resolve_method
from kn_plugin.cli.common import _open_pool, _print_neurons, _relations, _write_json
from kn_plugin.data import DEMO_FACTS, read_facts_jsonl
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.evaluation import intervened_probs, intervention_effect, target_probs
from kn_plugin.family_support import family_table, probe_family, write_readme_table
from kn_plugin.inspection import inspect_neuron, pararel_sentences, parse_neuron, read_corpus
from kn_plugin.locating import (
    LocateResult,
    check_locate_options,
    keyed_facts,
    locate,
    locate_many,
    locate_quietly,
    read_neurons_file,
)
from kn_plugin.models import load_model
from kn_plugin.plotting import plot_activation_histogram, plot_locate
from kn_plugin.scoring import encode_fact
from kn_plugin.tiny import TINY_FAMILIES


def cmd_locate_facts(args) -> int:
    facts = keyed_facts(read_facts_jsonl(args.facts))
    options = check_locate_options(dict(
        steps=args.steps, threshold=args.threshold, share=args.share, adaptive=True if args.adaptive else None,
        method=args.method, engine=args.engine, batch_size=args.batch_size, grid=args.grid, tolerance=args.tolerance,
        matmul_dtype=args.matmul_dtype))
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    pool = _open_pool(args, model)
    with pool if pool is not None else contextlib.nullcontext():
        for key, res in locate_many(model, [f for _, f in facts], out=args.out, pool=pool, progress=not args.quiet,
                                    **options):
            probs = ", ".join(f"{p:.3f}" for p in res.target_prob)
            print(f"{key}: {len(res.neurons)} neurons, P({res.target!r}) = {probs}"
                  + (f"; note: {res.note}" if res.note else ""))
    print(f"wrote {len(facts)} results to {args.out} (<key>.json + .npz; reload with LocateResult.load)")
    return 0


def cmd_locate(args) -> int:
    if args.facts:
        if args.prompt is not None or args.target is not None or args.json or args.plot:
            raise KnowledgeNeuronError("--facts takes the prompts and targets from the file: drop --prompt, "
                                       "--target, --json and --plot (results go to --out)")
        if not args.out:
            raise KnowledgeNeuronError("--facts needs --out DIR for the per-fact results")
        return cmd_locate_facts(args)
    if args.prompt is None or args.target is None:
        raise KnowledgeNeuronError("give --prompt (repeat for paraphrases) and --target, or --facts FILE --out DIR")
    if args.workers is not None or args.ray_address is not None:
        raise KnowledgeNeuronError("--workers and --ray-address run many facts: use them with --facts")
    resolve_method(args.method)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        res = locate(model, args.prompt, args.target, steps=args.steps, threshold=args.threshold,
                     share=args.share, adaptive=True if args.adaptive else None, method=args.method,
                     engine=args.engine, batch_size=args.batch_size, progress=not args.quiet, grid=args.grid,
                     tolerance=args.tolerance, matmul_dtype=args.matmul_dtype)
    for w in caught:  # the note is printed below with the result
        if str(w.message) != res.note:
            print(f"kn: warning: {w.message}", file=sys.stderr)
    for p, a in zip(res.prompts, res.attributions):
        print(f"P({res.target!r} | {p!r}) = {a.target_prob:.4f}")
    if len(res.prompts) == 1:
        kind = "coarse"
    else:
        kind = f"refined ({'adaptive ' if res.adaptive else ''}share > {res.share:g})"
    first = res.attributions[0]
    if res.method == "ig":
        how = f"engine: {first.engine}, grid: {args.grid}, m = {', '.join(str(a.steps) for a in res.attributions)}"
        ran = sorted({a.extras.get("matmul_dtype") for a in res.attributions} - {None, first.extras.get("dtype")})
        how += f", {'/'.join(ran)} matmuls" if ran else ""
    else:
        how = f"method: {res.method}"
    print(f"{len(res.neurons)} {kind} knowledge neurons ({how}):")
    if args.steps == "auto":
        for a in res.attributions:
            tried = ", ".join(f"m={m}: {gap:.2g}" for m, gap in a.extras.get("auto_steps", []))
            per = [m for m in a.extras.get("steps_per_layer", []) if m is not None]
            spread = ", ".join(f"{per.count(m)} at m={m}" for m in sorted(set(per)))
            print(f"steps auto for {a.prompt!r}: worst gap / layer effect {tried} -> m = {a.steps}"
                  + (f" (layers: {spread})" if spread else ""))
    if args.steps == "adaptive":
        for a in res.attributions:
            refined = a.extras.get("intervals", {})
            spent = sum(m for m in a.extras.get("evaluations_per_layer", []) if m)
            what = "; ".join(f"layer {layer}: {len(ivs)} intervals" for layer, ivs in refined.items())
            print(f"steps adaptive for {a.prompt!r}: {spent} points over the layers, "
                  + (f"refined {what}" if refined else "every layer at 5 points"))
    gaps = [a.completeness_gap[list(a.layers)].abs().max().item() for a in res.attributions if a.layers]
    if gaps:
        print(f"largest completeness gap: {max(gaps):.2e} (probability units, over layers and prompts)")
    _print_neurons(res.neurons)
    if res.note:
        print(f"note: {res.note}")
    if args.json:
        res.save(args.json)
        print(f"wrote {args.json} (+ {Path(args.json).name}.npz with the score matrices)")
    if args.plot:
        print(f"wrote {plot_locate(res, args.plot)}")
    return 0


def cmd_plot(args) -> int:
    res = LocateResult.load(args.result)
    out = args.out or str(Path(args.result).with_suffix(".png"))
    print(f"wrote {plot_locate(res, out)}")
    return 0


def cmd_demo(args) -> int:
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    facts = DEMO_FACTS[: args.facts] if args.facts else DEMO_FACTS
    summary = []
    for fact in facts:
        res = locate_quietly(model, list(fact.prompts), fact.target, steps=args.steps, adaptive=True,
                             engine=args.engine, progress=not args.quiet)
        encoded = [encode_fact(model, p, fact.target) for p in fact.prompts]
        before = target_probs(model, encoded)
        after = intervened_probs(model, encoded, res.neurons, factor=0.0)
        name = f"{fact.subject}_{fact.relation}".lower()
        plot = plot_locate(res, out / f"{name}.png")
        entry = {**res.to_dict(), "suppressed_prob": after}
        summary.append(entry)
        print(f"\n<{fact.subject}, {fact.relation}, {fact.target.strip()}>: "
              f"{len(res.neurons)} knowledge neurons (share {res.share}) -> {plot}")
        _print_neurons(res.neurons, limit=10)
        if res.note:
            print(f"  note: {res.note}")
        for p, b, a in zip(fact.prompts, before, after):
            print(f"  P={b:.3f} -> {a:.3f} when suppressed   {p!r}")
    _write_json(out / "demo.json", {"model": model.name, "facts": summary})
    return 0


def cmd_intervene(args) -> int:
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    neurons, _ = read_neurons_file(args.neurons, model)
    factor = 0.0 if args.command == "suppress" else args.factor
    if args.command == "amplify" and factor == 1.0:
        raise KnowledgeNeuronError("--factor 1 changes nothing: amplify needs a factor other than 1")
    facts = [encode_fact(model, p, args.target) for p in args.prompt]
    effect = intervention_effect(model, facts, neurons, factor, seed=args.seed,
                                 all_positions=args.all_positions, random_draws=args.random_draws)
    print(f"{args.command} {len(neurons)} neurons (x{factor}) on {args.target!r}:")
    for p, b, a, r in zip(args.prompt, effect.before, effect.after, effect.random_after):
        print(f"  P={b:.4f} -> {a:.4f}   (random neurons: {r:.4f})   {p!r}")
    print(f"relative change {effect.relative_change:+.2%}  "
          f"(random control {effect.random_relative_change:+.2%})")
    _write_json(args.json, {"model": model.name, "target": args.target, "prompts": args.prompt,
                            **effect.to_dict()})
    return 0


def cmd_inspect(args) -> int:
    layer, index = parse_neuron(args.neuron)
    if args.corpus and args.pararel:
        raise KnowledgeNeuronError("give --corpus or --pararel, not both")
    if args.plot and not (args.corpus or args.pararel):
        raise KnowledgeNeuronError("--plot draws the activations over a corpus: give --corpus or --pararel")
    corpus = read_corpus(args.corpus) if args.corpus else None
    if args.pararel:
        corpus = pararel_sentences(args.pararel, _relations(args), limit=args.max_sentences, seed=args.seed)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    report = inspect_neuron(model, layer, index, corpus=corpus, top=args.top)
    print(f"{model.name} neuron {layer}:{index}")
    print("promotes: " + ", ".join(f"{t!r} ({v:+.2f})" for t, v in report.promoted))
    print("suppresses: " + ", ".join(f"{t!r} ({v:+.2f})" for t, v in report.suppressed))
    if corpus:
        print(f"top-activating of {len(corpus)} sentences ({len(report.activations)} tokens):")
        for act in report.top_sentences:
            print(f"  {act.activation:8.3f}  {act.marked(model.tokenizer)}")
    if args.plot:
        print(f"wrote {plot_activation_histogram(report.activations, args.plot, f'{model.name} neuron {layer}:{index}')}")
    _write_json(args.json, report.to_dict(model.tokenizer))
    return 0


def cmd_families(args) -> int:
    table = family_table([probe_family(f)[0] for f in TINY_FAMILIES])
    print(table)
    if args.write:
        try:
            write_readme_table(args.write, table)
        except (OSError, ValueError) as exc:
            raise KnowledgeNeuronError(f"cannot write the table into {args.write}: {exc}") from exc
        print(f"wrote {args.write}")
    return 0
