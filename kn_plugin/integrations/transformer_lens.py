"""TransformerLens adapter: hook-point names and token handling for ``TransformerBridge``.

The FFN neuron site of every supported family is ``blocks.{l}.mlp.hook_post`` on the bridge,
which is the same tensor as the Hugging Face site used by the family adapter. Give the bridge
token tensors built by kn_plugin (``EncodedFact.input_ids``): ``bridge.to_tokens`` prepends a
BOS token that the Hugging Face tokenizer of some models (SmolLM2) does not, which would
shift every position.

Booting the bridge (``LoadedModel.bridge()``) switches the Hugging Face model to the eager
attention implementation; after that, both paths give bit-identical activations (before it,
SDPA and eager attention differ by float rounding, about 1e-6 relative).
"""

from __future__ import annotations


def hook_name(layer: int) -> str:
    """TL hook point of layer ``layer``'s post-activation FFN neurons."""
    return f"blocks.{layer}.mlp.hook_post"
