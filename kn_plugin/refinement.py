"""Coarse and refined knowledge neurons (Dai et al. 2021, section 3.2-3.3).

* coarse: neurons whose IG score exceeds ``t x`` the largest score of the prompt (t = 0.2);
* refined: coarse neurons shared by *more than* a fraction ``p`` of the fact's prompts.
  The paper starts from p = 0.7 and, in its adaptive mode, moves p by 0.05 until the fact
  keeps between 2 and 5 neurons (or p cannot move further);
* baseline selector: the same pipeline driven by raw activations instead of IG scores.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kn_plugin.attribution import (
    AUTO_TOLERANCE,
    DEFAULT_ENGINE,
    DEFAULT_GRID,
    AttributionResult,
    KnowledgeAttribution,
    check_grid,
)
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.files import file_digest, temp_path, write_text_atomic
from kn_plugin.interventions import group_by_layer, neuron_key
from kn_plugin.methods import method_attribution, resolve_method
from kn_plugin.models import LoadedModel, accepts_model, wrap
from kn_plugin.validation import finite, output_path, read_text

DEFAULT_THRESHOLD = 0.2
DEFAULT_SHARE = 0.7
ADAPTIVE_STEP = 0.05
ADAPTIVE_RANGE = (2, 5)
#: below this P(target) a located fact gets a warning: the model does not know it
LOW_PROB = 1e-3


@dataclass(frozen=True, order=True)
class Neuron:
    layer: int
    index: int
    score: float = field(default=0.0, compare=False)

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.index)


def check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise KnowledgeNeuronError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def _select(values: torch.Tensor, threshold: float) -> list[Neuron]:
    """Neurons with value > threshold * max(values); values: [n_layers, d_mlp]."""
    check_fraction("threshold", threshold)
    top = values.max()
    if top <= 0:
        return []
    idx = (values > threshold * top).nonzero().tolist()
    return sorted((Neuron(int(layer), int(i), float(values[layer, i])) for layer, i in idx),
                  key=lambda n: -n.score)


def coarse_neurons(result: AttributionResult, threshold: float = DEFAULT_THRESHOLD) -> list[Neuron]:
    """Neurons with IG score > ``threshold`` x the maximum score of this prompt."""
    return _select(result.scores, threshold)


def activation_neurons(result: AttributionResult, threshold: float = DEFAULT_THRESHOLD) -> list[Neuron]:
    """The paper's baseline: neurons with activation > ``threshold`` x the maximum activation."""
    return _select(result.activations, threshold)


def refine(coarse_sets: list[list[Neuron]], share: float = DEFAULT_SHARE) -> list[Neuron]:
    """Neurons present in more than ``share`` of the prompts' coarse sets (mean score kept)."""
    check_fraction("share", share)
    n = len(coarse_sets)
    counts = Counter(nrn.key for s in coarse_sets for nrn in set(s))
    sums: dict[tuple[int, int], float] = {}
    for s in coarse_sets:
        for nrn in s:
            sums[nrn.key] = sums.get(nrn.key, 0.0) + nrn.score
    kept = [Neuron(k[0], k[1], sums[k] / n) for k, c in counts.items() if c > share * n]
    return sorted(kept, key=lambda nrn: -nrn.score)


def refine_adaptive(
    coarse_sets: list[list[Neuron]], share: float = DEFAULT_SHARE,
    keep: tuple[int, int] = ADAPTIVE_RANGE, step: float = ADAPTIVE_STEP,
) -> tuple[list[Neuron], float]:
    """Move ``share`` by ``step`` until the refined set size lies in ``keep`` (paper's tuning).

    With few prompts no ``share`` may land in the range (every value of p between two
    multiples of 1/n keeps the same set). Then the non-empty set closest to the range is
    returned, so an overshoot from "too many" to "none" never erases the answer.
    """
    lo, hi = keep
    seen = [(refine(coarse_sets, share), share)]
    direction = 0
    while not lo <= len(seen[-1][0]) <= hi:
        new_dir = 1 if len(seen[-1][0]) > hi else -1
        nxt = round(seen[-1][1] + new_dir * step, 10)
        if direction == -new_dir or not 0 < nxt <= 1:
            break  # oscillating or out of range
        direction = new_dir
        seen.append((refine(coarse_sets, nxt), nxt))
    if lo <= len(seen[-1][0]) <= hi:
        return seen[-1]
    nonempty = [s for s in seen if s[0]]
    if not nonempty:
        return seen[-1]
    return min(nonempty, key=lambda s: max(lo - len(s[0]), len(s[0]) - hi))


