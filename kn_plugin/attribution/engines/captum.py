"""Captum's own ``LayerIntegratedGradients`` as an engine: the independent reference."""

from __future__ import annotations

import torch

from kn_plugin.attribution.config import EngineRun
from kn_plugin.attribution.engines.base import AttributionEngine, zeroed_probs
from kn_plugin.integrations.captum import captum_target


class CaptumEngine(AttributionEngine):
    """Captum's ``LayerIntegratedGradients`` on the adapter's per-layer target."""

    name = "captum"
    gives_gradients = False

    def run(self, model, fact, layers, activations, config, bar, clean=None):
        from captum.attr import LayerIntegratedGradients

        out = []
        for layer in layers:
            target = captum_target(model, fact, None, layer)
            lig = LayerIntegratedGradients(target.forward_func, target.layer)
            attr = lig.attribute(
                target.inputs, baselines=target.baselines, n_steps=config.steps,
                method=config.grid, internal_batch_size=config.batch_size,
            )
            out.append(attr[0].detach().float())
            bar.update(config.steps)
        return EngineRun(torch.stack(out), zeroed_probs(model, fact, layers), self.name)
