"""Interventions on knowledge neurons: suppress (x0), amplify (x2), or any scale/set.

Two equivalent paths over the same weights:

* **TransformerLens**: hook functions with the TL signature ``(activation, hook) -> activation``
  and ready ``fwd_hooks`` lists for ``bridge.run_with_hooks(tokens, fwd_hooks=...)`` or
  ``with bridge.hooks(fwd_hooks=...)``; hook point ``blocks.{l}.mlp.hook_post``.
* **Hugging Face**: context managers (``suppress``, ``amplify``, ``scale_neurons``,
  ``set_neurons``) that register forward hooks on the neuron site and remove them in
  ``finally``; ``InterventionHandle.remove()`` for manual control.

``position``: an ``EncodedFact`` acts at its prediction position (the mask slot of a masked
model, the last prompt token of a multi-token target); an int acts at that sequence position;
``None`` acts at every position. The default of the Hugging Face context managers,
``"auto"``, is the last token (``-1``) on a causal LM, which is the prediction position of a
single-token cloze prompt; on a masked LM the last token is ``[SEP]``, so there ``"auto"`` is
refused and the fact (or the mask slot) must be passed. The TL hook functions know no model:
their default is the last token; pass ``position=fact`` on masked models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.integrations.transformer_lens import hook_name
from kn_plugin.models import LoadedModel, accepts_model
from kn_plugin.validation import finite, integer

HookFn = Callable[[torch.Tensor, object], torch.Tensor]



def neuron_key(neuron) -> tuple[int, int]:
    """``(layer, index)`` of a neuron given as a pair, a dict or a ``Neuron``; integers only."""
    try:
        if isinstance(neuron, dict):
            layer, index = neuron["layer"], neuron["index"]
        elif isinstance(neuron, (tuple, list)) and len(neuron) >= 2:
            layer, index = neuron[0], neuron[1]
        else:
            layer, index = neuron.layer, neuron.index
    except (KeyError, AttributeError, TypeError):
        raise KnowledgeNeuronError(f"a neuron is a (layer, index) pair, got {neuron!r}") from None
    return integer("a neuron's layer", layer), integer("a neuron's index", index)


def group_by_layer(neurons: Iterable, n_layers: int | None = None,
                   d_mlp: int | None = None) -> dict[int, torch.Tensor]:
    """``{layer: LongTensor of neuron indices}``; checks ranges when sizes are given."""
    groups: dict[int, list[int]] = {}
    for n in neurons:
        layer, idx = neuron_key(n)
        if n_layers is not None and not 0 <= layer < n_layers:
            raise KnowledgeNeuronError(f"neuron layer {layer} out of range 0..{n_layers - 1}")
        if d_mlp is not None and not 0 <= idx < d_mlp:
            raise KnowledgeNeuronError(f"neuron index {idx} (layer {layer}) out of range 0..{d_mlp - 1}")
        groups.setdefault(layer, []).append(idx)
    return {layer: torch.tensor(sorted(set(ix)), dtype=torch.long) for layer, ix in groups.items()}


def _apply(act: torch.Tensor, idx: torch.Tensor, position: int | None, factor: float | None,
           value: float | torch.Tensor | None) -> torch.Tensor:
    """Scale (``factor``) or overwrite (``value``) neurons ``idx`` of act [batch, seq, d_mlp]."""
    _check_in_range(act, idx, position, value)
    out = act.clone()
    idx = idx.to(act.device)
    pos = slice(None) if position is None else position
    view = out[:, pos]  # a view: writing into it writes into out
    if factor is not None:
        view[..., idx] = view[..., idx] * factor
    else:
        view[..., idx] = torch.as_tensor(value, dtype=act.dtype, device=act.device)
    return out


def _check_in_range(act: torch.Tensor, idx: torch.Tensor, position: int | None, value) -> None:
    """Indices and position inside the activation the hook received (checked at the forward,
    where the sequence length and, for hooks without a model, the layer width are known)."""
    width, length = act.shape[-1], act.shape[1]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= width):
        bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
        raise KnowledgeNeuronError(f"neuron index {bad} out of range 0..{width - 1} of this layer")
    if position is not None and not -length <= position < length:
        raise KnowledgeNeuronError(f"position {position} out of range for a sequence of {length} tokens "
                                   f"(use {-length}..{length - 1})")
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[-1] not in (1, idx.numel()):
        raise KnowledgeNeuronError(f"value has {value.shape[-1]} entries for {idx.numel()} neurons of a layer: "
                                   "give one number, or one value per neuron")


def _position(position) -> int | None:
    """An int, None (every position), or anything with ``pred_pos`` (an ``EncodedFact``)."""
    position = getattr(position, "pred_pos", position)
    return None if position is None else integer("position", position)


def _model_position(model: LoadedModel, position):
    """Resolve the ``"auto"`` default of the context managers (see the module docstring)."""
    if isinstance(position, str) and position == "auto":
        if model.is_masked:
            raise KnowledgeNeuronError(
                "on a masked LM the last token is not the prediction position: pass position=fact "
                "(an EncodedFact) or the mask slot's index"
            )
        return -1
    return position


def _indices(indices) -> torch.Tensor:
    """Neuron indices as a LongTensor; integers only (no float, bool or string is truncated)."""
    if isinstance(indices, torch.Tensor):
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise KnowledgeNeuronError(f"neuron indices must be integers, got a {indices.dtype} tensor")
        return indices.long().flatten()
    return torch.tensor([integer("a neuron index", i) for i in indices], dtype=torch.long)


def scale_hook(indices: torch.Tensor | list[int], factor: float, position: int | None = -1) -> HookFn:
    """TL hook function multiplying the given neurons by ``factor``."""
    idx = _indices(indices)
    position = _position(position)
    factor = finite("factor", factor)

    def hook_fn(activation: torch.Tensor, hook=None) -> torch.Tensor:
        return _apply(activation, idx, position, factor, None)

    return hook_fn


def set_hook(indices: torch.Tensor | list[int], value: float | torch.Tensor,
             position: int | None = -1) -> HookFn:
    """TL hook function overwriting the given neurons with ``value`` (a number or a tensor)."""
    idx = _indices(indices)
    position = _position(position)
    if not isinstance(value, torch.Tensor):
        value = finite("value", value)

    def hook_fn(activation: torch.Tensor, hook=None) -> torch.Tensor:
        return _apply(activation, idx, position, None, value)

    return hook_fn


def suppress_hook(indices, position: int | None = -1) -> HookFn:
    return scale_hook(indices, 0.0, position)


def amplify_hook(indices, factor: float = 2.0, position: int | None = -1) -> HookFn:
    return scale_hook(indices, factor, position)


def fwd_hooks(neurons: Iterable, factor: float | None = 0.0, value=None,
              position: int | None = -1) -> list[tuple[str, HookFn]]:
    """``[(hook_name, hook_fn), ...]`` for ``bridge.run_with_hooks`` / ``bridge.hooks``."""
    return [(hook_name(layer), _hook(idx, factor, value, position))
            for layer, idx in group_by_layer(neurons).items()]


def _hook(idx: torch.Tensor, factor: float | None, value, position) -> HookFn:
    return set_hook(idx, value, position) if factor is None else scale_hook(idx, factor, position)


@dataclass
class InterventionHandle:
    """Handles of the forward hooks of one intervention; ``remove()`` undoes it."""

    handles: list

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()


@accepts_model(freeze=False)
def add_intervention(model: LoadedModel, neurons: Iterable, factor: float | None = 0.0,
                     value=None, position="auto") -> InterventionHandle:
    """Register an intervention on the Hugging Face module; call ``.remove()`` to undo it."""
    groups = group_by_layer(neurons, model.n_layers, model.d_mlp)
    position = _position(_model_position(model, position))
    handle = InterventionHandle([])
    try:
        for layer, idx in groups.items():
            handle.handles.append(model.adapter.patch_site(layer, _hook(idx, factor, value, position)))
    except BaseException:
        handle.remove()
        raise
    return handle


@accepts_model(freeze=False)
@contextmanager
def scale_neurons(model: LoadedModel, neurons: Iterable, factor: float,
                  position="auto") -> Iterator[InterventionHandle]:
    handle = add_intervention(model, neurons, factor=factor, position=position)
    try:
        yield handle
    finally:
        handle.remove()


@accepts_model(freeze=False)
@contextmanager
def set_neurons(model: LoadedModel, neurons: Iterable, value: float | torch.Tensor,
                position="auto") -> Iterator[InterventionHandle]:
    handle = add_intervention(model, neurons, factor=None, value=value, position=position)
    try:
        yield handle
    finally:
        handle.remove()


@accepts_model(freeze=False)
def suppress(model: LoadedModel, neurons: Iterable, position="auto"):
    """Context manager: the neurons' activations are set to zero (paper: suppression)."""
    return scale_neurons(model, neurons, 0.0, position)


@accepts_model(freeze=False)
def amplify(model: LoadedModel, neurons: Iterable, factor: float = 2.0, position="auto"):
    """Context manager: the neurons' activations are multiplied by ``factor`` (paper: x2)."""
    return scale_neurons(model, neurons, factor, position)
