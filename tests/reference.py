"""Independent reference implementations used by the tests."""

import torch

from kn_plugin.integrations.transformer_lens import hook_name
from kn_plugin.scoring import encode_fact, target_log_prob


def reference_ig(model, prompt: str, target: str, layer: int, steps: int) -> torch.Tensor:
    """IG by a plain loop over alpha on the TransformerLens bridge, one alpha per pass."""
    bridge = model.bridge()
    fact = encode_fact(model, prompt, target)
    name = hook_name(layer)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(fact.input_ids, names_filter=lambda n: n == name)
    a = cache[name][0, fact.pred_pos].clone()
    total = torch.zeros_like(a)
    for k in range(1, steps + 1):
        x = (k / steps * a).clone().requires_grad_(True)

        def patch(act, hook, x=x):
            act = act.clone()
            act[0, fact.pred_pos] = x
            return act

        with torch.enable_grad():
            logits = bridge.run_with_hooks(fact.input_ids, fwd_hooks=[(name, patch)])
            prob = target_log_prob(logits, fact).exp().sum()
            prob.backward()
        total += x.grad
    return a * total / steps