RESULT_FORMAT = 1


class RefinementNote(UserWarning):
    """A refined set is empty or outside the paper's 2-5 neurons (``LocateResult.note``)."""


class LowProbabilityWarning(UserWarning):
    """The model gives the target a probability below :data:`LOW_PROB` on a located prompt."""


@dataclass
class LocateResult:
    """Knowledge neurons of one fact found from one or more paraphrased prompts.

    ``note``: one line when the result falls outside the paper's 2-5 neurons (or is empty),
    with what to try. ``save``/``load`` keep everything, score matrices included."""

    model: str
    prompts: list[str]
    target: str
    neurons: list[Neuron]
    coarse: list[list[Neuron]]
    attributions: list[AttributionResult]
    threshold: float
    share: float | None
    n_layers: int
    d_mlp: int
    method: str = "ig"
    fingerprint: str | None = None
    adaptive: bool = False
    note: str | None = None
    #: :attr:`LoadedModel.signature` of the model (its identity in every dtype)
    signature: str | None = None

    @property
    def target_prob(self) -> list[float]:
        return [a.target_prob for a in self.attributions]

    def to_dict(self) -> dict:
        return {
            "format": RESULT_FORMAT, "model": self.model, "fingerprint": self.fingerprint, "signature": self.signature,
            "prompts": self.prompts, "target": self.target,
            "target_prob": self.target_prob, "method": self.method,
            "threshold": self.threshold, "share": self.share, "adaptive": self.adaptive, "note": self.note,
            "n_layers": self.n_layers, "d_mlp": self.d_mlp,
            "neurons": [asdict(n) for n in self.neurons],
            "coarse": [[asdict(n) for n in s] for s in self.coarse],
            "completeness_gap": [a.completeness_gap.tolist() for a in self.attributions],
            "attributions": [a.to_dict() for a in self.attributions],
        }

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (JSON) and the score matrices beside it (``path`` + ``.npz``)."""
        import numpy as np

        path = output_path(path, "result")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"scores": np.stack([a.scores.numpy() for a in self.attributions]),
                  "activations": np.stack([a.activations.numpy() for a in self.attributions]),
                  "zeroed_prob": np.stack([a.zeroed_prob.numpy() for a in self.attributions])}
        # atomic, the JSON last, and bound to its arrays by their digest: a kill at any point
        # leaves the old pair, the new pair, or a JSON whose arrays do not match (refused on load)
        npz = scores_path(path)
        tmp_npz = temp_path(npz, ".npz")
        try:
            np.savez(tmp_npz, **arrays)
            digest = file_digest(tmp_npz)
            os.replace(tmp_npz, npz)
        except BaseException:
            tmp_npz.unlink(missing_ok=True)
            raise
        write_text_atomic(path, json.dumps({**self.to_dict(), "scores_sha256": digest}, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> LocateResult:
        """A result written by :meth:`save` (or ``kn locate --json``), bit-identical."""
        import numpy as np

        data = _read_json(path, "result file")
        if data.get("format") != RESULT_FORMAT or "attributions" not in data:
            raise KnowledgeNeuronError(f"{path} is not a saved kn locate result (format {RESULT_FORMAT})")
        npz = scores_path(Path(path))
        if "scores_sha256" in data and (not npz.is_file() or file_digest(npz) != data["scores_sha256"]):
            raise KnowledgeNeuronError(f"{npz} is missing or belongs to another result than {path} (a write was "
                                       "interrupted, or the files were mixed): locate the fact again")
        try:
            with np.load(npz) as arrays:
                scores, acts, zeroed = arrays["scores"], arrays["activations"], arrays["zeroed_prob"]
        except (OSError, KeyError, ValueError) as exc:
            raise KnowledgeNeuronError(f"cannot read the score matrices {npz}: {exc}") from None
        try:
            atts = [AttributionResult(
                model=data["model"], prompt=a["prompt"], target=a["target"],
                scores=torch.from_numpy(scores[i].copy()), activations=torch.from_numpy(acts[i].copy()),
                target_prob=a["target_prob"], zeroed_prob=torch.from_numpy(zeroed[i].copy()),
                layers=tuple(a["layers"]), steps=a["steps"], engine=a["engine"],
                extras=a.get("extras", {}))
                for i, a in enumerate(data["attributions"])]
            return cls(data["model"], data["prompts"], data["target"], _neurons(data["neurons"]),
                       [_neurons(c) for c in data["coarse"]], atts, data["threshold"], data["share"],
                       data["n_layers"], data["d_mlp"], data["method"], data.get("fingerprint"),
                       data.get("adaptive", False), data.get("note"), data.get("signature"))
        except (KeyError, TypeError, IndexError) as exc:
            raise KnowledgeNeuronError(f"{path}: incomplete result ({exc})") from None


def scores_path(path: Path) -> Path:
    """Where the score matrices of a result saved at ``path`` live."""
    return path.with_name(path.name + ".npz")


def _read_json(path, what: str) -> dict:
    text = read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KnowledgeNeuronError(f"{what} {path} is not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise KnowledgeNeuronError(f"{what} {path} holds no JSON object")
    return data


def _neurons(rows) -> list[Neuron]:
    out = []
    for n in rows:
        layer, index = neuron_key(n)
        score = n.get("score", 0.0) if isinstance(n, dict) else 0.0
        out.append(Neuron(layer, index, finite("a neuron's score", score)))
    return out


def read_neurons_file(path: str | Path, model=None) -> tuple[list[Neuron], dict]:
    """Neurons from a ``kn locate`` JSON file, checked against ``model`` when given.

    The file must name the model by its fingerprint (:attr:`LoadedModel.fingerprint`), which
    does not depend on how the model was named or loaded; a file that also records the model's
    :attr:`~LoadedModel.signature` is accepted by the same model in any dtype (float16 too)."""
    data = _read_json(path, "neurons file")
    if not isinstance(data.get("neurons"), list):
        raise KnowledgeNeuronError(f"{path} has no 'neurons' list (write it with `kn locate --json`)")
    if model is not None:
        model = wrap(model)
        made_for = data.get("fingerprint")
        if made_for is None:
            raise KnowledgeNeuronError(f"{path} does not say which model it was made for (no 'fingerprint'): "
                                       "write it with `kn locate --json`")
        if not model.made(made_for, data.get("signature")):
            raise KnowledgeNeuronError(
                f"{path} was made for model {data.get('model')!r} ({made_for}), not for {model.name!r} "
                f"({model.fingerprint})"
            )
    try:
        neurons = _neurons(data["neurons"])
    except KnowledgeNeuronError as exc:
        raise KnowledgeNeuronError(f"{path}: {exc}") from None
    if not neurons:
        raise KnowledgeNeuronError(f"{path} holds no neurons (locate with more or other prompts)")
    if model is not None:
        group_by_layer(neurons, model.n_layers, model.d_mlp)
    return neurons, data


def _note(n_neurons: int, n_prompts: int, share: float | None, adaptive: bool) -> str | None:
    """One line when a refined set is empty or outside the paper's 2-5 neurons."""
    lo, hi = ADAPTIVE_RANGE
    if n_prompts < 2 or lo <= n_neurons <= hi:
        return None
    need = int(share * n_prompts) + 1 if share is not None else n_prompts
    if n_neurons == 0 and not adaptive:
        return (f"no neuron is in more than {share:g} of the {n_prompts} prompts' coarse sets (each needs "
                f"{need} of {n_prompts}): lower --share or drop it for the paper's adaptive tuning")
    if n_neurons == 0:
        return (f"no share p kept any neuron common to the {n_prompts} prompts: add paraphrases or lower "
                "the threshold")
    how = f"adaptive share stopped at {share:g}" if adaptive else f"share {share:g}"
    advice = ("more paraphrases separate them better" if n_neurons > hi
              else "fewer or closer paraphrases, or a lower threshold, keep more")
    return f"{n_neurons} refined neurons, outside the paper's {lo}-{hi} ({how}): {advice}"


