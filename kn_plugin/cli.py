"""The ``kn`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from kn_plugin.errors import KnowledgeNeuronError


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: ``kn: error: ...`` and exit code 2."""

    def error(self, message):
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


def _type(check):
    def convert(text):
        from kn_plugin.validation import finite

        try:
            number = float(text) if check is not int else int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if check is int:
            return number
        try:
            return finite("the value", number)
        except KnowledgeNeuronError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


_finite = _type(float)


def _layer_or_trace(value: str):
    if value == "trace":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a layer number or trace, got {value!r}") from None


def _positive_int(text):
    number = _type(int)(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _steps(text):
    from kn_plugin.validation import MAX_STEPS

    if text == "auto":
        return text
    number = _positive_int(text)
    if number > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_STEPS:,}, got {number:,}")
    return number


def _lambda2(text):
    return "auto" if text == "auto" else _finite(text)


def _nonnegative_int(text):
    number = _type(int)(text)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number


def _format_warning(message, category, filename, lineno, line=None):
    return f"kn: warning: {message}\n"


def _check_outputs(args) -> None:
    """Every output path is checked before a model loads (no minutes of work lost to a typo)."""
    from kn_plugin.validation import output_folder, output_path, plot_suffixes

    for name, what in (("json", "--json"), ("save", "--save")):
        if getattr(args, name, None):
            output_path(getattr(args, name), what)
    if getattr(args, "plot", None):
        output_path(args.plot, "--plot", plot_suffixes())
    if args.command == "plot" and args.out:
        output_path(args.out, "--out", plot_suffixes())
    elif getattr(args, "out", None):
        output_folder(args.out, "--out")
    if getattr(args, "write", None):
        output_path(args.write, "--write")
    if getattr(args, "report", None):
        output_path(args.report, "--report", (".md",))
    _check_no_overwrite(args)


_INPUTS = ("neurons", "edit", "facts", "other", "control", "corpus", "result")
_OUTPUTS = ("json", "save", "plot", "out", "report", "write", "compare")


def _check_no_overwrite(args) -> None:
    """No output may be one of the command's inputs (or the folder its model came from)."""
    def resolved(value):
        return Path(value).expanduser().resolve() if isinstance(value, (str, Path)) and value else None

    inputs = {resolved(getattr(args, n, None)): f"--{n}" for n in _INPUTS if resolved(getattr(args, n, None))}
    model = resolved(getattr(args, "model", None))
    model_dir = model if model is not None and model.is_dir() else None
    for name in _OUTPUTS:
        out = resolved(getattr(args, name, None))
        if out is None:
            continue
        targets = [out] + ([out.with_name(out.name + ".npz")] if name == "json" else [])
        for t in targets:
            if t in inputs:
                raise KnowledgeNeuronError(f"--{name} {getattr(args, name)} is the {inputs[t]} input: "
                                           "kn never writes over its inputs; give another path")
        if model_dir is not None and (out == model_dir or model_dir in out.parents):
            raise KnowledgeNeuronError(f"--{name} {getattr(args, name)} is inside the model folder {model_dir}: "
                                       "kn never writes into the folder a model is loaded from")


def write_atomic_json(path: Path, payload: dict) -> None:
    from kn_plugin.runs import write_atomic

    write_atomic(path, payload)


def _write_json(path: str | Path | None, payload: dict) -> None:
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")


def _print_neurons(neurons, limit: int = 30) -> None:
    print(f"{'layer':>5} {'neuron':>6} {'score':>12}")
    for n in neurons[:limit]:
        print(f"{n.layer:>5} {n.index:>6} {n.score:>12.4g}")
    if len(neurons) > limit:
        print(f"... and {len(neurons) - limit} more")


def _open_pool(args, model):
    """The Ray pool of ``--workers``/``--ray-address`` (None without them)."""
    from kn_plugin.distributed import open_pool

    return open_pool(model, args.workers, args.threads_per_worker, args.ray_address)


def _check_pool_args(args) -> None:
    """``--workers``/``--ray-address``: Ray installed, the cluster reachable, before a model loads."""
    if getattr(args, "workers", None) is None and getattr(args, "ray_address", None) is None:
        return
    from kn_plugin.distributed import PoolConfig, import_ray

    import_ray()
    PoolConfig(workers=args.workers or 1, threads_per_worker=args.threads_per_worker, address=args.ray_address)


def cmd_locate_facts(args) -> int:
    import contextlib

    from kn_plugin.data import read_facts_jsonl
    from kn_plugin.many import check_locate_options, keyed_facts, locate_many
    from kn_plugin.models import load_model

    facts = keyed_facts(read_facts_jsonl(args.facts))
    options = check_locate_options(dict(
        steps=args.steps, threshold=args.threshold, share=args.share, adaptive=True if args.adaptive else None,
        method=args.method, engine=args.engine, batch_size=args.batch_size, grid=args.grid, tolerance=args.tolerance))
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
    from kn_plugin.methods import resolve_method
    from kn_plugin.models import load_model
    from kn_plugin.plotting import plot_locate
    from kn_plugin.refinement import locate

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
                     tolerance=args.tolerance)
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
    from kn_plugin.plotting import plot_locate
    from kn_plugin.refinement import LocateResult

    res = LocateResult.load(args.result)
    out = args.out or str(Path(args.result).with_suffix(".png"))
    print(f"wrote {plot_locate(res, out)}")
    return 0


def cmd_demo(args) -> int:
    from kn_plugin.assess import encode_fact
    from kn_plugin.data import DEMO_FACTS
    from kn_plugin.evaluation import intervened_probs, target_probs
    from kn_plugin.models import load_model
    from kn_plugin.plotting import plot_locate
    from kn_plugin.refinement import locate_quietly

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
    from kn_plugin.assess import encode_fact
    from kn_plugin.evaluation import intervention_effect
    from kn_plugin.models import load_model
    from kn_plugin.refinement import read_neurons_file

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


