"""Model-family adapters: the only place in kn_plugin that knows how a family is built.

An adapter answers, for one Hugging Face model:

* how many layers and FFN neurons it has (``n_layers``, ``d_mlp``);
* where the knowledge neurons live (the *site*): the post-activation FFN intermediate
  activation, i.e. the input of the second FFN projection (Llama-style gated MLPs:
  ``act(gate) * up`` entering ``mlp.down_proj``; GPT-2: the input of ``mlp.c_proj``) or the
  output of ``intermediate`` (BERT);
* the value slots: row ``j`` of ``value_slots(layer)`` ([d_mlp, d_model]) is what neuron ``j``
  writes into the residual stream (a *view* of the framework's weight, so edits act in place);
* whether targets are scored at a mask slot (masked LM) or as the next token (causal LM).

Adapters are picked by the module structure of the model, never by a model-type string.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kn_plugin.errors import KnowledgeNeuronError

SiteFn = Callable[[torch.Tensor], torch.Tensor]


def _unwrap(module: nn.Module) -> nn.Module:
    """TransformerLens' bridge wraps HF submodules; the wrapped module holds the parameters."""
    return getattr(module, "original_component", None) or module


class FamilyAdapter:
    """Base class. Subclasses implement ``matches`` and the structural accessors."""

    family: str = "base"
    masked: bool = False
    #: True when the neuron activation is the *input* of ``site_module`` (else its output)
    site_is_input: bool = True

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- structure -----------------------------------------------------------------------
    def layers(self) -> nn.ModuleList:  # pragma: no cover - abstract
        raise NotImplementedError

    def site_module(self, layer: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def value_slots(self, layer: int) -> torch.Tensor:  # pragma: no cover - abstract
        """[d_mlp, d_model] view of the value-slot weight of ``layer`` (shares storage)."""
        raise NotImplementedError

    @property
    def n_layers(self) -> int:
        return len(self.layers())

    @property
    def d_mlp(self) -> int:
        return self.value_slots(0).shape[0]

    @property
    def d_model(self) -> int:
        return self.value_slots(0).shape[1]

    def word_embeddings(self) -> torch.Tensor:
        """[vocab, d_model] input embedding matrix."""
        return self.model.get_input_embeddings().weight

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise KnowledgeNeuronError(
                f"layer {layer!r} out of range: this model has layers 0..{self.n_layers - 1}"
            )
        return layer

    # --- hooking -------------------------------------------------------------------------
    def patch_site(self, layer: int, fn: SiteFn) -> torch.utils.hooks.RemovableHandle:
        """Register ``fn(activation[batch, seq, d_mlp]) -> activation`` at the neuron site.

        Returns the hook handle; callers remove it in ``finally``.
        """
        module = self.site_module(self.check_layer(layer))
        if self.site_is_input:

            def pre_hook(_mod, args, kwargs):
                return (fn(args[0]), *args[1:]), kwargs

            return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def hook(_mod, _args, output):
            return fn(output)

        return module.register_forward_hook(hook)


class GatedMLPAdapter(FamilyAdapter):
    """Llama, Mistral, Qwen2, Gemma and relatives: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    family = "gated"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        base = getattr(model, "model", None)
        layers = getattr(base, "layers", None)
        if not layers:
            return False
        mlp = getattr(layers[0], "mlp", None)
        return all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def site_module(self, layer: int) -> nn.Module:
        return self.layers()[layer].mlp.down_proj

    def value_slots(self, layer: int) -> torch.Tensor:
        return _unwrap(self.site_module(layer)).weight.T  # Linear weight is [d_model, d_mlp]


class GPT2Adapter(FamilyAdapter):
    """GPT-2: ``c_proj(act(c_fc(x)))`` with Conv1D weights stored as [in, out]."""

    family = "gpt2"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        h = getattr(getattr(model, "transformer", None), "h", None)
        if not h:
            return False
        mlp = getattr(h[0], "mlp", None)
        return hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj")

    def layers(self) -> nn.ModuleList:
        return self.model.transformer.h

    def site_module(self, layer: int) -> nn.Module:
        return self.layers()[layer].mlp.c_proj

    def value_slots(self, layer: int) -> torch.Tensor:
        return _unwrap(self.site_module(layer)).weight  # Conv1D weight is [d_mlp, d_model]


class BertAdapter(FamilyAdapter):
    """BERT masked LM: neurons are the output of ``intermediate``; slots are columns of ``output.dense``."""

    family = "bert"
    masked = True
    site_is_input = False

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        enc = getattr(getattr(model, "bert", None), "encoder", None)
        layer = getattr(enc, "layer", None)
        return bool(layer) and hasattr(layer[0], "intermediate") and hasattr(layer[0], "output")

    def layers(self) -> nn.ModuleList:
        return self.model.bert.encoder.layer

    def site_module(self, layer: int) -> nn.Module:
        return self.layers()[layer].intermediate

    def value_slots(self, layer: int) -> torch.Tensor:
        return _unwrap(self.layers()[layer].output.dense).weight.T  # [d_model, d_mlp] -> view


ADAPTERS: list[type[FamilyAdapter]] = [GatedMLPAdapter, GPT2Adapter, BertAdapter]


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter whose structure matches ``model``; a clear error when none does."""
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls(model)
    raise KnowledgeNeuronError(
        f"no kn_plugin adapter for {type(model).__name__}: supported are gated-MLP decoders "
        "(Llama, Mistral, Qwen2, Gemma), GPT-2 and BERT masked LMs"
    )
