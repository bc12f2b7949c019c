"""``kn bench``: the benchmarks and their reports."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path

from kn_plugin.attribution import CONVERGED
from kn_plugin.bench.common import rate
from kn_plugin.bench.compare import compare, write_comparison
from kn_plugin.bench.convergence import write_convergence
from kn_plugin.bench.edits import EditsConfig, run_edits
from kn_plugin.bench.edits_summary import write_edits_summary
from kn_plugin.bench.findings import (
    FindingsConfig,
    inspect_examples,
    run_findings,
    run_updates,
    shared_neurons,
    summarize_activation,
    write_findings_report,
)
from kn_plugin.bench.grids import GridsConfig, run_grids, summarize_grids, write_grids_report
from kn_plugin.bench.methods import MethodsConfig, run_methods, summarize_methods, write_methods_report
from kn_plugin.bench.pararel import run_pararel
from kn_plugin.bench.pararel_data import ParaRelConfig, pararel_protocol_data
from kn_plugin.bench.pararel_summary import load_run, pct, write_summary
from kn_plugin.bench.speed import SPEED_PROMPTS, speed_benchmark, speed_report
from kn_plugin.bench.throughput import (
    ThroughputConfig,
    pararel_size,
    run_throughput,
    sample_facts,
    summary_payload,
    write_throughput_report,
)
from kn_plugin.bench.update_sweep import choose_default, summarize_updates
from kn_plugin.cli.common import _command, _int_list, _open_pool, _pararel_data, _relations, _write_json, write_atomic_json
from kn_plugin.data import load_pararel
from kn_plugin.distributed import import_ray
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.inspection import pararel_sentences
from kn_plugin.models import load_model


def cmd_bench_speed(args) -> int:
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    prompts = [(p, args.target) for p in args.prompt] if args.prompt else list(SPEED_PROMPTS)
    if args.repeat < 1:
        raise KnowledgeNeuronError(f"--repeat must be >= 1, got {args.repeat}")
    rows = speed_benchmark(model, prompts, steps=args.steps, batch_size=args.batch_size,
                           repeat=args.repeat, converged=args.time_converged)
    report = speed_report(model, rows, args.steps, args.repeat)
    print(f"{model.name} on {report['device']} ({report['cpu']}, {report['torch_threads']} threads), "
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
        if len(r.paired_ratios) > 1:
            print(f"{r.tokens:>6} captum / fast in each round (paths timed back to back): "
                  + ", ".join(f"{x:.1f}" for x in r.paired_ratios))
        if args.time_converged:
            print(f"{r.tokens:>6} converged ({CONVERGED['grid']}, {CONVERGED['steps']} per layer): {r.converged_s:.2f} s, "
                  f"{r.converged_gflop:.1f} GFLOP at {r.rate('converged'):.1f} GFLOP/s ({r.of_peak('converged'):.1%}), "
                  f"{r.converged_layer_steps} layer-points (m = {args.steps}: {args.steps * model.n_layers}), "
                  f"worst gap {r.converged_worst_gap:.2g}; coarse-set Jaccard with Gauss-Legendre m = 100 "
                  f"({r.reference_s:.1f} s): converged {r.converged_jaccard:.2f}, m = {args.steps} {r.paper_jaccard:.2f}")
        for what, ops, phases in ((f"m = {args.steps}", r.fast_profile, r.fast_phases),
                                  ("converged", r.converged_profile, r.converged_phases)):
            if ops:
                print(f"{r.tokens:>6} fast engine, {what}, self CPU time by operator: "
                      + ", ".join(f"{o['op']} {o['share']:.0%}" for o in ops[:5]))
            if phases:
                print(f"{r.tokens:>6} fast engine, {what}, seconds by phase (profiled): "
                      + ", ".join(f"{name} {s:.2f}" for name, s in phases.items()))
    _write_json(args.json, report)
    return 0


def cmd_bench_pararel(args) -> int:
    config = ParaRelConfig(steps=args.steps, grid=args.grid, batch_size=args.batch_size, max_rank=args.max_rank,
                           min_known=args.min_known, locate_prompts=args.locate_prompts,
                           update_facts=args.update_facts, controls=args.controls, erase_top=args.erase_top,
                           random_draws=args.random_draws, seed=args.seed, engine=args.engine)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    data = pararel_protocol_data(model, args.pararel, _relations(args), args.facts_per_relation, config)
    out = Path(args.out)
    pool = _open_pool(args, model)
    with pool if pool is not None else contextlib.nullcontext():
        manifest = run_pararel(model, data, out, config, progress=not args.quiet, pool=pool, reverse=args.reverse)
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
    for folder in args.folders:
        write_summary(folder)
        print(f"wrote {Path(folder) / 'report.md'}")
    if args.compare:
        print(f"wrote {write_comparison(args.folders, args.compare, _command(args))}")
    return 0


def cmd_bench_convergence(args) -> int:
    print(f"wrote {write_convergence(args.folders, args.report, _command(args))}")
    return 0


def cmd_bench_edits(args) -> int:
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
    manifest = run_edits(model, run, args.source, out, config, progress=not args.quiet, reverse=args.reverse)
    manifest["command"] = _command(args)
    write_atomic_json(out / "results.json", manifest)
    s = write_edits_summary(out)
    print(f"wrote {out / 'report.md'}: {s['edits']} edits in {s['relations']} relations")
    for m, v in s["methods"].items():
        print(f"  {m:>14}: " + ", ".join(f"{k} {rate(v[k]['value'])}" for k in ("ES", "PS", "NS", "S")))
    return 0


def cmd_bench_edits_report(args) -> int:
    for folder in args.folders:
        write_edits_summary(folder)
        print(f"wrote {Path(folder) / 'report.md'}")
    return 0


def cmd_bench_grids(args) -> int:
    config = GridsConfig(grids=tuple(args.grids.split(",")), steps=tuple(_int_list(args.grid_steps, "--grid-steps")),
                         reference_steps=args.reference_steps, prompts_per_fact=args.prompts_per_fact,
                         max_rank=args.max_rank, min_known=args.min_known, batch_size=args.batch_size,
                         converged=args.with_converged)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    data = _pararel_data(args, model)
    out = Path(args.out)
    records = run_grids(model, data, out, config, progress=not args.quiet)
    table = summarize_grids(records, config)
    command = _command(args)
    _write_json(out / "results.json", {"model": model.name, "command": command, "config": config.identity(),
                                       "summary": table, "records": records})
    print(f"{'rule':>18} {'m':>4} {'s/prompt':>9} {'median err':>10} {'worst err':>10} {'refined J':>9}")
    for r in table:
        print(f"{r['grid']:>18} {r['steps']:>4} {r['seconds_per_prompt']:>9.2f} {r['median_abs_gap']:>10.1e} "
              f"{r['worst_abs_gap']:>10.1e} {r['refined_jaccard']:>9.2f}")
    print(f"wrote {write_grids_report(records, table, out, model.name, command, config)}")
    return 0


def cmd_bench_throughput(args) -> int:
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


def cmd_bench_findings(args) -> int:
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
    if len(args.results) < 2:
        raise KnowledgeNeuronError("give at least two results.json files")
    kind, models, rows = compare(args.results)
    for finding, cells, verdict in rows:
        print(f"{finding}: {' | '.join(cells)}" + (f"  [holds on all: {verdict}]" if verdict else ""))
    if args.report:
        print(f"wrote {write_comparison(args.results, args.report, _command(args))}")
    return 0
