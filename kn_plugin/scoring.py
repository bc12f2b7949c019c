"""Knowledge assessing: how strongly a model predicts a target for a cloze prompt.

Scoring rule (the same everywhere in kn_plugin):

* **Causal LMs**: the prompt is a prefix and the target is its continuation (write the
  leading space yourself: ``" Paris"``). The *prediction position* is the last prompt token.
  A target of n tokens is scored by teacher forcing on ``prompt + target[:-1]``:
  ``P(t) = prod_i P(t_i | prompt, t_<i)``.
* **Masked LMs**: the prompt holds the tokenizer's mask token (``[MASK]``) once. For a target
  of n word pieces the mask is widened to n masks, and ``P(t) = prod_i P(t_i at mask_i)``
  (all masks predicted jointly in one pass). The prediction position is the first mask.

Tokenization is one rule whichever object holds the model (a Hugging Face module, a
TransformerLens bridge, a registry name): a **text** prompt is tokenized by the model's
Hugging Face tokenizer as ``tokenizer(prompt)``, with the special tokens that tokenizer adds
itself (none for SmolLM2, a BOS for Gemma), which is what ``model.generate`` sees. A prompt
given as **token ids** (a list, a 1-D tensor or a [1, seq] tensor, e.g. from
``bridge.to_tokens``) is used exactly as given. ``bridge.to_tokens`` prepends a BOS that
some tokenizers (SmolLM2's) do not add to text: such ids are kept, and a warning says that
the scores then differ from those of the text prompt.

Rank and top-k always refer to the first target token at the prediction position.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.models import LoadedModel, accepts_model


@dataclass(frozen=True)
class EncodedFact:
    """A prompt/target pair turned into model input.

    ``input_ids``: [1, seq]; ``score_positions[i]`` is the position whose logits score
    ``target_ids[i]``; ``pred_pos`` is where knowledge neurons are read and patched.
    """

    prompt: str
    target: str
    input_ids: torch.Tensor
    target_ids: tuple[int, ...]
    score_positions: tuple[int, ...]
    pred_pos: int

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


@dataclass(frozen=True)
class Assessment:
    prompt: str
    target: str
    prob: float
    log_prob: float
    rank: int  # rank of the first target token at the prediction position (0 = top)
    top_k: list[tuple[str, float]]
    n_target_tokens: int


def max_len(model: LoadedModel) -> int | None:
    """The model's context in tokens (its position table), or None when it has none."""
    cfg = model.hf_model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _prompt_ids(model: LoadedModel, prompt) -> tuple[list[int], str] | None:
    """Token ids given as the prompt (list, 1-D or [1, seq] tensor) and their text; None for text."""
    if isinstance(prompt, str):
        return None
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1 or prompt.is_floating_point() or prompt.dtype == torch.bool:
            raise KnowledgeNeuronError(
                f"a prompt given as tokens must be one sequence of integer ids, got shape {tuple(prompt.shape)}"
            )
        ids = prompt.tolist()
    elif isinstance(prompt, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool)
                                                   for i in prompt):
        ids = list(prompt)
    else:
        raise KnowledgeNeuronError(f"the prompt must be text or token ids, got {type(prompt).__name__}")
    if not ids:
        raise KnowledgeNeuronError("the prompt is empty")
    vocab = model.adapter.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
        raise KnowledgeNeuronError(f"prompt token ids must be in 0..{vocab - 1}")
    _check_padding(model.tokenizer, ids)
    _warn_bos(model.tokenizer, ids)
    return ids, model.tokenizer.decode(ids)


def _check_padding(tok, ids: list[int]) -> None:
    """Token ids padded for a batch (``bridge.to_tokens([p1, p2])``, ``tokenizer([...],
    padding=True)``) would be scored at a pad token: refuse them. A leading pad id that is also
    the BOS (GPT-2's ``<|endoftext|>``) is a BOS, not padding."""
    pad = getattr(tok, "pad_token_id", None)
    if pad is None:
        return
    bos = getattr(tok, "bos_token_id", None)
    if ids[-1] == pad or (ids[0] == pad and pad != bos):
        side = "end" if ids[-1] == pad else "start"
        raise KnowledgeNeuronError(
            f"the prompt's token ids {side} with the pad token {tok.convert_ids_to_tokens(pad)!r}: a padded batch "
            "would be scored at its padding; pass each prompt as text or as its own unpadded ids")


def _warn_bos(tok, ids: list[int]) -> None:
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        return
    adds = tok("a")["input_ids"][:1] == [bos]
    if ids[0] == bos and not adds:
        warnings.warn("the prompt ids start with a BOS token, which this tokenizer does not add to text "
                      "(bridge.to_tokens does): kept as given, so the scores differ from the text prompt's",
                      UserWarning, stacklevel=4)
    elif ids[0] != bos and adds:
        warnings.warn("the prompt ids lack the BOS token this tokenizer adds to text: kept as given, so "
                      "the scores differ from the text prompt's", UserWarning, stacklevel=4)