def cmd_edit_update(args) -> int:
    import math

    from kn_plugin.assess import encode_fact
    from kn_plugin.data import read_facts_jsonl
    from kn_plugin.editing import unchanged_since, update_fact, weight_snapshot
    from kn_plugin.evaluation import fact_perplexities, predictions, spread, target_probs
    from kn_plugin.models import load_model
    from kn_plugin.refinement import read_neurons_file

    controls = read_facts_jsonl(args.control) if args.control else []
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    neurons, _ = read_neurons_file(args.neurons, model)
    edit = update_fact(model, neurons, args.old, args.new, lambda1=args.lambda1,
                       lambda2=args.lambda2, scale=args.scale, prompts=args.prompt)
    old_facts = [encode_fact(model, p, args.old) for p in args.prompt]
    new_facts = [encode_fact(model, p, args.new) for p in args.prompt]
    control = [encode_fact(model, f.prompts[0], f.target) for f in controls]
    snapshot = weight_snapshot(model)
    old_before, new_before = target_probs(model, old_facts), target_probs(model, new_facts)
    control_before = fact_perplexities(model, control)
    with edit.applied(model):
        top_ids, old_logp = predictions(model, old_facts)  # one forward: top prediction and P(old)
        old_after, new_after = [math.exp(x) for x in old_logp], target_probs(model, new_facts)
        tops = [model.tokenizer.decode([t]) for t in top_ids]
        control_after = fact_perplexities(model, control)
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
    import math

    from kn_plugin.assess import encode_fact
    from kn_plugin.editing import unchanged_since, weight_snapshot
    from kn_plugin.evaluation import predictions
    from kn_plugin.inspection import read_corpus
    from kn_plugin.models import load_model
    from kn_plugin.rome import DEFAULT_CORPUS, RomeConfig, generated_corpus, key_statistics, rome_edit, trace_layers

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
    from kn_plugin.assess import encode_fact
    from kn_plugin.data import read_facts_jsonl
    from kn_plugin.editing import erase_relation, unchanged_since, weight_snapshot
    from kn_plugin.evaluation import erase_effect
    from kn_plugin.many import locate_many
    from kn_plugin.models import load_model

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
    import os
    import shutil

    from kn_plugin.editing import WeightEdit
    from kn_plugin.files import temp_path
    from kn_plugin.models import load_model

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


def cmd_bench_speed(args) -> int:
    from kn_plugin.bench.speed import SPEED_PROMPTS, speed_benchmark, speed_report
    from kn_plugin.models import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    prompts = [(p, args.target) for p in args.prompt] if args.prompt else list(SPEED_PROMPTS)
    if args.repeat < 1:
        raise KnowledgeNeuronError(f"--repeat must be >= 1, got {args.repeat}")
    rows = speed_benchmark(model, prompts, steps=args.steps, batch_size=args.batch_size,
                           repeat=args.repeat, converged=args.time_converged)
    report = speed_report(model, rows, args.steps, args.repeat)
    print(f"{model.name} on {report['device']} ({report['torch_threads']} threads), "
          f"m = {args.steps}, all {model.n_layers} layers")
    print(f"{'tokens':>6} {'engine':>8} {'captum s':>9} {'engine s':>9} {'ratio':>6} {'max rel diff':>12} "
          f"{'captum MB':>9} {'engine MB':>9} {'GFLOP':>7} {'GFLOP/s':>8} {'of peak':>7}")
    for r in rows:
        for name, engine, ratio, diff in ((f"fast:{r.fast_engine}", "fast", r.ratio, r.max_rel_diff),
                                          ("cached", "cached", r.cached_ratio, r.cached_max_rel_diff)):
            print(f"{r.tokens:>6} {name:>8} {r.captum_s:>9.2f} {getattr(r, engine + '_s'):>9.2f} {ratio:>6.1f} "
                  f"{diff:>12.2e} {r.captum_peak_mb:>9.0f} {getattr(r, engine + '_peak_mb'):>9.0f} "
                  f"{getattr(r, engine + '_gflop'):>7.1f} {r.rate(engine):>8.1f} {r.of_peak(engine):>7.1%}")
        print(f"{r.tokens:>6} {'captum':>8}: {r.captum_gflop:.1f} GFLOP at {r.rate('captum'):.1f} GFLOP/s "
              f"({r.of_peak('captum'):.1%}); matmul peak here {r.peak_gflops:.0f} GFLOP/s "
              f"([{args.steps} x {r.tokens}, {model.adapter.d_model}] @ [{model.adapter.d_model}, {model.d_mlp}], "
              f"{str(model.dtype).removeprefix('torch.')})")
        if args.time_converged:
            print(f"{r.tokens:>6} converged (gausslegendre, auto per layer): {r.converged_s:.2f} s, "
                  f"{r.converged_layer_steps} layer-steps (m = {args.steps}: {args.steps * model.n_layers}), "
                  f"worst gap {r.converged_worst_gap:.2g}; coarse-set Jaccard with Gauss-Legendre m = 100 "
                  f"({r.reference_s:.1f} s): converged {r.converged_jaccard:.2f}, m = {args.steps} {r.paper_jaccard:.2f}")
    _write_json(args.json, report)
    return 0


def _relations(args) -> list[str] | None:
    if args.relations is None:
        return None
    rels = [r.strip() for r in args.relations.split(",") if r.strip()]
    if not rels:
        raise KnowledgeNeuronError(f"--relations {args.relations!r} names no relation (e.g. --relations P19,P36)")
    if len(set(rels)) != len(rels):
        raise KnowledgeNeuronError(f"--relations names {sorted({r for r in rels if rels.count(r) > 1})} twice")
    return rels


