"""TransformerLens glue: the bridge as kn_plugin takes it and gives it back, and hook-point names.

* :func:`is_bridge` / :func:`bridge_parts`: a ``TransformerBridge`` the user holds, as the Hugging
  Face module and tokenizer behind it (``kn_plugin.wrap`` takes a bridge through these);
* :func:`boot_bridge`: a ``TransformerBridge`` over the *same* weights as a Hugging Face module
  (``LoadedModel.bridge()``);
* :func:`hook_name`: the hook point of a layer's FFN neurons, for ``run_with_hooks`` lists
  (:func:`kn_plugin.fwd_hooks`).

The FFN neuron site of every supported family is ``blocks.{l}.mlp.hook_post`` on the bridge,
which is the same tensor as the Hugging Face site used by the family adapter. Give the bridge
token tensors built by kn_plugin (``EncodedFact.input_ids``): ``bridge.to_tokens`` prepends a
BOS token that the Hugging Face tokenizer of some models (SmolLM2) does not, which would
shift every position.

Booting the bridge switches the Hugging Face model to the eager attention implementation;
after that, both paths give bit-identical activations (before it, SDPA and eager attention
differ by float rounding, about 1e-6 relative).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kn_plugin.errors import KnowledgeNeuronError


def hook_name(layer: int) -> str:
    """TL hook point of layer ``layer``'s post-activation FFN neurons."""
    return f"blocks.{layer}.mlp.hook_post"


def is_bridge(obj) -> bool:
    """Whether ``obj`` is a TransformerLens ``TransformerBridge`` (without importing TransformerLens)."""
    return type(obj).__module__.startswith("transformer_lens") and hasattr(obj, "original_model")


def offline_tokenizer(source: str | None) -> Any | None:
    """The tokenizer saved at ``source`` (a folder or a locally cached name), offline; or None."""
    if not source:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        return None


def bridge_tokenizer(bridge) -> Any:
    """The Hugging Face tokenizer behind a bridge's tokenizer.

    TransformerLens reloads the tokenizer with ``add_bos_token=True``; kn_plugin's rule is the
    model's own tokenizer, so it is reloaded (offline) from where the bridge's came from."""
    tokenizer = getattr(bridge, "tokenizer", None)
    if tokenizer is None:
        raise KnowledgeNeuronError("this TransformerBridge has no tokenizer: pass tokenizer=... "
                                   "(the Hugging Face tokenizer of the model)")
    original = offline_tokenizer(getattr(tokenizer, "name_or_path", None))
    if original is not None:
        return original
    raise KnowledgeNeuronError(
        "cannot reload the Hugging Face tokenizer behind this TransformerBridge (its tokenizer adds a BOS "
        "the model's own tokenizer may not): pass tokenizer=... (the model's Hugging Face tokenizer)"
    )


def boot_bridge(hf_model, tokenizer, source: str, device, dtype):
    """A TransformerLens 4.x ``TransformerBridge`` sharing ``hf_model``'s weights, in eval mode.

    Booting switches the Hugging Face model to eager attention (TransformerLens does that to
    expose attention patterns)."""
    from transformer_lens.model_bridge import TransformerBridge

    config = hf_model.config
    overrides = {}
    if not getattr(config, "architectures", None):
        overrides["architectures"] = [type(hf_model).__name__]
    with _reloadable(tokenizer) as tok:
        bridge = TransformerBridge.boot_transformers(source, hf_model=hf_model, tokenizer=tok, device=device,
                                                     dtype=dtype, hf_config_overrides=overrides or None)
    bridge.eval()
    return bridge


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
