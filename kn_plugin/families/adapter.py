"""Model-family adapters: the only place in kn_plugin that knows how a family is built.

An adapter answers, for one Hugging Face language model:

* how many layers and FFN neurons it has (``n_layers``, ``d_mlp``);
* where the knowledge neurons live (the *site*): the post-activation FFN intermediate
  activation, i.e. the **input of the FFN output projection** of every layer;
* the value slots: row ``j`` of ``value_slots(layer)`` ([d_mlp, d_model]) is what neuron ``j``
  writes into the residual stream (a *view* of the framework's weight, so edits act in place);
* whether targets are scored at a mask slot (masked LM) or as the next token (causal LM).

Family knowledge is data, :data:`SITES`: the path of the FFN output projection inside one
layer, for every supported family. Detection never guesses from a model-type string. It
looks for a ``ModuleList`` of layers that all hold one of those paths, and then *checks* what
it found with a probe forward of the model itself:

* the projection is a ``Linear`` or a GPT-2 ``Conv1D`` (which fixes the weight layout), and it
  runs exactly once per layer on the whole sequence (a mixture-of-experts router would not);
* its output equals ``input @ value_slots + bias`` (the slot layout is right);
* masked or causal: the model is bidirectional exactly when the last token changes the
  logits of the first position.

A model that fails any check is refused with one line naming the supported families.
Mixture-of-experts FFNs are refused before that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from kn_plugin.errors import KnowledgeNeuronError

SiteFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SiteSpec:
    """Where the FFN output projection sits inside one transformer layer."""

    path: str
    families: str


#: The neuron site of every supported family (the input of the module at ``path``).
SITES: tuple[SiteSpec, ...] = (
    SiteSpec("mlp.down_proj", "Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, Phi-3, OLMo, "
                              "OLMo 2, Granite, SmolLM3, StableLM, Cohere"),
    SiteSpec("mlp.c_proj", "GPT-2, GPT-Neo, GPT-BigCode, StarCoder2"),
    SiteSpec("mlp.fc_out", "GPT-J"),
    SiteSpec("mlp.dense_4h_to_h", "GPT-NeoX (Pythia), Falcon, BLOOM"),
    SiteSpec("mlp.fc2", "Phi"),
    SiteSpec("fc2", "OPT"),
    SiteSpec("output.dense", "BERT, RoBERTa, XLM-R, ELECTRA"),
    SiteSpec("ffn.lin2", "DistilBERT"),
)

#: Projections from a narrower token embedding to the residual stream (relative to the base
#: model): ELECTRA's ``embeddings_project``, OPT's ``project_in`` (``word_embed_proj_dim``).
EMBEDDING_PROJECTIONS = ("embeddings_project", "decoder.project_in")

#: Module names that mark a mixture-of-experts FFN (refused: knowledge neurons are dense).
MOE_NAMES = ("experts", "block_sparse_moe")

SUPPORTED = ("Llama, Mistral, Qwen2, Qwen3 (dense), Gemma/Gemma 2/Gemma 3, Phi/Phi-3, OLMo/OLMo 2, "
             "Granite, SmolLM3, StableLM, Cohere, GPT-2, GPT-Neo, GPT-J, GPT-NeoX/Pythia, OPT, Falcon, "
             "BLOOM, GPT-BigCode/StarCoder2, BERT, RoBERTa/XLM-R, DistilBERT, ELECTRA")


def unwrap(module: nn.Module) -> nn.Module:
    """TransformerLens' bridge wraps HF submodules; the wrapped module holds the parameters."""
    return getattr(module, "original_component", None) or module


def resolve(module: nn.Module, path: str, strict: bool = False) -> nn.Module | None:
    """``module.a.b.c`` for ``path="a.b.c"``, looking through bridge wrappers; None if absent."""
    for name in path.split("."):
        nxt = getattr(unwrap(module), name, None)
        if not isinstance(nxt, nn.Module):
            if strict:
                raise AttributeError(f"{type(module).__name__} has no module {name!r} ({path})")
            return None
        module = nxt
    return module


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


