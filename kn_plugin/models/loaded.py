"""A model as kn_plugin uses it: :class:`LoadedModel` (its family adapter, fingerprint and frozen
state), one per module the user holds."""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kn_plugin.families.adapter import FamilyAdapter, adapter_for
from kn_plugin.integrations.transformer_lens import boot_bridge


@dataclass
class LoadedModel:
    """A model ready for knowledge-neuron work: the Hugging Face module, its tokenizer and adapter.

    ``bridge()`` returns a TransformerLens ``TransformerBridge`` over the *same* weights.
    """

    name: str
    path: Path | None
    hf_model: torch.nn.Module
    tokenizer: Any
    adapter: FamilyAdapter
    _bridge: Any = field(default=None, repr=False)
    _frozen_depth: int = field(default=0, repr=False)
    #: engine paths that failed verification on this model (not tried again)
    failed_paths: set = field(default_factory=set, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)
    _signature: str | None = field(default=None, repr=False)
    _tensors: list | None = field(default=None, repr=False)
    _buffer_names: list | None = field(default=None, repr=False)

    def __post_init__(self):
        # the tensors as loaded, for weights_digest: a TransformerLens bridge booted later
        # re-nests the modules (new names) over the same tensors
        # (parameters stay the same objects through .to(); buffers are looked up each time)
        self._tensors = list(self.hf_model.named_parameters())
        self._buffer_names = [n for n, _ in self.hf_model.named_buffers()]

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def d_mlp(self) -> int:
        return self.adapter.d_mlp

    @property
    def is_masked(self) -> bool:
        return self.adapter.masked

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def fingerprint(self) -> str:
        """Identity of the model, independent of its display name, dtype, device and of
        value-slot edits: architecture, sizes, and a hash of the token embeddings and of the
        first and last layers' weights other than the value slots, rounded to bfloat16 (so
        that fp32 and bf16 loads of one checkpoint agree)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for t in self._identity_tensors():
                digest.update(t.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
            self._fingerprint = f"{self._arch()}:{digest.hexdigest()[:16]}"
        return self._fingerprint

    @property
    def signature(self) -> str:
        """Identity of the model in every dtype, beside :attr:`fingerprint` (which float16 changes:
        rounding to float16 first moves some values across a bfloat16 rounding boundary): the
        sign bits of the same tensors, which every float dtype keeps (an underflow to zero
        keeps its sign). Like the fingerprint it ignores value-slot edits."""
        if self._signature is None:

            digest = hashlib.sha256(b"signs")
            for t in self._identity_tensors():
                digest.update(np.packbits(torch.signbit(t.detach()).cpu().numpy()).tobytes())
            self._signature = f"{self._arch()}:signs:{digest.hexdigest()[:16]}"
        return self._signature

    def made(self, fingerprint: str | None, signature: str | None = None) -> bool:
        """Whether a file naming ``fingerprint`` (and ``signature``, where it records one) was
        made with this model, loaded in this or another dtype."""
        return fingerprint == self.fingerprint or (signature is not None and signature == self.signature)

    def _arch(self) -> str:
        return f"{type(self.hf_model).__name__}:{self.n_layers}x{self.d_mlp}x{self.adapter.d_model}"

    def _identity_tensors(self) -> list[torch.Tensor]:
        """The token embeddings and the first and last layers' weights other than the value slots."""
        slots = {self.adapter.value_slots(i).data_ptr() for i in range(self.n_layers)}
        layers = self.adapter.layers()
        tensors = [self.hf_model.get_input_embeddings().weight]
        for layer in (layers[0], layers[-1]):
            tensors += [p for p in layer.parameters() if p.data_ptr() not in slots]
        return tensors

    def weights_digest(self) -> str:
        """Hash of every parameter and buffer exactly as held now (dtype included), unlike
        :attr:`fingerprint`: it changes with any edit, so result folders and Ray workers can
        tell an edited or differently loaded copy from the model that made their results."""
        digest = hashlib.sha256(str(self.dtype).encode())
        with torch.no_grad():
            now = {n.replace("._original_component", ""): b for n, b in self.hf_model.named_buffers()}
            buffers = [(n, now[n]) for n in self._buffer_names if n in now]
            for name, t in self._tensors + buffers:
                digest.update(name.encode())
                t = t.detach().contiguous().cpu().reshape(-1)  # 0-dim buffers (Gemma's scales) too
                digest.update(str(t.dtype).encode())
                digest.update((t.view(torch.uint8) if t.dtype != torch.bool else t).numpy().tobytes())
        return digest.hexdigest()[:16]

    def identity(self) -> dict:
        """What a result folder records of the model that filled it: fingerprint, dtype and the
        digest of its weights as they are now."""
        return {"model": self.fingerprint, "dtype": str(self.dtype).removeprefix("torch."),
                "weights": self.weights_digest()}

    @contextlib.contextmanager
    def frozen(self) -> Iterator[LoadedModel]:
        """Eval mode and no weight gradients inside; every module's ``training`` flag and every
        parameter's ``requires_grad`` are restored on exit, also when the block raises."""
        if self._frozen_depth:
            self._frozen_depth += 1
            try:
                yield self
            finally:
                self._frozen_depth -= 1
            return
        modes = [(m, m.training) for m in self.hf_model.modules()]
        grads = [(p, p.requires_grad) for p in self.hf_model.parameters()]
        self._frozen_depth = 1
        try:
            self.hf_model.eval()
            for p, _ in grads:
                p.requires_grad_(False)
            yield self
        finally:
            self._frozen_depth = 0
            for m, mode in modes:
                m.training = mode
            for p, flag in grads:
                p.requires_grad_(flag)

    def bridge(self):
        """The TransformerLens 4.x ``TransformerBridge`` sharing this model's weights (cached).

        Booting a bridge switches the Hugging Face model to eager attention (TransformerLens
        does that to expose attention patterns); it is the bridge the user asked for."""
        if self._bridge is None:
            self._bridge = boot_bridge(self.hf_model, self.tokenizer, str(self.path or self.name), self.device,
                                       self.dtype)
        return self._bridge


#: hf module -> weak reference to its LoadedModel: nothing here keeps a model alive
_WRAPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached(hf_model) -> LoadedModel | None:
    ref = _WRAPPED.get(hf_model)
    return ref() if ref is not None else None


def _wrap_module(hf_model, tokenizer, name, bridge, path) -> LoadedModel:
    cached = _cached(hf_model)
    if cached is not None and cached.tokenizer is tokenizer:
        if bridge is not None and cached._bridge is None:
            cached._bridge = bridge
        return cached
    source = getattr(getattr(hf_model, "config", None), "_name_or_path", "") or ""
    if path is None and source and Path(source).is_dir():
        path = Path(source)
    label = name or (path.name if path else None) or source or type(hf_model).__name__
    loaded = LoadedModel(name=label, path=path, hf_model=hf_model, tokenizer=tokenizer,
                         adapter=None, _bridge=bridge)  # type: ignore[arg-type]
    with loaded.frozen():
        loaded.adapter = adapter_for(hf_model)
    _WRAPPED[hf_model] = weakref.ref(loaded)
    return loaded
