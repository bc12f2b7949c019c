"""``wrap``: whatever the user holds (a Hugging Face module, a TransformerLens bridge, a folder, a
name) as a :class:`~kn_plugin.models.loaded.LoadedModel`; :func:`accepts_model` applies it to every public function."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.integrations.transformer_lens import bridge_tokenizer, is_bridge, offline_tokenizer
from kn_plugin.models.load import load_model
from kn_plugin.models.loaded import LoadedModel, _cached, _wrap_module
from kn_plugin.models.registry import BUILTIN_MODELS


def _folder_tokenizer(hf_model) -> Any | None:
    source = getattr(getattr(hf_model, "config", None), "_name_or_path", "") or ""
    return offline_tokenizer(source) if Path(source).is_dir() else None


def _check_tokenizer(tokenizer, what: str) -> None:
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise KnowledgeNeuronError(
            f"{what} needs a Hugging Face tokenizer (got {type(tokenizer).__name__}): pass tokenizer=..."
        )


def wrap(model, tokenizer=None, name: str | None = None) -> LoadedModel:
    """A :class:`LoadedModel` for what the user holds; idempotent.

    * ``LoadedModel``: returned as is;
    * a registry name or a folder: :func:`load_model`;
    * a TransformerLens ``TransformerBridge``: its Hugging Face model and tokenizer (the bridge
      is kept, so ``LoadedModel.bridge()`` returns it);
    * a Hugging Face ``...ForCausalLM`` / ``...ForMaskedLM`` module: with ``tokenizer``, or
      the tokenizer saved in the folder it was loaded from.

    The same module wrapped twice gives the same ``LoadedModel`` while that one is alive (unless
    another tokenizer is passed); kn_plugin keeps no strong reference to any model. Nothing
    about the module is changed: mode, gradients, hooks and attention implementation stay as
    they are.
    """
    if isinstance(model, LoadedModel):
        if tokenizer is not None and tokenizer is not model.tokenizer:
            _check_tokenizer(tokenizer, model.name)
            return _wrap_module(model.hf_model, tokenizer, name or model.name, model._bridge, model.path)
        return model
    if isinstance(model, (str, os.PathLike)):
        loaded = load_model(model)
        return wrap(loaded, tokenizer=tokenizer, name=name) if tokenizer is not None else loaded
    if is_bridge(model):
        hf_model = model.original_model
        tok = tokenizer
        if tok is None and _cached(hf_model) is not None:
            tok = _cached(hf_model).tokenizer
        if tok is None:
            tok = bridge_tokenizer(model)
        _check_tokenizer(tok, "the TransformerBridge")
        return _wrap_module(hf_model, tok, name, model, None)
    if isinstance(model, torch.nn.Module):
        cached = _cached(model)
        if cached is not None and (tokenizer is None or tokenizer is cached.tokenizer):
            return cached
        tok = tokenizer if tokenizer is not None else _folder_tokenizer(model)
        if tok is None:
            raise KnowledgeNeuronError(
                f"{type(model).__name__} came without a tokenizer: pass tokenizer=... (its Hugging Face "
                "tokenizer)"
            )
        _check_tokenizer(tok, type(model).__name__)
        return _wrap_module(model, tok, name, None, None)
    raise KnowledgeNeuronError(
        f"cannot use a {type(model).__name__} as a model: pass a Hugging Face model, a TransformerLens "
        f"TransformerBridge, a LoadedModel, a local folder or one of {', '.join(BUILTIN_MODELS)}"
    )


def accepts_model(fn=None, *, freeze: bool = True):
    """Decorator: the first argument may be anything :func:`wrap` takes (plus ``tokenizer=``);
    with ``freeze`` the call runs inside :meth:`LoadedModel.frozen`."""
    if fn is None:
        return functools.partial(accepts_model, freeze=freeze)

    @functools.wraps(fn)
    def inner(model, *args, tokenizer=None, **kwargs):
        loaded = wrap(model, tokenizer=tokenizer)
        if not freeze:
            return fn(loaded, *args, **kwargs)
        with loaded.frozen():
            return fn(loaded, *args, **kwargs)

    return inner