def _warn_target(model: LoadedModel, prompt: str, target: str, target_ids: list[int], text: bool) -> None:
    tok = model.tokenizer
    unk = getattr(tok, "unk_token_id", None)
    if unk is not None and unk in target_ids and not target.strip() == tok.unk_token:
        warnings.warn(f"the target {target!r} has word pieces the tokenizer maps to {tok.unk_token!r}: its "
                      f"probability is that of the unknown token", UserWarning, stacklevel=4)
    if (not model.is_masked and text and not target[:1].isspace() and not prompt[-1:].isspace()
            and target[:1].isalnum()):
        warnings.warn(f"the target {target!r} has no leading space: a causal LM then scores it glued to the "
                      f"prompt's last word; write {' ' + target!r} for the next word", UserWarning, stacklevel=4)


def _check_text(what: str, text: str) -> None:
    """Text a tokenizer can read: valid Unicode (no lone surrogates, such as the ones Python
    makes of command-line bytes that are not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise KnowledgeNeuronError(f"the {what} {text!r} is not valid Unicode text "
                                   f"(character {exc.start}: {text[exc.start]!r}); pass UTF-8 text") from None


@accepts_model(freeze=False)
def encode_fact(model: LoadedModel, prompt, target: str | None = None) -> EncodedFact:
    """Tokenize a fact under the scoring rule above, with clear errors for bad input.

    ``prompt`` is text or token ids (used as given); an ``EncodedFact`` is returned as is."""
    if isinstance(prompt, EncodedFact):
        if target is not None and target != prompt.target:
            raise KnowledgeNeuronError(f"the fact's target is {prompt.target!r}, not {target!r}")
        return prompt
    tok = model.tokenizer
    given = _prompt_ids(model, prompt)
    if given is None and (not isinstance(prompt, str) or not prompt.strip()):
        raise KnowledgeNeuronError("the prompt is empty")
    if not isinstance(target, str):
        raise KnowledgeNeuronError("the target must be a string")
    for what, text in (("prompt", prompt if given is None else ""), ("target", target)):
        _check_text(what, text)
    target_ids = tok(target, add_special_tokens=False)["input_ids"]
    if not target.strip() or not target_ids:
        raise KnowledgeNeuronError(f"the target {target!r} tokenizes to nothing")
    special = set(getattr(tok, "all_special_ids", []) or []) - {tok.unk_token_id}  # [UNK]: warned below
    if special & set(target_ids):
        raise KnowledgeNeuronError(f"the target {target!r} holds a special token "
                                   f"({', '.join(tok.convert_ids_to_tokens(sorted(special & set(target_ids))))}): "
                                   "a fact's object is text the model writes, not a control token")
    text = given[1] if given else prompt
    _warn_target(model, text, target, target_ids, given is None)
    if model.is_masked:
        mask = tok.mask_token
        if given:
            ids_list = given[0]
            if mask is None or ids_list.count(tok.mask_token_id) != 1:
                raise KnowledgeNeuronError(f"a masked-model prompt needs exactly one mask token {mask!r}")
            at = ids_list.index(tok.mask_token_id)
            ids = torch.tensor([ids_list[:at] + [tok.mask_token_id] * len(target_ids) + ids_list[at + 1:]])
        else:
            if mask is None or prompt.count(mask) != 1:
                raise KnowledgeNeuronError(
                    f"a masked-model prompt needs exactly one mask slot {mask!r}: {prompt!r}"
                )
            widened = prompt.replace(mask, " ".join([mask] * len(target_ids)))
            ids = tok(widened, return_tensors="pt")["input_ids"]
        positions = (ids[0] == tok.mask_token_id).nonzero().flatten().tolist()
        if len(positions) != len(target_ids):
            raise KnowledgeNeuronError(f"could not place {len(target_ids)} mask slots in {text!r}")
        pred_pos = positions[0]
    else:
        prompt_ids = torch.tensor([given[0]]) if given else tok(prompt, return_tensors="pt")["input_ids"]
        if prompt_ids.shape[1] == 0:
            raise KnowledgeNeuronError(f"the prompt {prompt!r} tokenizes to nothing")
        ids = torch.cat([prompt_ids, torch.tensor([target_ids[:-1]], dtype=prompt_ids.dtype)], 1)
        pred_pos = prompt_ids.shape[1] - 1
        positions = list(range(pred_pos, pred_pos + len(target_ids)))
    vocab = model.adapter.vocab_size
    if int(ids.max()) >= vocab or max(target_ids) >= vocab:
        raise KnowledgeNeuronError(
            f"the tokenizer gives token id {max(int(ids.max()), max(target_ids))}, beyond the model's vocabulary of "
            f"{vocab}: the tokenizer ({len(tok)} tokens) is not this model's")
    limit = max_len(model)
    if limit is not None and ids.shape[1] > limit:
        raise KnowledgeNeuronError(
            f"prompt plus target is {ids.shape[1]} tokens, longer than the model's context of {limit}"
        )
    return EncodedFact(text, target, ids.long().to(model.device), tuple(target_ids), tuple(positions),
                       pred_pos)


def sequence_log_prob(logits: torch.Tensor, target_ids: tuple[int, ...]) -> torch.Tensor:
    """sum_i log softmax(logits[:, i])[target_ids[i]]: logits [batch, n_tgt, vocab] -> [batch]."""
    tgt = torch.tensor(target_ids, device=logits.device)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp[:, torch.arange(len(tgt), device=logits.device), tgt].sum(-1)


def target_log_prob(logits: torch.Tensor, fact: EncodedFact) -> torch.Tensor:
    """log P(target) from logits [batch, seq, vocab] -> [batch] under the scoring rule."""
    pos = torch.tensor(fact.score_positions, device=logits.device)
    return sequence_log_prob(logits[:, pos], fact.target_ids)


def cache_kwarg(hf_model) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (earlier 5.x), as the forward takes."""
    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


