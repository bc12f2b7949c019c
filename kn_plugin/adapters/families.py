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

import math
import sys
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

    def fast_stepper(self) -> FastStepper | None:
        """Layer-by-layer forward pieces for the fast IG engine, or None when unsupported."""
        return None

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

    def fast_stepper(self) -> FastStepper | None:
        return GatedStepper(self)


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

    def fast_stepper(self) -> FastStepper | None:
        return GPT2Stepper(self)


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

    def fast_stepper(self) -> FastStepper | None:
        return BertStepper(self)


# --- layer-by-layer forward pieces for the fast IG engine -----------------------------------
#
# A transformer layer is split at the neuron site:  pre(h) -> (mid, act, kv)  and
# post(act, mid) -> h_next.  ``mid`` is whatever the second half needs besides the neuron
# activation (the residual stream after attention, or BERT's attention output); ``kv`` are the
# keys and values of the new positions, so that a causal model can recompute only the last
# positions against the cached keys and values of the earlier ones.


def _sub(module: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        module = getattr(_unwrap(module), name)
    return _unwrap(module)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                     scale: float) -> torch.Tensor:
    """q [b, H, S, hd] at absolute positions start..start+S-1; k, v [b, Hkv, T, hd] at 0..T-1.

    Grouped-query attention by broadcasting (H = Hkv * groups); returns [b, S, H * hd].
    """
    b, n_heads, seq, hd = q.shape
    n_kv, total = k.shape[1], k.shape[2]
    q = q.reshape(b, n_kv, n_heads // n_kv, seq, hd)
    scores = (q @ k.unsqueeze(2).transpose(-1, -2)) * scale  # [b, Hkv, g, S, T]
    q_pos = torch.arange(start, start + seq, device=q.device)[:, None]
    k_pos = torch.arange(total, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, torch.finfo(scores.dtype).min)
    out = scores.softmax(-1) @ v.unsqueeze(2)  # [b, Hkv, g, S, hd]
    return out.reshape(b, n_heads, seq, hd).transpose(1, 2).reshape(b, seq, n_heads * hd)


def _with_past(past, k, v):
    if past is None:
        return k, v
    pk, pv = past
    b = k.shape[0]
    return (torch.cat([pk.expand(b, -1, -1, -1), k], 2), torch.cat([pv.expand(b, -1, -1, -1), v], 2))


class FastStepper:
    """Forward pieces of one family (see the comment above)."""

    causal = True

    def __init__(self, adapter: FamilyAdapter):
        self.adapter = adapter
        self.model = adapter.model

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def pre(self, layer: int, h: torch.Tensor, past, start: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def post(self, layer: int, act: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def unembedding(self) -> tuple[Callable, torch.Tensor, torch.Tensor | None] | None:
        """``(final_norm, W_U [vocab, d_model], bias)`` when ``logits(h) = final_norm(h) @ W_U.T
        + bias``; lets the engine score targets without materialising extra [rows, vocab]
        tensors. None when the head is more than that (BERT's transform)."""
        return None


class GatedStepper(FastStepper):
    def __init__(self, adapter):
        super().__init__(adapter)
        cfg = self.model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        attn = _sub(adapter.layers()[0], "self_attn")
        self.head_dim = getattr(attn, "head_dim", cfg.hidden_size // self.n_heads)
        self.scale = getattr(attn, "scaling", self.head_dim ** -0.5)
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.rotary = _sub(self.model, "model.rotary_emb")

    def embed(self, ids):
        return self.model.get_input_embeddings()(ids)

    def pre(self, layer, h, past, start):
        blk = self.adapter.layers()[layer]
        attn = _sub(blk, "self_attn")
        b, seq, _ = h.shape
        x = _sub(blk, "input_layernorm")(h)
        q = _sub(attn, "q_proj")(x).view(b, seq, -1, self.head_dim).transpose(1, 2)
        k = _sub(attn, "k_proj")(x).view(b, seq, -1, self.head_dim).transpose(1, 2)
        v = _sub(attn, "v_proj")(x).view(b, seq, -1, self.head_dim).transpose(1, 2)
        pos = torch.arange(start, start + seq, device=h.device)[None]
        cos, sin = self.rotary(x, pos)
        q, k = self.rope(q, k, cos, sin)
        kk, vv = _with_past(past, k, v)
        mid = h + _sub(attn, "o_proj")(causal_attention(q, kk, vv, start, self.scale))
        mlp = _sub(blk, "mlp")
        y = _sub(blk, "post_attention_layernorm")(mid)
        act = mlp.act_fn(_sub(mlp, "gate_proj")(y)) * _sub(mlp, "up_proj")(y)
        return mid, act, (k, v)

    def post(self, layer, act, mid):
        return mid + _sub(self.adapter.layers()[layer], "mlp.down_proj")(act)

    def logits(self, h):
        return self.model.get_output_embeddings()(_sub(self.model, "model.norm")(h))

    def unembedding(self):
        head = _unwrap(self.model.get_output_embeddings())
        return _sub(self.model, "model.norm"), head.weight, head.bias


class GPT2Stepper(FastStepper):
    def __init__(self, adapter):
        super().__init__(adapter)
        cfg = self.model.config
        self.n_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.scale_weights = getattr(cfg, "scale_attn_weights", True)
        self.inverse_layer = getattr(cfg, "scale_attn_by_inverse_layer_idx", False)

    def embed(self, ids):
        tr = _sub(self.model, "transformer")
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        return _sub(tr, "wte")(ids) + _sub(tr, "wpe")(pos)

    def pre(self, layer, h, past, start):
        blk = self.adapter.layers()[layer]
        b, seq, d = h.shape
        x = _sub(blk, "ln_1")(h)
        q, k, v = _sub(blk, "attn.c_attn")(x).split(d, dim=-1)
        q, k, v = (t.view(b, seq, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        kk, vv = _with_past(past, k, v)
        scale = (1 / math.sqrt(self.head_dim)) if self.scale_weights else 1.0
        if self.inverse_layer:
            scale /= layer + 1
        mid = h + _sub(blk, "attn.c_proj")(causal_attention(q, kk, vv, start, scale))
        mlp = _sub(blk, "mlp")
        act = mlp.act(_sub(mlp, "c_fc")(_sub(blk, "ln_2")(mid)))
        return mid, act, (k, v)

    def post(self, layer, act, mid):
        return mid + _sub(self.adapter.layers()[layer], "mlp.c_proj")(act)

    def logits(self, h):
        return self.model.get_output_embeddings()(_sub(self.model, "transformer.ln_f")(h))

    def unembedding(self):
        head = _unwrap(self.model.get_output_embeddings())
        return _sub(self.model, "transformer.ln_f"), head.weight, head.bias


class BertStepper(FastStepper):
    """Bidirectional: every position changes above the patched layer, so ``pre`` sees them all."""

    causal = False

    def embed(self, ids):
        return _sub(self.model, "bert.embeddings")(input_ids=ids)

    def pre(self, layer, h, past, start):
        blk = self.adapter.layers()[layer]
        out = _sub(blk, "attention")(h)
        mid = out[0] if isinstance(out, tuple) else out
        return mid, _sub(blk, "intermediate")(mid), None

    def post(self, layer, act, mid):
        return _sub(self.adapter.layers()[layer], "output")(act, mid)

    def logits(self, h):
        return _sub(self.model, "cls")(h)


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