class FamilyAdapter:
    """Structure of one model: its layer list, neuron site and scoring rule (see module doc)."""

    def __init__(self, model: nn.Module, layers_path: str, site: SiteSpec, masked: bool = False):
        self.model = model
        self.layers_path = layers_path
        self.site = site
        self.masked = masked
        #: the site sees [batch * seq, d_mlp] rows (OPT flattens the sequence before its FFN)
        self.flat = False
        proj = unwrap(self.site_module(0))
        self.layout = "conv1d" if _is_conv1d(proj) else "linear"
        self.family = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__

    # --- structure -----------------------------------------------------------------------
    def layers(self) -> nn.ModuleList:
        return resolve(self.model, self.layers_path, strict=True)

    def site_module(self, layer: int) -> nn.Module:
        """The FFN output projection of ``layer``; the neurons are its input."""
        return resolve(self.layers()[layer], self.site.path, strict=True)

    def value_slots(self, layer: int) -> torch.Tensor:
        """[d_mlp, d_model] view of the value-slot weight of ``layer`` (shares storage)."""
        weight = unwrap(self.site_module(layer)).weight
        return weight if self.layout == "conv1d" else weight.T  # Conv1D [in, out]; Linear [out, in]

    def site_bias(self, layer: int) -> torch.Tensor | None:
        return getattr(unwrap(self.site_module(layer)), "bias", None)

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
        """[vocab, d_model] token embeddings in the residual stream (the space of the value
        slots): the input embedding matrix, through the embedding projection where a family
        has one (:data:`EMBEDDING_PROJECTIONS`)."""
        weight = self.model.get_input_embeddings().weight
        if weight.shape[1] == self.d_model:
            return weight
        base = getattr(self.model, "base_model", self.model)
        for path in EMBEDDING_PROJECTIONS:
            proj = resolve(base, path)
            if proj is not None and getattr(unwrap(proj), "in_features", None) == weight.shape[1]:
                with torch.no_grad():
                    return proj(weight)
        raise KnowledgeNeuronError(
            f"token embeddings have {weight.shape[1]} dimensions, the value slots {self.d_model}, and no "
            "known projection maps one to the other"
        )

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    def check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
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
        if not self.flat:

            def pre_hook(_mod, args, kwargs):
                return (fn(args[0]), *args[1:]), kwargs

            return module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        return _FlatSiteHook(self.layers()[layer], module, fn)

    @contextlib.contextmanager
    def patched(self, fns: Mapping[int, SiteFn] | Iterable[tuple[int, SiteFn]]) -> Iterator[None]:
        """Each ``fn`` at its layer's neuron site (:meth:`patch_site`) while the block runs:
        ``{layer: fn}`` or ``(layer, fn)`` pairs (a layer may come twice). Every hook registered
        is removed afterwards, also when the block, or registering a later hook, raises."""
        handles = []
        try:
            for layer, fn in (fns.items() if isinstance(fns, Mapping) else fns):
                handles.append(self.patch_site(layer, fn))
            yield
        finally:
            for h in handles:
                h.remove()

    def patch_output(self, layer: int, fn: SiteFn) -> torch.utils.hooks.RemovableHandle:
        """Register ``fn(output[batch, seq, d_model]) -> output`` at the output of the FFN output
        projection (what the value slots write: ``activation @ value_slots + bias``).

        Returns the hook handle; callers remove it in ``finally``."""
        module = self.site_module(self.check_layer(layer))
        if not self.flat:
            return module.register_forward_hook(lambda _mod, _args, output: fn(output))
        return _FlatSiteHook(self.layers()[layer], module, fn, output=True)

    # --- verification --------------------------------------------------------------------
    @torch.no_grad()
    def probe(self) -> bool:
        """Check the detected structure with a forward of the model; returns ``masked``.

        The caller runs this in eval mode (``LoadedModel.frozen``)."""
        model = self.model
        vocab = model.get_input_embeddings().weight.shape[0]
        device = model.get_input_embeddings().weight.device
        ids = torch.tensor([[3, 5, 7, 9]], device=device) % vocab
        seen: dict[int, list] = {}
        handles = []

        def grab(layer):
            def hook(_mod, args, output):  # clone: some families add into the output in place
                seen.setdefault(layer, []).append((args[0].detach().clone(), output.detach().clone()))

            return hook

        try:
            for layer in range(self.n_layers):
                handles.append(unwrap(self.site_module(layer)).register_forward_hook(grab(layer)))
            logits = getattr(model(ids), "logits", None)
        finally:
            for h in handles:
                h.remove()
        name = type(model).__name__
        if logits is None or logits.shape[:2] != ids.shape or logits.shape[-1] < vocab:
            raise KnowledgeNeuronError(
                f"{name} returns no token logits: pass the model with its LM head "
                "(a ...ForCausalLM or ...ForMaskedLM)"
            )
        self.flat = all(len(c) == 1 and c[0][0].dim() == 2 and c[0][0].shape[0] == ids.numel()
                        for c in seen.values()) and len(seen) == self.n_layers
        for layer in range(self.n_layers):
            calls = seen.get(layer, [])
            shape = calls[0][0].shape[:-1] if len(calls) == 1 else None
            if shape not in (ids.shape, torch.Size([ids.numel()])):
                raise KnowledgeNeuronError(
                    f"{name}: the FFN output projection of layer {layer} ({self.site.path}) does not run "
                    "once on the whole sequence (a routed or mixture-of-experts FFN?); supported are "
                    f"dense FFNs of {SUPPORTED}"
                )
            x, out = calls[0]
            slots = self.value_slots(layer).detach()
            expected = x.to(slots.dtype) @ slots
            bias = self.site_bias(layer)
            if bias is not None:
                expected = expected + bias.detach()
            tol = (1e-4 if out.dtype == torch.float32 else 3e-2) * max(1.0, out.abs().max().item())
            if out.shape != expected.shape or (out - expected.to(out.dtype)).abs().max().item() > tol:
                raise KnowledgeNeuronError(
                    f"{name}: {self.site.path} of layer {layer} is not a plain projection of the FFN "
                    f"neurons; supported are {SUPPORTED}"
                )
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 1) % vocab
        other = model(changed).logits
        return not torch.equal(other[:, 0], logits[:, 0])