def cache_key_values(cache, n_layers: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer ``(keys, values)`` [1, kv_heads, seq_len, head_dim] held by a transformers cache
    of a whole prompt of ``seq_len`` positions; None where the cache holds anything else (none,
    another layout, a window of the positions)."""
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) != n_layers:
        return None
    out = []
    for layer in layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == v.dim() == 4
                and k.shape[0] == v.shape[0] == 1 and k.shape[2] == v.shape[2] == seq_len):
            return None
        out.append((k, v))
    return out


def prefix_cache(cache, start: int):
    """A copy of a transformers key/value cache of a whole prompt, cut to its first ``start``
    positions; None where that cannot be done exactly (no cache, a layer whose sliding window
    the prompt filled, a cache without ``crop``)."""
    if cache is None or not hasattr(cache, "crop") or not hasattr(cache, "get_seq_length"):
        return None
    total = cache.get_seq_length()
    layers = getattr(cache, "layers", None) or ()
    if total < start or any(getattr(layer, "is_sliding", False)
                            and not getattr(layer, "sliding_window", 0) > total for layer in layers):
        return None
    past = copy.deepcopy(cache)
    if total > start:
        try:
            past.crop(start - total)  # a negative count removes that many positions
        except (ValueError, RuntimeError, TypeError):
            return None
    return past if past.get_seq_length() == start else None


def logits_at(model: LoadedModel, ids: torch.Tensor, positions: Sequence[int], **forward) -> torch.Tensor:
    """The model's logits [batch, len(positions), vocab] at ``positions`` (distinct) of every
    row (``forward``: more arguments of the model's forward, e.g. a cache). The LM head runs on
    those positions only where the forward takes transformers' ``logits_to_keep``; otherwise
    (or if the model ignores it) on all of them."""
    return forward_at(model, ids, positions, **forward)[0]


def forward_at(model: LoadedModel, ids: torch.Tensor, positions: Sequence[int], **forward) -> tuple:
    """:func:`logits_at`, and the model's whole output (its cache, when asked for one)."""
    positions = list(positions)
    if len(set(positions)) != len(positions):
        raise KnowledgeNeuronError(f"logits_at needs distinct positions, got {positions}")
    pos = torch.tensor(positions, dtype=torch.long, device=ids.device)
    if "logits_to_keep" in inspect.signature(model.hf_model.forward).parameters:
        out = model.hf_model(ids, logits_to_keep=pos, **forward)
        if out.logits.shape[1] == len(positions):
            return out.logits, out
    else:
        out = model.hf_model(ids, **forward)
    if out.logits.shape[1] != ids.shape[1]:
        raise KnowledgeNeuronError(f"{model.name} returned logits for {out.logits.shape[1]} of {ids.shape[1]} positions")
    return out.logits[:, pos], out


@accepts_model
def assess(model: LoadedModel, prompt, target: str, k: int = 5) -> Assessment:
    """Probability, rank and top-k predictions of ``target`` for ``prompt``."""
    fact = encode_fact(model, prompt, target)
    with torch.no_grad():
        logits = model.hf_model(fact.input_ids).logits
    log_prob = target_log_prob(logits, fact)[0].item()
    probs = torch.softmax(logits[0, fact.pred_pos].float(), -1)
    rank = int((probs > probs[fact.target_ids[0]]).sum().item())
    top = torch.topk(probs, k)
    top_k = [(model.tokenizer.decode([i]), p) for i, p in zip(top.indices.tolist(), top.values.tolist())]
    return Assessment(prompt, target, float(torch.tensor(log_prob).exp()), log_prob, rank, top_k,
                      len(fact.target_ids))


@accepts_model
@torch.no_grad()
def top_prediction(model: LoadedModel, fact: EncodedFact) -> int:
    """Token id predicted at the prediction position."""
    return int(model.hf_model(fact.input_ids).logits[0, fact.pred_pos].argmax())
