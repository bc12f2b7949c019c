"""What :func:`~kn_plugin.locating.core.locate` returns (:class:`LocateResult`), saved as JSON beside
its scores (NPZ) and read back, with the neurons files users pass to the other commands."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from kn_plugin.attribution import AttributionResult
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.files import file_digest, temp_path, write_text_atomic
from kn_plugin.interventions import group_by_layer, neuron_key
from kn_plugin.locating.select import Neuron
from kn_plugin.models import wrap
from kn_plugin.validation import finite, output_path, read_text

#: below this P(target) a located fact gets a warning: the model does not know it
LOW_PROB = 1e-3


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
