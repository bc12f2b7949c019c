"""Hand-written layer-by-layer forward pieces for the ``stepper`` IG engine.

Family knowledge, so it lives with the adapters. Each stepper re-implements one family's
layer split at the neuron site; it is offered for a model only when the modules it uses are
there (:meth:`FastStepper.applicable`), and the engine trusts it only after it reproduces the
model's own forward on the target probability (see ``kn_plugin.attribution``). Families
without a stepper, or whose stepper does not verify, use the model-agnostic ``cached`` engine,
which runs the model's own modules.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
from torch import nn

from kn_plugin.families.adapter import FamilyAdapter, resolve, unwrap

#
# A transformer layer is split at the neuron site:  pre(h) -> (mid, act, kv)  and
# post(act, mid) -> h_next.  ``mid`` is whatever the second half needs besides the neuron
# activation (the residual stream after attention, or BERT's attention output); ``kv`` are the
# keys and values of the new positions, so that a causal model can recompute only the last
# positions against the cached keys and values of the earlier ones.


def _sub(module: nn.Module, path: str) -> nn.Module:
    return unwrap(resolve(module, path, strict=True))


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past, start: int, scale: float) -> torch.Tensor:
    """:func:`causal_attention` of ``q`` over ``past`` (the keys and values of positions
    0..start-1, one row shared by every row of ``q``: [1, Hkv, start, hd] each, or None) followed by
    ``k``, ``v`` (the new positions). The shared past is read in place, never copied per row: its
    scores and its share of the output are products over all rows at once ([rows, hd] @ [hd, start]
    per key head) and only the new positions are attended row by row."""
    if past is None:
        return causal_attention(q, k, v, start, scale)
    pk, pv = past
    b, n_heads, seq, hd = q.shape
    n_kv, before = k.shape[1], pk.shape[2]
    groups = n_heads // n_kv
    q5 = q.reshape(b, n_kv, groups, seq, hd)
    by_head = q5.permute(1, 0, 2, 3, 4).reshape(n_kv, b * groups * seq, hd)
    past_scores = (by_head @ pk[0].transpose(-1, -2)).view(n_kv, b, groups, seq, before).permute(1, 0, 2, 3, 4)
    if seq == 1:  # one new position: its score and share are per-row products, not [1 x 1] matmuls
        new_scores = (q5 * k.unsqueeze(2)).sum(-1, keepdim=True) * scale  # [b, Hkv, g, 1, 1]
    else:
        new_scores = (q5 @ k.unsqueeze(2).transpose(-1, -2)) * scale  # [b, Hkv, g, S, S]
        later = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
        new_scores = new_scores.masked_fill(later, torch.finfo(new_scores.dtype).min)
    probs = torch.cat([past_scores * scale, new_scores], -1).softmax(-1)
    p_past = probs[..., :before].permute(1, 0, 2, 3, 4).reshape(n_kv, b * groups * seq, before)
    out = (p_past @ pv[0]).view(n_kv, b, groups, seq, hd).permute(1, 0, 2, 3, 4)
    new = probs[..., before:]
    out = out + (new * v.unsqueeze(2) if seq == 1 else new @ v.unsqueeze(2))  # [b, Hkv, g, S, hd]
    return out.reshape(b, n_heads, seq, hd).transpose(1, 2).reshape(b, seq, n_heads * hd)


class FastStepper:
    """Forward pieces of one family (see the comment above)."""

    causal = True
    #: paths that must exist: inside every layer, and from the model
    layer_paths: tuple[str, ...] = ()
    model_paths: tuple[str, ...] = ()
    site_path: str = ""
    #: path of the final norm before the LM head ("": the head is more than norm + linear)
    final_norm: str = ""
    #: the submodule of a layer whose input is ``mid`` in the model's own forward ("": none is),
    #: so that the clean states can be read from that forward instead of run again
    mid_path: str = ""

    def __init__(self, adapter: FamilyAdapter):
        self.adapter = adapter
        self.model = adapter.model

    @classmethod
    def applicable(cls, adapter: FamilyAdapter) -> bool:
        """True when the model has every module this stepper calls (it is verified later)."""
        if adapter.site.path != cls.site_path or adapter.masked == cls.causal:
            return False
        layer = adapter.layers()[0]
        return (all(resolve(layer, p) is not None for p in cls.layer_paths)
                and all(resolve(adapter.model, p) is not None for p in cls.model_paths))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def pre(self, layer: int, h: torch.Tensor, past, start: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def post(self, layer: int, act: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
        """Residual stream after ``layer``: ``mid`` plus the FFN output projection of ``act``."""
        return mid + _sub(self.adapter.layers()[layer], self.site_path)(act)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(_sub(self.model, self.final_norm)(h))

    def unembedding(self) -> tuple[Callable, torch.Tensor, torch.Tensor | None] | None:
        """``(final_norm, W_U [vocab, d_model], bias)`` when ``logits(h) = final_norm(h) @ W_U.T
        + bias``; lets the engine score targets without materialising extra [rows, vocab]
        tensors. None when the head is more than that (BERT's transform)."""
        if not self.final_norm:
            return None
        head = unwrap(self.model.get_output_embeddings())
        return _sub(self.model, self.final_norm), head.weight, head.bias


class GatedStepper(FastStepper):
    """Llama-style decoder: rotary attention, ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    site_path = "mlp.down_proj"
    layer_paths = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "input_layernorm", "post_attention_layernorm")
    model_paths = ("model.rotary_emb", "model.norm")
    final_norm = "model.norm"
    mid_path = "post_attention_layernorm"
    #: modules and config fields this stepper does not implement: such models use ``cached``
    absent_paths = ("self_attn.q_norm", "self_attn.k_norm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm")
    absent_config = ("logits_scaling", "residual_multiplier", "embedding_multiplier",
                     "attention_multiplier", "no_rope_layers", "final_logit_softcapping",
                     "attn_logit_softcapping")

    @classmethod
    def applicable(cls, adapter):
        if not super().applicable(adapter):
            return False
        cfg = adapter.model.config
        layer = adapter.layers()[0]
        window = getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True)
        rope = getattr(cfg, "rope_parameters", None) or {}
        partial = {getattr(cfg, "partial_rotary_factor", None), rope.get("partial_rotary_factor")} - {None, 1}
        return (not window and not partial
                and all(resolve(layer, p) is None for p in cls.absent_paths)
                and all(getattr(cfg, name, None) is None for name in cls.absent_config))

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
        mid = h + _sub(attn, "o_proj")(attention(q, k, v, past, start, self.scale))
        mlp = _sub(blk, "mlp")
        y = _sub(blk, "post_attention_layernorm")(mid)
        act = mlp.act_fn(_sub(mlp, "gate_proj")(y)) * _sub(mlp, "up_proj")(y)
        return mid, act, (k, v)



class GPT2Stepper(FastStepper):
    """GPT-2: learned positions, fused ``c_attn`` Conv1D, ``c_proj(act(c_fc(x)))``."""

    site_path = "mlp.c_proj"
    layer_paths = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc")
    model_paths = ("transformer.wte", "transformer.wpe", "transformer.ln_f")
    final_norm = "transformer.ln_f"
    mid_path = "ln_2"

    @classmethod
    def applicable(cls, adapter):
        return adapter.layout == "conv1d" and super().applicable(adapter)

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
        scale = (1 / math.sqrt(self.head_dim)) if self.scale_weights else 1.0
        if self.inverse_layer:
            scale /= layer + 1
        mid = h + _sub(blk, "attn.c_proj")(attention(q, k, v, past, start, scale))
        mlp = _sub(blk, "mlp")
        act = mlp.act(_sub(mlp, "c_fc")(_sub(blk, "ln_2")(mid)))
        return mid, act, (k, v)



class BertStepper(FastStepper):
    """Bidirectional: every position changes above the patched layer, so ``pre`` sees them all."""

    causal = False
    site_path = "output.dense"
    layer_paths = ("attention", "intermediate", "output")
    model_paths = ("bert.embeddings", "cls")

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


#: the hand-written steppers by the structure they implement; :func:`stepper_for` takes the first that applies
STEPPERS: dict[str, type[FastStepper]] = {"gated": GatedStepper, "gpt2": GPT2Stepper, "bert": BertStepper}


def stepper_for(adapter: FamilyAdapter) -> FastStepper | None:
    """The hand-written stepper whose modules this model has, or None."""
    for cls in STEPPERS.values():
        if cls.applicable(adapter):
            return cls(adapter)
    return None