def locate_quietly(model, prompts, target: str, **kwargs) -> LocateResult:
    """:func:`locate` for loops over many facts: the refinement note stays in ``result.note``
    instead of a warning per fact (every other warning still shows)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RefinementNote)
        return locate(model, prompts, target, **kwargs)


@accepts_model
def locate(
    model: LoadedModel, prompts, target: str, steps: int = 20,
    threshold: float = DEFAULT_THRESHOLD, share: float | None = None, adaptive: bool | None = None,
    min_prompts: int = 1, method="ig", engine: str = DEFAULT_ENGINE,
    batch_size: int = 10, progress: bool = True, grid: str = DEFAULT_GRID,
    tolerance: float = AUTO_TOLERANCE, batch_prompts: bool = False,
) -> LocateResult:
    """Find the knowledge neurons of a fact.

    With one prompt the result is the coarse set. With several, the refined set: by default
    the paper's adaptive tuning (p from 0.7 in steps of 0.05 until 2-5 neurons remain);
    ``share=p`` fixes p (``adaptive=True`` with it starts the tuning from p). When the refined
    set is empty or outside 2-5 neurons, ``result.note`` says so in one line, also as a
    warning. ``method``: ``"ig"`` (the paper), ``"activation"`` (its raw-activation baseline),
    ``"grad_x_act"``, ``"atp"``, ``"conductance"``, a Captum layer attribution class (or
    ``"captum:ClassName"``) or a callable ``fn(model, fact) -> [n_layers, d_mlp]``; see
    :mod:`kn_plugin.methods`. Every method feeds the same coarse/refined/adaptive selection
    and the result records it (``result.method``).

    ``grid``/``steps``/``tolerance``: the integration rule and its steps, as in
    :meth:`KnowledgeAttribution.attribute` (``steps="auto"`` included).
    ``batch_prompts``: attribute the prompts together in shared padded passes
    (:meth:`KnowledgeAttribution.attribute_prompts`) instead of one at a time on ``engine``;
    equal scores, faster only where one prompt's pass leaves the device idle (see
    ``kn bench throughput``; on CPU the default per-prompt fast engine is faster).

    ``model``: anything :func:`kn_plugin.wrap` takes (``tokenizer=`` with a bare Hugging Face
    module); each prompt is text or token ids (a [k, seq] tensor is k prompts).
    """
    import torch

    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and all(isinstance(i, int) for i in prompts)):
        prompts = [prompts]
    elif isinstance(prompts, torch.Tensor):
        prompts = list(prompts) if prompts.dim() == 2 else [prompts]
    if not prompts:
        raise KnowledgeNeuronError("give at least one prompt")
    if len(prompts) < min_prompts:
        raise KnowledgeNeuronError(
            f"refinement needs at least {min_prompts} prompts, got {len(prompts)}"
        )
    check_fraction("threshold", threshold)
    if share is not None:
        check_fraction("share", share)
    if adaptive is None:
        adaptive = share is None
    start_share = DEFAULT_SHARE if share is None else share
    resolved = resolve_method(method)
    check_grid(grid)
    ka = KnowledgeAttribution(model, engine=engine)
    if resolved.kind != "ig" and not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise KnowledgeNeuronError(f"steps must be a positive integer for method {resolved.name}, got {steps!r}")
    fingerprint = model.fingerprint
    results, one_by_one = [], prompts
    if batch_prompts and resolved.kind == "ig" and steps != "auto" and len(prompts) > 1:
        results = ka.attribute_prompts(prompts, target, steps=steps, batch_size=batch_size, progress=progress,
                                       grid=grid)
        one_by_one = []
    for p in one_by_one:
        results.append(method_attribution(model, resolved, p, target, steps=steps, batch_size=batch_size,
                                          engine=ka.engine, grid=grid, tolerance=tolerance, progress=progress))
    for r in results:
        if r.target_prob < LOW_PROB:
            warnings.warn(f"P({target!r} | {r.prompt!r}) = {r.target_prob:.2g} < {LOW_PROB:g}: the model does "
                          "not predict this fact, so its neurons say little about it", LowProbabilityWarning,
                          stacklevel=3)
    pick = activation_neurons if resolved.kind == "activation" else coarse_neurons
    coarse = [pick(r, threshold) for r in results]
    used_share: float | None
    if len(prompts) == 1:
        neurons, used_share = coarse[0], None
    elif adaptive:
        neurons, used_share = refine_adaptive(coarse, start_share)
    else:
        neurons, used_share = refine(coarse, start_share), start_share
    note = _note(len(neurons), len(prompts), used_share, adaptive)
    if note:
        warnings.warn(note, RefinementNote, stacklevel=3)
    return LocateResult(model.name, [r.prompt for r in results], target, neurons, coarse, results, threshold,
                        used_share, model.n_layers, model.d_mlp, resolved.name, fingerprint, adaptive and len(prompts) > 1,
                        note, model.signature)
