"""Engines that compute the same IG scores by different routes (:data:`~kn_plugin.attribution.engines.registry.ENGINES`)."""