def _pararel_data(args, model, **kwargs) -> dict:
    """PARAREL facts for ``model`` from ``--pararel``/``--relations``/``--facts-per-relation``/``--seed``."""
    from kn_plugin.data import load_pararel

    return load_pararel(args.pararel, relations=_relations(args), masked=model.is_masked,
                        mask_token=model.tokenizer.mask_token if model.is_masked else None,
                        facts_per_relation=getattr(args, "facts_per_relation", None), seed=args.seed,
                        tokenizer=model.tokenizer, **kwargs)


def _command(args) -> str:
    import shlex

    return "kn " + shlex.join(sys.argv[1:] if args.argv is None else args.argv)


def cmd_bench_pararel(args) -> int:
    import contextlib

    from kn_plugin.bench.pararel import ParaRelConfig, pararel_protocol_data, run_pararel
    from kn_plugin.bench.pararel_summary import pct, write_summary
    from kn_plugin.models import load_model

    config = ParaRelConfig(steps=args.steps, grid=args.grid, batch_size=args.batch_size, max_rank=args.max_rank,
                           min_known=args.min_known, locate_prompts=args.locate_prompts,
                           update_facts=args.update_facts, controls=args.controls, erase_top=args.erase_top,
                           random_draws=args.random_draws, seed=args.seed, engine=args.engine)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    data = pararel_protocol_data(model, args.pararel, _relations(args), args.facts_per_relation, config)
    out = Path(args.out)
    pool = _open_pool(args, model)
    with pool if pool is not None else contextlib.nullcontext():
        manifest = run_pararel(model, data, out, config, progress=not args.quiet, pool=pool)
    manifest["command"] = _command(args)
    write_atomic_json(out / "results.json", manifest)
    s = write_summary(out)
    h = s["held_out"]
    print(f"wrote {out / 'report.md'}")
    print(f"{s['counted']}/{s['sampled']} facts count, {s['located']} with knowledge neurons; held-out: suppress "
          f"{pct(h['kn_suppress']['value'])}, amplify {pct(h['kn_amplify']['value'])} (baseline "
          f"{pct(h['base_suppress']['value'])} / {pct(h['base_amplify']['value'])})")
    return 0


def cmd_bench_pararel_report(args) -> int:
    from kn_plugin.bench.compare import write_comparison
    from kn_plugin.bench.pararel_summary import write_summary

    for folder in args.folders:
        write_summary(folder)
        print(f"wrote {Path(folder) / 'report.md'}")
    if args.compare:
        print(f"wrote {write_comparison(args.folders, args.compare, _command(args))}")
    return 0


def cmd_bench_convergence(args) -> int:
    from kn_plugin.bench.convergence import write_convergence

    print(f"wrote {write_convergence(args.folders, args.report, _command(args))}")
    return 0


def cmd_bench_edits(args) -> int:
    from kn_plugin.bench.common import rate
    from kn_plugin.bench.edits import EditsConfig, run_edits
    from kn_plugin.bench.edits_summary import write_edits_summary
    from kn_plugin.bench.pararel_summary import load_run
    from kn_plugin.models import load_model

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    config = EditsConfig(methods=methods, edits_per_relation=args.edits_per_relation, neighbours=args.neighbours,
                         generation_tokens=args.generation_tokens, rome_layer=args.rome_layer,
                         trace_cases=args.trace_cases, corpus_texts=args.corpus_texts,
                         corpus_tokens=args.corpus_tokens, rome_steps=args.rome_steps,
                         constrained_texts=args.constrained_texts, seed=args.seed)
    run = load_run(args.source)
    out = Path(args.out)
    if out.resolve() == Path(args.source).resolve():
        raise KnowledgeNeuronError("--out is the --from folder: write the edits beside it, not into it")
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    manifest = run_edits(model, run, args.source, out, config, progress=not args.quiet)
    manifest["command"] = _command(args)
    write_atomic_json(out / "results.json", manifest)
    s = write_edits_summary(out)
    print(f"wrote {out / 'report.md'}: {s['edits']} edits in {s['relations']} relations")
    for m, v in s["methods"].items():
        print(f"  {m:>14}: " + ", ".join(f"{k} {rate(v[k]['value'])}" for k in ("ES", "PS", "NS", "S")))
    return 0


def cmd_bench_edits_report(args) -> int:
    from kn_plugin.bench.edits_summary import write_edits_summary

    for folder in args.folders:
        write_edits_summary(folder)
        print(f"wrote {Path(folder) / 'report.md'}")
    return 0


def cmd_bench_grids(args) -> int:
    from dataclasses import asdict

    from kn_plugin.bench.grids import GridsConfig, run_grids, summarize_grids, write_grids_report
    from kn_plugin.models import load_model

    config = GridsConfig(grids=tuple(args.grids.split(",")), steps=tuple(_int_list(args.grid_steps, "--grid-steps")),
                         reference_steps=args.reference_steps, prompts_per_fact=args.prompts_per_fact,
                         max_rank=args.max_rank, min_known=args.min_known, batch_size=args.batch_size)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    data = _pararel_data(args, model)
    out = Path(args.out)
    records = run_grids(model, data, out, config, progress=not args.quiet)
    table = summarize_grids(records, config)
    command = _command(args)
    _write_json(out / "results.json", {"model": model.name, "command": command, "config": asdict(config),
                                       "summary": table, "records": records})
    print(f"{'rule':>18} {'m':>4} {'s/prompt':>9} {'median err':>10} {'worst err':>10} {'refined J':>9}")
    for r in table:
        print(f"{r['grid']:>18} {r['steps']:>4} {r['seconds_per_prompt']:>9.2f} {r['median_abs_gap']:>10.1e} "
              f"{r['worst_abs_gap']:>10.1e} {r['refined_jaccard']:>9.2f}")
    print(f"wrote {write_grids_report(records, table, out, model.name, command, config)}")
    return 0


