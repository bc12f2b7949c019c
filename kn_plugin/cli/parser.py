"""The argument parser of every command."""

from __future__ import annotations

import argparse

from kn_plugin import __version__
from kn_plugin.attribution import AUTO_TOLERANCE, DEFAULT_BATCH_SIZE, DEFAULT_ENGINE, ENGINES, GRIDS, PASS_ROWS
from kn_plugin.cli.bench import (
    cmd_bench_compare,
    cmd_bench_convergence,
    cmd_bench_edits,
    cmd_bench_edits_report,
    cmd_bench_findings,
    cmd_bench_grids,
    cmd_bench_methods,
    cmd_bench_pararel,
    cmd_bench_pararel_report,
    cmd_bench_speed,
    cmd_bench_throughput,
)
from kn_plugin.cli.common import _finite, _lambda2, _layer_or_trace, _nonnegative_int, _Parser, _positive_int, _steps
from kn_plugin.cli.edit import cmd_edit_apply, cmd_edit_erase, cmd_edit_rome, cmd_edit_update
from kn_plugin.cli.locate import cmd_demo, cmd_families, cmd_inspect, cmd_intervene, cmd_locate, cmd_plot
from kn_plugin.defaults import PAPER_STEPS
from kn_plugin.locating import DEFAULT_SHARE, DEFAULT_THRESHOLD


def edit_outputs(p: argparse.ArgumentParser, measured: str) -> None:
    """--save and --json of the edit commands."""
    p.add_argument("--save", help="write the edit (slots, old and new values) to this file (apply it later with "
                                  "`kn edit apply`)")
    p.add_argument("--json", help=f"write the {measured} before/after as JSON")


def build_parser() -> argparse.ArgumentParser:
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
                       help="converged attributions: --grid gausslegendre --steps adaptive (each layer refined where "
                            "its own path needs it)")

    def common(p, model_default=None, auto_steps=False):
        model_options(p, model_default)
        if auto_steps:
            p.add_argument("--steps", type=_steps, default=PAPER_STEPS,
                           help="integration steps m (paper: 20); auto: per layer, the smallest m of 5, 10, 20, "
                                "50, 100, 200, 500 whose completeness gap meets --tolerance; adaptive: per "
                                "layer, a composite rule bisected until each neuron's error estimate is within "
                                "1%% of the largest score and the gap meets --tolerance")
        else:
            p.add_argument("--steps", type=_positive_int, default=PAPER_STEPS, help="IG Riemann steps m (paper: 20)")
        p.add_argument("--engine", default=DEFAULT_ENGINE, choices=sorted(ENGINES),
                       help="attribution engine (default fast: the fastest path that verifies)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("locate", help="find the knowledge neurons of a fact")
    common(p, auto_steps=True)
    p.add_argument("--grid", default="riemann_right", choices=list(GRIDS),
                   help="integration rule (Captum's names; default: the paper's right Riemann sum)")
    converged_option(p)
    p.add_argument("--tolerance", type=_finite, default=AUTO_TOLERANCE,
                   help="with --steps auto/adaptive: largest completeness gap relative to each layer's effect")
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
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"alpha steps per pass (default: fast engines fill passes of up to {PASS_ROWS} rows, "
                        f"others {DEFAULT_BATCH_SIZE})")
    p.add_argument("--matmul-dtype", choices=["bfloat16", "float16"],
                   help="IG's layer products in this dtype on the fast engines (the rest in the model's), checked "
                        "against the model's own forward; only faster where the device has units for it")
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

    def edit_command(name, help, func, measured=None, options=model_options):
        """An ``kn edit`` subcommand: its model options, handler and (``measured``) --save/--json."""
        p = edit.add_parser(name, help=help)
        options(p)
        if measured is not None:
            edit_outputs(p, measured)
        p.set_defaults(func=func)
        return p

    p = edit_command("update", "<h, r, t> -> <h, r, t'>", cmd_edit_update, "probabilities")
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
    p.add_argument("--constrained", action="store_true",
                   help="the constrained update instead (ROME's least squares on the neurons' slots: the least change "
                        "other keys see; best KN update of docs/edits-*); replaces --lambda1/--lambda2/--scale")
    p.add_argument("--corpus", help="with --constrained: text file, one text a line, for the neurons' key statistics "
                                    "(default: text the model writes, 25 x 64 tokens)")

    p = edit_command("rome", "rank-one edit (ROME) of one layer's FFN output weight: prompt -> new object",
                     cmd_edit_rome, "probabilities")
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

    p = edit_command("erase", "erase a relation given as a JSONL file of facts", cmd_edit_erase, "perplexities",
                     options=common)
    p.add_argument("--facts", required=True, help="JSONL: {'prompts': [...], 'target': ...}")
    p.add_argument("--other", help="JSONL of facts of other relations (perplexity control)")
    p.add_argument("--min-facts", type=_positive_int, default=5, help="erase neurons shared by >= m facts")
    p.add_argument("--replacement", default="auto", choices=["auto", "unk", "zero", "mean"],
                   help="what erased value slots become (auto: the unknown token's embedding if any)")

    p = edit_command("apply", "apply a saved edit and write the edited model as a Hugging Face folder",
                     cmd_edit_apply)
    p.add_argument("--edit", required=True, help="edit file written by `kn edit update/erase --save`")
    p.add_argument("--out", required=True, help="new folder for the edited model (config, weights, tokenizer)")
    p.add_argument("--force", action="store_true", help="replace --out if an earlier `kn edit apply` wrote it")

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
    p.add_argument("--steps", type=_positive_int, default=PAPER_STEPS, help="IG Riemann steps m (paper: 20)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"alpha steps per pass (default: fast engines fill passes of up to {PASS_ROWS} rows, "
                        f"others {DEFAULT_BATCH_SIZE})")
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
    p.add_argument("--reverse", action="store_true",
                   help="take each stage's pending work from the last: a second process on the same folder and "
                        "command then shares the work with the first instead of repeating it")
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
    p.add_argument("--reverse", action="store_true",
                   help="take each stage's pending edits from the last: a second process on the same folder "
                        "then shares the work with the first instead of repeating it")
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
    p.add_argument("--steps", type=_positive_int, default=PAPER_STEPS, help="IG Riemann steps m (paper: 20)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"alpha steps per pass (default: fast engines fill passes of up to {PASS_ROWS} rows, "
                        f"others {DEFAULT_BATCH_SIZE})")
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
    p.add_argument("--converged", action="store_true", dest="with_converged",
                   help="also the converged preset (Gauss-Legendre, each layer its own m): row m = auto")
    p.add_argument("--out", default="grids_out", help="output folder (results, report, plot; resumable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench_grids)

    p = sub.add_parser("families", help="the supported families, measured on tiny random models")
    p.add_argument("--write", help="rewrite the family table of this README")
    p.set_defaults(func=cmd_families)
    return parser
