"""Captum adapter: one layer's knowledge neurons as a Captum layer target.

``captum_target(model, prompt, target, layer)`` returns a :class:`CaptumTarget` whose
``forward_func``/``layer``/``inputs``/``baselines`` plug straight into Captum's layer methods::

    t = captum_target(hf_model, "The capital of France is", " Paris", layer=5, tokenizer=tok)
    lig = LayerIntegratedGradients(t.forward_func, t.layer)
    scores = lig.attribute(t.inputs, baselines=t.baselines, n_steps=20,
                           method="riemann_right")          # [1, d_mlp]

How it realises the paper's baseline: ``t.layer`` is a small identity module that carries the
FFN activation *at the prediction position only*. ``forward_func`` takes a gate of shape
[batch, 1]: the activation at that position is multiplied by the gate before it passes
through ``t.layer``. With ``inputs = 1`` and ``baselines = 0``, the layer activation is the
real one for the input and exactly zero for the baseline, while every other position and
layer stays untouched. Captum then interpolates in layer space, which is the paper's IG.
LayerActivation, LayerGradientXActivation and LayerConductance accept the same target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kn_plugin.models import LoadedModel, accepts_model
from kn_plugin.scoring import EncodedFact, encode_fact, target_log_prob


class NeuronSite(nn.Module):
    """Identity module through which one layer's FFN activation at the prediction position flows."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer_index = layer

    def forward(self, activation: torch.Tensor) -> torch.Tensor:  # [batch, d_mlp]
        return activation

    def extra_repr(self) -> str:
        return f"layer={self.layer_index}"


@dataclass
class CaptumTarget:
    """Everything a Captum layer method needs for one layer of one fact."""

    forward_func: Callable[[torch.Tensor], torch.Tensor]
    layer: NeuronSite
    inputs: torch.Tensor  # [1, 1] ones
    baselines: torch.Tensor  # [1, 1] zeros
    fact: EncodedFact
    layer_index: int


def gated_forward(model: LoadedModel, fact: EncodedFact, layer: int, site: nn.Module):
    """``forward_func(gate[batch, 1]) -> P(target)[batch]`` with the gate applied at ``layer``."""

    def forward_func(gate: torch.Tensor) -> torch.Tensor:
        batch = gate.shape[0]
        ids = fact.input_ids.expand(batch, -1)

        def patch(act: torch.Tensor) -> torch.Tensor:
            act = act.clone()
            act[:, fact.pred_pos] = site(act[:, fact.pred_pos] * gate.to(act.dtype))
            return act

        with model.frozen(), model.adapter.patched({layer: patch}):
            logits = model.hf_model(ids).logits
        return target_log_prob(logits, fact).exp()

    return forward_func


@accepts_model(freeze=False)
def captum_target(model: LoadedModel, prompt, target: str | None, layer: int) -> CaptumTarget:
    """Build the Captum target for ``layer``'s FFN neurons on a cloze fact.

    ``model``: anything :func:`kn_plugin.wrap` takes (pass ``tokenizer=`` with a bare Hugging
    Face module); ``prompt``: text, token ids or an ``EncodedFact``. ``forward_func`` runs the
    model in eval mode without weight gradients and restores its mode after every call."""
    fact = encode_fact(model, prompt, target)
    model.adapter.check_layer(layer)
    site = NeuronSite(layer)
    device = model.device
    return CaptumTarget(
        forward_func=gated_forward(model, fact, layer, site),
        layer=site,
        inputs=torch.ones(1, 1, device=device),
        baselines=torch.zeros(1, 1, device=device),
        fact=fact,
        layer_index=layer,
    )