def cmd_bench_throughput(args) -> int:

    from kn_plugin.bench.throughput import (
        ThroughputConfig,
        pararel_size,
        run_throughput,
        sample_facts,
        summary_payload,
        write_throughput_report,
    )
    from kn_plugin.distributed import import_ray
    from kn_plugin.models import load_model

    config = ThroughputConfig(facts=args.facts, workers=tuple(_int_list(args.worker_counts, "--workers")),
                              threads_per_worker=args.threads_per_worker, steps=args.steps,
                              batch_size=args.batch_size, engine=args.engine, seed=args.seed)
    import_ray()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    data = _pararel_data(args, model)
    facts = sample_facts(data, config.facts, config.seed)
    size = pararel_size(args.pararel, model.is_masked)
    run = run_throughput(model, facts, config, progress=not args.quiet)
    command = _command(args)
    payload = summary_payload(model, run, size, config, command)
    for r in run["rows"]:
        print(f"{r['mode']:>6} x{r['workers']} ({r['threads_per_worker']} threads): {r['seconds']:.1f} s, "
              f"{r['facts_per_hour']:.0f} facts/hour, startup {r['startup_s']:.1f} s, "
              f"same neurons {r['same_neurons']}/{run['n_facts']}")
    for w, v in payload["projection"]["workers"].items():
        print(f"projected full PARAREL ({size['prompts']} prompts) on {w} worker(s): {v['hours']:.1f} h")
    _write_json(args.json, payload)
    if args.report:
        write_throughput_report(payload, args.report, command)
        print(f"wrote {args.report}")
    return 0


def cmd_bench_methods(args) -> int:
    from dataclasses import asdict

    from kn_plugin.bench.methods import MethodsConfig, run_methods, summarize_methods, write_methods_report
    from kn_plugin.models import load_model

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    config = MethodsConfig(methods=methods, steps=args.steps, batch_size=args.batch_size,
                           prompts_per_fact=args.prompts_per_fact, max_rank=args.max_rank, min_known=args.min_known,
                           random_draws=args.random_draws, seed=args.seed, engine=args.engine)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    data = _pararel_data(args, model)
    out = Path(args.out)
    run = run_methods(model, data, out, config, progress=not args.quiet)
    summary = summarize_methods(run)
    command = _command(args)
    _write_json(out / "results.json", {"model": model.name, "command": command, "config": asdict(config),
                                       "summary": summary, **run})
    print(f"wrote {write_methods_report(summary, out, model.name, command, config)}")
    for name, r in summary["methods"].items():
        print(f"{name:>12}: {r['seconds_per_prompt']:.3f} s/prompt, {r['neurons_per_fact']:.1f} neurons/fact, "
              f"suppress {r['suppress']}, jaccard with ig {r['jaccard_with_ig']}")
    return 0


def cmd_inspect(args) -> int:
    from kn_plugin.inspection import inspect_neuron, pararel_sentences, parse_neuron, read_corpus
    from kn_plugin.models import load_model
    from kn_plugin.plotting import plot_activation_histogram

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


def cmd_bench_findings(args) -> int:
    from dataclasses import asdict

    from kn_plugin.bench.findings import (
        FindingsConfig,
        inspect_examples,
        run_findings,
        run_updates,
        shared_neurons,
        summarize_activation,
        write_findings_report,
    )
    from kn_plugin.bench.update_sweep import choose_default, summarize_updates
    from kn_plugin.data import load_pararel
    from kn_plugin.inspection import pararel_sentences
    from kn_plugin.models import load_model

    config = FindingsConfig(steps=args.steps, batch_size=args.batch_size, max_rank=args.max_rank,
                            min_known=args.min_known, locate_prompts=args.locate_prompts,
                            other_prompts=args.other_prompts, seed=args.seed, engine=args.engine,
                            update_facts=args.update_facts)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    data = _pararel_data(args, model)
    every = load_pararel(args.pararel, masked=model.is_masked,
                         mask_token=model.tokenizer.mask_token if model.is_masked else None)
    out = Path(args.out)
    run = run_findings(model, data, every, out, config, progress=not args.quiet)
    updates = run_updates(model, run["records"], out, config, progress=not args.quiet)
    usable = [r for r in run["records"] if r.get("usable") and r.get("neurons")]
    sentences = pararel_sentences(args.pararel, sorted(data), limit=args.inspect_sentences, seed=args.seed)
    inspect_path = out / "inspect.json"
    examples = json.loads(inspect_path.read_text()) if inspect_path.exists() else None
    if examples is None:
        examples = inspect_examples(model, usable, sentences, k=args.inspect)
        _write_json(inspect_path, {"examples": examples})
    else:
        examples = examples["examples"]
    update_summary = summarize_updates(updates)
    payload = {"model": model.name, "command": _command(args), "config": asdict(config),
               "sampled": len(run["records"]), "usable": len(usable),
               "activation_summary": summarize_activation(run["activation"], config.bootstrap, config.seed),
               "activation_raw": summarize_activation(run["activation"], config.bootstrap, config.seed, "_raw"),
               "shared": shared_neurons(usable), "update_summary": update_summary,
               "update_default": choose_default(update_summary), "inspect": examples}
    _write_json(out / "results.json", {**payload, "records": run["records"], "activation": run["activation"],
                                       "updates": updates})
    print(f"wrote {write_findings_report(payload, out, model.name, payload['command'])}")
    o = payload["activation_summary"]["overall"]
    print(f"T1 {o['T1']['mean']:.3f}  T2 {o['T2']['mean']:.3f}  T3 {o['T3']['mean']:.3f}; "
          f"recommended update: {payload['update_default'][0]}")
    return 0


