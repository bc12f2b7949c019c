"""Benchmarks that print and save numbers (no timed assertions), one module per benchmark:
:mod:`~kn_plugin.bench.speed`, :mod:`~kn_plugin.bench.pararel`, :mod:`~kn_plugin.bench.grids`."""
