"""What the commands share: argument types, output checks, JSON output, Ray pools, PARAREL options."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from kn_plugin.attribution import CONVERGED, STEP_RULES
from kn_plugin.data import load_pararel
from kn_plugin.defaults import PAPER_STEPS
from kn_plugin.distributed import PoolConfig, import_ray, open_pool
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.runs import write_atomic
from kn_plugin.validation import MAX_STEPS, finite, output_folder, output_path, plot_suffixes


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: ``kn: error: ...`` and exit code 2."""

    def error(self, message):
        command = self.prog.partition(" ")[2]  # "bench edits" of "kn bench edits"; "" for kn itself
        raise _UsageError(f"{command}: {message}" if command else message)


class _UsageError(Exception):
    pass


def _type(check):
    def convert(text):
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
    if text in STEP_RULES:
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
    return open_pool(model, args.workers, args.threads_per_worker, args.ray_address)


def _check_pool_args(args) -> None:
    """``--workers``/``--ray-address``: Ray installed, the cluster reachable, before a model loads."""
    if getattr(args, "workers", None) is None and getattr(args, "ray_address", None) is None:
        return

    import_ray()
    PoolConfig(workers=args.workers or 1, threads_per_worker=args.threads_per_worker, address=args.ray_address)


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
    return load_pararel(args.pararel, relations=_relations(args), masked=model.is_masked,
                        mask_token=model.tokenizer.mask_token if model.is_masked else None,
                        facts_per_relation=getattr(args, "facts_per_relation", None), seed=args.seed,
                        tokenizer=model.tokenizer, **kwargs)


def _command(args) -> str:
    return "kn " + shlex.join(sys.argv[1:] if args.argv is None else args.argv)


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise KnowledgeNeuronError(f"{what} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise KnowledgeNeuronError(f"{what} is empty")
    return values


def _apply_converged(args) -> None:
    """``--converged``: the settings of :data:`kn_plugin.attribution.CONVERGED`, alone."""
    if not getattr(args, "converged", False):
        return
    if args.steps != PAPER_STEPS or args.grid != "riemann_right":
        raise KnowledgeNeuronError(f"--converged sets --steps {CONVERGED['steps']} --grid {CONVERGED['grid']}: "
                                   "give it without them")

    args.steps, args.grid = CONVERGED["steps"], CONVERGED["grid"]