def cmd_bench_compare(args) -> int:
    from kn_plugin.bench.compare import compare, write_comparison

    if len(args.results) < 2:
        raise KnowledgeNeuronError("give at least two results.json files")
    kind, models, rows = compare(args.results)
    for finding, cells, verdict in rows:
        print(f"{finding}: {' | '.join(cells)}" + (f"  [holds on all: {verdict}]" if verdict else ""))
    if args.report:
        print(f"wrote {write_comparison(args.results, args.report, _command(args))}")
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise KnowledgeNeuronError(f"{what} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise KnowledgeNeuronError(f"{what} is empty")
    return values


def cmd_families(args) -> int:
    from kn_plugin.support import family_table, probe_family, write_readme_table
    from kn_plugin.tiny import TINY_FAMILIES

    table = family_table([probe_family(f)[0] for f in TINY_FAMILIES])
    print(table)
    if args.write:
        try:
            write_readme_table(args.write, table)
        except (OSError, ValueError) as exc:
            raise KnowledgeNeuronError(f"cannot write the table into {args.write}: {exc}") from exc
        print(f"wrote {args.write}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kn_plugin import __version__
    from kn_plugin.attribution import AUTO_TOLERANCE, DEFAULT_ENGINE, ENGINES, GRIDS
    from kn_plugin.refinement import DEFAULT_SHARE, DEFAULT_THRESHOLD

    parser = _Parser(prog="kn", description="Knowledge neurons: locate, test, edit.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"kn_plugin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_options(p, model_default=None):
        p.add_argument("--model", default=model_default, required=model_default is None,
                       help="smollm2, gemma3-270m, tiny-llama, tiny-gpt2, tiny-bert or a local HF model folder")
        p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="weights and activations (default: float32)")

    def workers(p):
        p.add_argument("--workers", type=_positive_int, default=None,
                       help="run facts on N Ray workers, each loading the model once (needs the ray extra)")
        p.add_argument("--threads-per-worker", type=_positive_int, default=1,
                       help="CPU threads of each Ray worker (its num_cpus)")
        p.add_argument("--ray-address", default=None,
                       help="join a running Ray cluster at HOST:PORT instead of starting a local one")

    def pararel_sample(p, facts_per_relation: int, what: str = "sampling seed"):
        p.add_argument("--pararel", help="PARAREL folder (patterns/, facts/); default $KN_PARAREL")
        p.add_argument("--relations", help="comma-separated, e.g. P36,P103 (default: all usable)")
        p.add_argument("--facts-per-relation", type=_positive_int, default=facts_per_relation,
                       help="facts sampled per relation")
        p.add_argument("--max-rank", type=_positive_int, default=10, help="a prompt knows the fact if rank < this")
        p.add_argument("--min-known", type=_finite, default=0.5, help="share of prompts that must know it")
        p.add_argument("--batch-size", type=_positive_int, default=10, help="alpha steps per pass")
        p.add_argument("--seed", type=int, default=0, help=what)

    def converged_option(p):
        p.add_argument("--converged", action="store_true",
                       help="converged attributions: --grid gausslegendre --steps auto (each layer its own m)")

    def common(p, model_default=None, auto_steps=False):
        model_options(p, model_default)
        if auto_steps:
            p.add_argument("--steps", type=_steps, default=20,
                           help="integration steps m (paper: 20), or auto: per layer, the smallest m of 5, 10, 20, "
                                "50, 100, 200, 500 whose completeness gap meets --tolerance")
        else:
            p.add_argument("--steps", type=_positive_int, default=20, help="IG Riemann steps m (paper: 20)")
        p.add_argument("--engine", default=DEFAULT_ENGINE, choices=sorted(ENGINES),
                       help="attribution engine (default fast: the fastest path that verifies)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("locate", help="find the knowledge neurons of a fact")
    common(p, auto_steps=True)
    p.add_argument("--grid", default="riemann_right", choices=list(GRIDS),
                   help="integration rule (Captum's names; default: the paper's right Riemann sum)")
    converged_option(p)
    p.add_argument("--tolerance", type=_finite, default=AUTO_TOLERANCE,
                   help="with --steps auto: largest completeness gap relative to each layer's effect")
    p.add_argument("--prompt", action="append",
                   help="cloze prompt; repeat for paraphrases (masked models: include [MASK])")
    p.add_argument("--target", help="the answer, e.g. ' Paris' (mind the space)")
    p.add_argument("--facts", help="JSONL of facts ({'prompts': [...], 'target': ..., 'key': ...} a line), "
                                   "instead of --prompt/--target; one result per fact in --out (resumable)")
    p.add_argument("--out", help="with --facts: folder of the per-fact results (<key>.json + .npz)")
    workers(p)
    p.add_argument("--threshold", type=_finite, default=DEFAULT_THRESHOLD, help="coarse t in (0, 1] (paper: 0.2)")
    p.add_argument("--share", type=_finite, default=None,
                   help=f"fix the refinement share p in (0, 1] (default: the paper's adaptive tuning from "
                        f"{DEFAULT_SHARE} towards 2-5 neurons)")
    p.add_argument("--adaptive", action="store_true", help="with --share: start the adaptive tuning from it")
    p.add_argument("--method", default="ig",
                   help="ig (paper), activation (its baseline), grad_x_act, atp, conductance, or captum:<LayerClass> "
                        "(any Captum layer attribution class, e.g. captum:LayerGradientXActivation)")
    p.add_argument("--batch-size", type=_positive_int, default=10, help="alpha steps per pass")
    p.add_argument("--json", help="write the result as JSON (+ .npz with the score matrices; reload with "
                                  "LocateResult.load or `kn plot`)")
    p.add_argument("--plot", help="write a heatmap (.png, .pdf, .svg, ...)")
    p.set_defaults(func=cmd_locate)

    p = sub.add_parser("demo", help="locate and suppress knowledge neurons of built-in facts")
    common(p, model_default="smollm2")
    p.add_argument("--out", default="kn_demo", help="output folder (JSON and PNG)")
    p.add_argument("--facts", type=_nonnegative_int, default=0, help="only the first N built-in facts (0: all)")
    p.set_defaults(func=cmd_demo)

    for name, what in (("suppress", "zero"), ("amplify", "scale")):
        p = sub.add_parser(name, help=f"{what} knowledge neurons and measure P(target)")
        model_options(p)
        p.add_argument("--neurons", required=True, help="JSON written by `kn locate --json`")
        p.add_argument("--prompt", action="append", required=True, help="prompt to measure; repeat for more")
        p.add_argument("--target", required=True, help="the answer whose probability is measured")
        if name == "amplify":
            p.add_argument("--factor", type=_finite, default=2.0, help="amplify factor (paper: 2)")
        p.add_argument("--all-positions", action="store_true",
                       help="act at every position, not only the prediction position")
        p.add_argument("--seed", type=int, default=0, help="seed of the random-neuron control")
        p.add_argument("--random-draws", type=_positive_int, default=5,
                       help="random neuron sets averaged in the control (same count per layer)")
        p.add_argument("--json", help="write the probabilities and relative changes as JSON")
        p.set_defaults(func=cmd_intervene)

    edit = sub.add_parser("edit", help="edit value slots").add_subparsers(dest="edit", required=True,
                                                                          parser_class=_Parser)
    p = edit.add_parser("update", help="<h, r, t> -> <h, r, t'>")
    model_options(p)
    p.add_argument("--neurons", required=True, help="JSON written by `kn locate --json`")
    p.add_argument("--prompt", action="append", required=True,
                   help="a prompt of the fact; the edit is oriented by the neurons' activation signs on them")
    p.add_argument("--old", required=True, help="the current answer t, e.g. ' Paris'")
    p.add_argument("--new", required=True, help="the new answer t', e.g. ' Rome'")
    p.add_argument("--lambda1", type=_finite, default=1.0, help="weight of -e(t) (paper: 1)")
    p.add_argument("--lambda2", type=_lambda2, default="auto",
                   help="weight of +e(t') (the paper: 8), or auto (default): the smallest of 0.5, 1, 2, 4, 8, 16 that "
                        "makes the new target the top prediction on every --prompt (see docs/findings-*)")
    p.add_argument("--control", help="JSONL facts whose perplexity is measured before/after (specificity)")
    p.add_argument("--scale", default="none", choices=["none", "norm"],
                   help="none: the paper's rule; norm: embeddings rescaled to each slot's norm")
    p.add_argument("--save", help="write the edit (slots, old and new values) to this file")
    p.add_argument("--json", help="write the probabilities before/after as JSON")
    p.set_defaults(func=cmd_edit_update)

    p = edit.add_parser("rome", help="rank-one edit (ROME) of one layer's FFN output weight: prompt -> new object")
    model_options(p)
    p.add_argument("--prompt", required=True, help="the rewrite prompt, naming the subject, e.g. 'The capital of France is'")
    p.add_argument("--subject", required=True, help="the subject as written in --prompt, e.g. 'France'")
    p.add_argument("--new", required=True, help="the new object t', e.g. ' Rome'")
    p.add_argument("--old", help="the current object t (printed beside; needed by --layer trace)")
    p.add_argument("--paraphrase", action="append", help="another prompt of the fact, measured before/after")
    p.add_argument("--layer", type=_layer_or_trace, required=True,
                   help="the edited layer, or trace: the layer whose FFN output a causal trace finds most decisive")
    p.add_argument("--corpus", help="text file, one text a line, for the key statistics (default: text the model "
                                    "writes, 200 x 64 tokens)")
    p.add_argument("--steps", type=_positive_int, default=20, help="Adam steps of the v* optimisation (ROME: 20)")
    p.add_argument("--save", help="write the edit to this file (apply it later with `kn edit apply`)")
    p.add_argument("--json", help="write the probabilities before/after as JSON")
    p.set_defaults(func=cmd_edit_rome)

    p = edit.add_parser("erase", help="erase a relation given as a JSONL file of facts")
    common(p)
    p.add_argument("--facts", required=True, help="JSONL: {'prompts': [...], 'target': ...}")
    p.add_argument("--other", help="JSONL of facts of other relations (perplexity control)")
    p.add_argument("--min-facts", type=_positive_int, default=5, help="erase neurons shared by >= m facts")
    p.add_argument("--replacement", default="auto", choices=["auto", "unk", "zero", "mean"],
                   help="what erased value slots become (auto: the unknown token's embedding if any)")
    p.add_argument("--save", help="write the edit to this file (apply it later with `kn edit apply`)")
    p.add_argument("--json", help="write the perplexities before/after as JSON")
    p.set_defaults(func=cmd_edit_erase)

    p = edit.add_parser("apply", help="apply a saved edit and write the edited model as a Hugging Face folder")
    model_options(p)
    p.add_argument("--edit", required=True, help="edit file written by `kn edit update/erase --save`")
    p.add_argument("--out", required=True, help="new folder for the edited model (config, weights, tokenizer)")
    p.add_argument("--force", action="store_true", help="replace --out if an earlier `kn edit apply` wrote it")
    p.set_defaults(func=cmd_edit_apply)

    p = sub.add_parser("inspect", help="one neuron: tokens its value slot promotes/suppresses, sentences that activate it")
    model_options(p)
    p.add_argument("--neuron", required=True, help="LAYER:INDEX, e.g. 24:1130")
    p.add_argument("--corpus", help="text file, one sentence a line: find the top-activating sentences")
    p.add_argument("--pararel", help="use complete PARAREL sentences as the corpus (folder with patterns/, facts/)")
    p.add_argument("--relations", help="with --pararel: comma-separated relations (default: all)")
    p.add_argument("--max-sentences", type=_positive_int, default=2000,
                   help="with --pararel: sentences drawn at random (seeded) from all of them")
    p.add_argument("--seed", type=int, default=0, help="with --pararel: sampling seed")
    p.add_argument("--top", type=_positive_int, default=10, help="tokens and sentences listed")
    p.add_argument("--json", help="write the report as JSON")
    p.add_argument("--plot", help="write a histogram of the activations over the corpus")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plot", help="redraw the heatmap of a saved `kn locate --json` result")
    p.add_argument("result", help="JSON written by `kn locate --json` (its .npz beside it)")
    p.add_argument("--out", help="image to write (default: RESULT with .png)")
    p.set_defaults(func=cmd_plot)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True,
                                                                      parser_class=_Parser)
    p = bench.add_parser("speed", help="Captum LayerIntegratedGradients vs the fast engines")
    model_options(p, model_default="smollm2")
    p.add_argument("--steps", type=_positive_int, default=20, help="IG Riemann steps m (paper: 20)")
    p.add_argument("--batch-size", type=_positive_int, default=10, help="alpha steps per pass")
    p.add_argument("--prompt", action="append", help="prompts to time (default: ~6 and ~20 tokens)")
    p.add_argument("--target", default=" Paris", help="the target of the timed prompts")
    p.add_argument("--repeat", type=_positive_int, default=1, help="runs per path; the median time is kept")
    p.add_argument("--converged", action="store_true", dest="time_converged",
                   help="also time the converged preset and compare its coarse sets with Gauss-Legendre m = 100")
    p.add_argument("--json", help="write the numbers as JSON")
    p.set_defaults(func=cmd_bench_speed)

    p = bench.add_parser("pararel", help="the paper's protocol on PARAREL: held out, with intervals (resumable)")
    common(p, model_default="smollm2", auto_steps=True)
    pararel_sample(p, 20, "sampling, locate-prompt and random-control seed")
    p.add_argument("--grid", default="riemann_right", choices=list(GRIDS),
                   help="integration rule (default: the paper's right Riemann sum)")
    converged_option(p)
    p.add_argument("--out", default="pararel_out", help="output folder (records, report; resumable)")
    p.add_argument("--locate-prompts", type=_positive_int, default=3,
                   help="prompts per fact that locate its neurons; the others are held out (default 3)")
    p.add_argument("--update-facts", type=_nonnegative_int, default=10, help="update experiment: edits per relation")
    p.add_argument("--controls", type=_positive_int, default=5,
                   help="update: control facts of the same and of other relations per edit")
    p.add_argument("--erase-top", type=_positive_int, default=20, help="erase: the relation's N commonest neurons")
    p.add_argument("--random-draws", type=_positive_int, default=3, help="random neuron sets in the controls")
    workers(p)
    p.set_defaults(func=cmd_bench_pararel)

    p = bench.add_parser("pararel-report", help="rewrite `kn bench pararel` reports from their records (no model)")
    p.add_argument("folders", nargs="+", help="output folders of `kn bench pararel`")
    p.add_argument("--compare", help="also write the runs side by side against the paper to this markdown file")
    p.set_defaults(func=cmd_bench_pararel_report)

    p = bench.add_parser("convergence", help="two `kn bench pararel` runs of the same facts (m = 20, converged) "
                                            "side by side, with paired tests fact by fact (no model)")
    p.add_argument("folders", nargs=2, help="the m = 20 run's folder, then the converged run's")
    p.add_argument("--report", required=True, help="markdown file to write (and its .json beside it)")
    p.set_defaults(func=cmd_bench_convergence)

    p = bench.add_parser("edits", help="knowledge-neuron updates and the rank-one editor on the same "
                                      "counterfactual edits, with CounterFact's metrics (resumable)")
    model_options(p, "smollm2")
    p.add_argument("--from", dest="source", required=True,
                   help="output folder of `kn bench pararel` on the same model: its facts and knowledge neurons")
    p.add_argument("--methods", default="kn-paper,kn-authors,kn-calibrated,kn-constrained,rome",
                   help="comma-separated: kn-paper, kn-authors, kn-calibrated, kn-constrained, rome")
    p.add_argument("--edits-per-relation", type=_positive_int, default=10, help="edits drawn per relation")
    p.add_argument("--neighbours", type=_positive_int, default=5,
                   help="neighbourhood facts of the same relation (and as many of other relations) per edit")
    p.add_argument("--generation-tokens", type=_positive_int, default=100, help="tokens sampled for fluency")
    p.add_argument("--rome-layer", type=int, default=None, help="layer ROME edits (default: the causal trace's peak)")
    p.add_argument("--trace-cases", type=_positive_int, default=5, help="edits the causal trace averages over")
    p.add_argument("--corpus-texts", type=_positive_int, default=200, help="ROME key statistics: texts written")
    p.add_argument("--corpus-tokens", type=_positive_int, default=64, help="ROME key statistics: tokens per text")
    p.add_argument("--rome-steps", type=_positive_int, default=20, help="ROME: most Adam steps for v*")
    p.add_argument("--constrained-texts", type=_positive_int, default=25,
                   help="kn-constrained: corpus texts its neurons' key statistics are taken over")
    p.add_argument("--seed", type=int, default=0, help="draw of edits, new objects and neighbours; sampling")
    p.add_argument("--out", default="edits_out", help="output folder (records, report; resumable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench_edits)

    p = bench.add_parser("edits-report", help="rewrite `kn bench edits` reports from their records (no model)")
    p.add_argument("folders", nargs="+", help="output folders of `kn bench edits`")
    p.set_defaults(func=cmd_bench_edits_report)

    p = bench.add_parser("methods", help="attribution methods on the same PARAREL facts: cost, effect, agreement")
    common(p, model_default="smollm2")
    pararel_sample(p, 4, "sampling and random-control seed")
    p.add_argument("--methods", default="ig,grad_x_act,atp,activation,conductance",
                   help="comma-separated: ig, activation, grad_x_act, atp, conductance, captum:<LayerClass>")
    p.add_argument("--prompts-per-fact", type=_positive_int, default=3, help="prompts per counted fact (known first)")
    p.add_argument("--random-draws", type=_positive_int, default=5, help="random neuron sets in the controls")
    p.add_argument("--out", default="methods_out", help="output folder (results, report, plot; resumable)")
    p.set_defaults(func=cmd_bench_methods)

    p = bench.add_parser("findings", help="activation by knowledge-expressing prompts (T1/T2/T3), the update sweep, "
                                          "neuron inspections (resumable)")
    common(p, model_default="smollm2")
    pararel_sample(p, 5)
    p.add_argument("--locate-prompts", type=_positive_int, default=3,
                   help="paraphrases used to locate (known first); the rest are held out")
    p.add_argument("--other-prompts", type=_positive_int, default=3, help="T2 and T3 prompts per fact")
    p.add_argument("--update-facts", type=_nonnegative_int, default=3, help="update sweep: facts per relation")
    p.add_argument("--inspect", type=_nonnegative_int, default=3, help="neurons inspected for the report")
    p.add_argument("--inspect-sentences", type=_positive_int, default=600,
                   help="PARAREL sentences scanned per inspected neuron")
    p.add_argument("--out", default="findings_out", help="output folder (results, report, plot; resumable)")
    p.set_defaults(func=cmd_bench_findings)

    p = bench.add_parser("compare", help="headline findings of several models side by side (from results.json)")
    p.add_argument("results", nargs="+", help="results.json of `kn bench pararel` runs, or of `kn bench findings` runs")
    p.add_argument("--report", help="write the comparison as markdown (.md)")
    p.set_defaults(func=cmd_bench_compare)

    p = bench.add_parser("throughput", help="facts/hour serially and on Ray workers; projection for all of PARAREL")
    model_options(p, model_default="smollm2")
    p.add_argument("--pararel", help="PARAREL folder (patterns/, facts/); default $KN_PARAREL")
    p.add_argument("--relations", help="comma-separated relations to draw facts from (default: all usable)")
    p.add_argument("--facts", type=_positive_int, default=6, help="facts timed (round-robin over relations)")
    p.add_argument("--workers", dest="worker_counts", default="1,2",
                   help="comma-separated Ray worker counts to time after the serial run")
    p.add_argument("--threads-per-worker", type=_positive_int, default=None,
                   help="CPU threads per Ray worker (default: this machine's cores / workers)")
    p.add_argument("--steps", type=_positive_int, default=20, help="IG Riemann steps m (paper: 20)")
    p.add_argument("--batch-size", type=_positive_int, default=10, help="alpha steps per pass")
    p.add_argument("--engine", default=DEFAULT_ENGINE, choices=sorted(ENGINES), help="attribution engine")
    p.add_argument("--seed", type=int, default=0, help="fact sampling seed")
    p.add_argument("--json", help="write the numbers as JSON")
    p.add_argument("--report", help="write the markdown report (e.g. docs/scale.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench_throughput)

    p = bench.add_parser("grids", help="integration rules and steps: error, cost and neuron agreement (resumable)")
    model_options(p, model_default="smollm2")
    pararel_sample(p, 3)
    p.add_argument("--grids", default=",".join(GRIDS), help="comma-separated integration rules (default: all)")
    p.add_argument("--grid-steps", default="5,10,20,50", help="comma-separated m values")
    p.add_argument("--reference-steps", type=_positive_int, default=100,
                   help="m of the converged Gauss-Legendre reference")
    p.add_argument("--prompts-per-fact", type=_positive_int, default=3, help="known prompts used per fact")
    p.add_argument("--out", default="grids_out", help="output folder (results, report, plot; resumable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench_grids)

    p = sub.add_parser("families", help="the supported families, measured on tiny random models")
    p.add_argument("--write", help="rewrite the family table of this README")
    p.set_defaults(func=cmd_families)
    return parser


def _apply_converged(args) -> None:
    """``--converged``: the settings of :data:`kn_plugin.attribution.CONVERGED`, alone."""
    if not getattr(args, "converged", False):
        return
    if args.steps != 20 or args.grid != "riemann_right":
        raise KnowledgeNeuronError("--converged sets --steps auto --grid gausslegendre: give it without them")
    from kn_plugin.attribution import CONVERGED

    args.steps, args.grid = CONVERGED["steps"], CONVERGED["grid"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"kn: error: {exc}", file=sys.stderr)
        return 2
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    previous = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        _apply_converged(args)
        _check_outputs(args)
        _check_pool_args(args)
        return args.func(args)
    except KnowledgeNeuronError as exc:
        print(f"kn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kn: interrupted (results written so far are kept; rerun the same command to resume)", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous


if __name__ == "__main__":
    sys.exit(main())