class _FlatSiteHook:
    """Site hook for families that flatten [batch, seq] before the FFN: the layer's input
    gives the shape, and ``fn`` still sees [batch, seq, d_mlp] (its input) or [batch, seq,
    d_model] (``output=True``: its output)."""

    def __init__(self, layer_module: nn.Module, site: nn.Module, fn: SiteFn, output: bool = False):
        self.shape = None

        def layer_pre(_mod, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            self.shape = tuple(hidden.shape[:2])

        def seen(x: torch.Tensor) -> torch.Tensor:
            return fn(x.view(*self.shape, x.shape[-1])).reshape(x.shape)

        def site_pre(_mod, args, kwargs):
            return (seen(args[0]), *args[1:]), kwargs

        site_hook = (site.register_forward_hook(lambda _mod, _args, out: seen(out)) if output
                     else site.register_forward_pre_hook(site_pre, with_kwargs=True))
        self.handles = [layer_module.register_forward_pre_hook(layer_pre, with_kwargs=True), site_hook]

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()


def _find_site(model: nn.Module) -> tuple[str, SiteSpec] | None:
    """The first ``ModuleList`` whose every element holds one of :data:`SITES` as a projection."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or not name:
            continue
        for spec in SITES:
            projs = [unwrap(resolve(layer, spec.path) or nn.Identity()) for layer in module]
            if all(isinstance(p, nn.Linear) or _is_conv1d(p) for p in projs):
                return name, spec
    return None


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The verified adapter of ``model`` (a Hugging Face LM); a clear error when there is none.

    Runs one small probe forward; call it with the model in eval mode."""
    if not isinstance(model, nn.Module):
        raise KnowledgeNeuronError(f"expected a torch module, got {type(model).__name__}")
    name = type(model).__name__
    moe = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in MOE_NAMES]
    if moe:
        raise KnowledgeNeuronError(
            f"{name} has mixture-of-experts FFNs ({moe[0]}): knowledge neurons are defined for dense "
            f"FFNs; supported are {SUPPORTED}"
        )
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise KnowledgeNeuronError(f"{name}: encoder-decoder models are not supported")
    found = _find_site(model)
    if found is None or not hasattr(model, "get_input_embeddings"):
        raise KnowledgeNeuronError(f"no kn_plugin adapter for {name}: supported are {SUPPORTED}")
    adapter = FamilyAdapter(model, *found)
    adapter.masked = adapter.probe()
    return adapter
