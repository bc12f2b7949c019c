"""Coarse and refined knowledge neurons (Dai et al. 2021, section 3.2-3.3).

* coarse: neurons whose IG score exceeds ``t x`` the largest score of the prompt (t = 0.2);
* refined: coarse neurons shared by *more than* a fraction ``p`` of the fact's prompts.
  The paper starts from p = 0.7 and, in its adaptive mode, moves p by 0.05 until the fact
  keeps between 2 and 5 neurons (or p cannot move further);
* baseline selector: the same pipeline driven by raw activations instead of IG scores.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kn_plugin.attribution import DEFAULT_ENGINE, AttributionResult, KnowledgeAttribution
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.interventions import group_by_layer
from kn_plugin.models import LoadedModel, accepts_model

DEFAULT_THRESHOLD = 0.2
DEFAULT_SHARE = 0.7
ADAPTIVE_STEP = 0.05
ADAPTIVE_RANGE = (2, 5)


@dataclass(frozen=True, order=True)
class Neuron:
    layer: int
    index: int
    score: float = field(default=0.0, compare=False)

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.index)


def check_fraction(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0 < value <= 1:
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


@dataclass
class LocateResult:
    """Knowledge neurons of one fact found from one or more paraphrased prompts."""

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

    @property
    def target_prob(self) -> list[float]:
        return [a.target_prob for a in self.attributions]

    def to_dict(self) -> dict:
        return {
            "model": self.model, "prompts": self.prompts, "target": self.target,
            "target_prob": self.target_prob, "method": self.method,
            "threshold": self.threshold, "share": self.share,
            "n_layers": self.n_layers, "d_mlp": self.d_mlp,
            "neurons": [asdict(n) for n in self.neurons],
            "coarse": [[asdict(n) for n in s] for s in self.coarse],
            "completeness_gap": [a.completeness_gap.tolist() for a in self.attributions],
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def read_neurons_file(path: str | Path, model: LoadedModel | None = None) -> tuple[list[Neuron], dict]:
    """Neurons from a ``kn locate`` JSON file, checked against ``model`` when given."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KnowledgeNeuronError(f"cannot read neurons file {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("neurons"), list):
        raise KnowledgeNeuronError(f"{path} has no 'neurons' list (write it with `kn locate --json`)")
    if model is not None:
        sizes = (data.get("n_layers"), data.get("d_mlp"))
        if data.get("model") not in (None, model.name) or sizes not in ((None, None), (model.n_layers,
                                                                                     model.d_mlp)):
            raise KnowledgeNeuronError(
                f"{path} was made for model {data.get('model')!r} ({sizes[0]} layers x {sizes[1]} "
                f"neurons), not for {model.name!r} ({model.n_layers} x {model.d_mlp})"
            )
    try:
        neurons = [Neuron(int(n["layer"]), int(n["index"]), float(n.get("score", 0.0)))
                   for n in data["neurons"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise KnowledgeNeuronError(f"{path}: each neuron needs 'layer' and 'index' ({exc})") from exc
    if not neurons:
        raise KnowledgeNeuronError(f"{path} holds no neurons (try more prompts or `--adaptive`)")
    if model is not None:
        group_by_layer(neurons, model.n_layers, model.d_mlp)
    return neurons, data


@accepts_model
def locate(
    model: LoadedModel, prompts, target: str, steps: int = 20,
    threshold: float = DEFAULT_THRESHOLD, share: float = DEFAULT_SHARE, adaptive: bool = False,
    min_prompts: int = 1, method: str = "ig", engine: str = DEFAULT_ENGINE,
    batch_size: int = 10, progress: bool = True,
) -> LocateResult:
    """Find the knowledge neurons of a fact.

    With one prompt the result is the coarse set; with several, the refined set (``share``, or
    the paper's adaptive tuning with ``adaptive=True``). ``method="activation"`` uses the
    paper's raw-activation baseline instead of IG.

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
    check_fraction("share", share)
    if method not in ("ig", "activation"):
        raise KnowledgeNeuronError(f"method must be 'ig' or 'activation', got {method!r}")
    ka = KnowledgeAttribution(model, engine=engine)
    steps_used = steps if method == "ig" else 1
    results = []
    for p in prompts:
        if method == "ig":
            results.append(ka.attribute(p, target, steps=steps, batch_size=batch_size,
                                        progress=progress))
        else:  # activations only: no gradients needed
            results.append(ka.attribute(p, target, steps=steps_used, layers=[], progress=False))
    pick = coarse_neurons if method == "ig" else activation_neurons
    coarse = [pick(r, threshold) for r in results]
    used_share: float | None
    if len(prompts) == 1:
        neurons, used_share = coarse[0], None
    elif adaptive:
        neurons, used_share = refine_adaptive(coarse, share)
    else:
        neurons, used_share = refine(coarse, share), share
    return LocateResult(model.name, [r.prompt for r in results], target, neurons, coarse, results, threshold,
                        used_share, model.n_layers, model.d_mlp, method)
