"""Runs that outgrow one process: a pool of Ray actors, each holding the model once.

Facts are tasks. Each actor loads the model once (same registry name or folder as the
driver's model, checked by fingerprint), runs one task at a time and returns the result to
the driver, which writes it: no shared filesystem is needed. A task whose actor dies is put
back in the queue and runs on another actor (a replacement actor is started while the budget
allows); a driver that dies resumes from what it wrote, as the serial path does.

``ray`` is an optional dependency (``pip install "kn_plugin[ray]"``).
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kn_plugin.errors import KnowledgeNeuronError, first_line
from kn_plugin.models import BUILTIN_MODELS, load_model
from kn_plugin.validation import positive_int

logger = logging.getLogger(__name__)

RAY_INSTALL = 'pip install "kn_plugin[ray]"'

def import_ray():
    """The ``ray`` module, or a one-line error naming the install command."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise KnowledgeNeuronError(f"--workers needs Ray, which is not installed: {RAY_INSTALL}") from None


def check_address(address: str, timeout: float = 3.0) -> str:
    """``host:port`` (or ``ray://host:port``) of a running cluster that answers, else a one-line error.

    Checked with a plain TCP connection first: ``ray.init`` would otherwise wait a long time
    for an address nobody answers."""
    if not isinstance(address, str) or not address.strip():
        raise KnowledgeNeuronError("--ray-address must be HOST:PORT of a running Ray cluster")
    if address == "auto":
        return address
    host_port = address.split("://", 1)[-1]
    host, sep, port = host_port.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise KnowledgeNeuronError(f"--ray-address {address!r} is not HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            speaks_grpc = _answers_http2(sock, timeout)
    except OSError as exc:
        raise KnowledgeNeuronError(f"cannot reach a Ray cluster at {address} ({exc.strerror or exc})") from None
    if not speaks_grpc:
        raise KnowledgeNeuronError(f"{address} answers but is not a Ray cluster (no gRPC server there): give the "
                                   "address `ray start --head` printed (its GCS port, default 6379)")
    return address


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + empty SETTINGS


def _answers_http2(sock: socket.socket, timeout: float) -> bool:
    """Whether the server behind ``sock`` speaks HTTP/2 (Ray's GCS and client servers are gRPC):
    it answers the connection preface with a SETTINGS frame (type 4)."""
    sock.settimeout(timeout)
    try:
        sock.sendall(_HTTP2_PREFACE)
        head = b""
        while len(head) < 9:
            chunk = sock.recv(9 - len(head))
            if not chunk:
                return False
            head += chunk
    except OSError:
        return False
    return head[3] == 4


@dataclass(frozen=True)
class PoolConfig:
    """Checked settings of a Ray pool.

    ``workers`` actors with ``threads_per_worker`` CPU threads each (their Ray ``num_cpus``)
    and, on a GPU device, ``gpus_per_worker`` GPUs each (default 1). ``address`` joins a
    running cluster; without it a local cluster is started and shut down with the pool.
    A task is tried at most ``max_attempts`` times; at most ``replacements`` dead actors are
    replaced (default: ``workers``)."""

    workers: int = 2
    threads_per_worker: int = 1
    address: str | None = None
    gpus_per_worker: float | None = None
    max_attempts: int = 3
    replacements: int | None = None

    def __post_init__(self):
        positive_int("--workers", self.workers)
        positive_int("--threads-per-worker", self.threads_per_worker)
        positive_int("max_attempts", self.max_attempts)
        if self.gpus_per_worker is not None and not self.gpus_per_worker > 0:
            raise KnowledgeNeuronError(f"gpus_per_worker must be > 0, got {self.gpus_per_worker!r}")
        if self.replacements is not None and (isinstance(self.replacements, bool) or self.replacements < 0):
            raise KnowledgeNeuronError(f"replacements must be >= 0, got {self.replacements!r}")
        if self.address is not None:
            check_address(self.address)


class _Worker:
    """The actor: loads the model once, then runs the task functions it is sent."""

    def __init__(self, spec: str, device: str, dtype: str, threads: int):
        torch.set_num_threads(threads)
        self.model = load_model(spec, device=device, dtype=dtype)

    def info(self) -> dict:
        return {"pid": os.getpid(), "fingerprint": self.model.fingerprint, "weights": self.model.weights_digest()}

    def run(self, task: Callable, payload: tuple) -> Any:
        return task(self.model, *payload)


def check_task(task) -> Callable:
    """``task`` if it is a function an actor can import by name (defined at the top level of
    a module, not in ``__main__``), else a one-line error: Ray sends such a function by
    reference, so the actor runs the very code the driver runs."""
    module, qualname = getattr(task, "__module__", None), getattr(task, "__qualname__", "")
    if not callable(task) or not module or module == "__main__" or "<" in qualname or "." in qualname:
        raise KnowledgeNeuronError(f"a task must be a function defined at the top level of an importable module, "
                                   f"got {task!r}")
    return task


def run_tasks(model, task: Callable, items: Iterable[tuple[str, tuple]], pool: RayPool | None = None
              ) -> Iterator[tuple[str, Any]]:
    """``(key, task(model, *payload))`` for every item: in order in this process, or as they
    arrive from ``pool``'s actors. The same function runs in both cases."""
    check_task(task)
    if pool is not None:
        yield from pool.map(task, items)
        return
    for key, payload in items:
        yield key, task(model, *payload)


def model_spec(model) -> str:
    """What a worker passes to :func:`kn_plugin.load_model` to get the driver's model."""
    if model.name in BUILTIN_MODELS:
        return model.name
    if model.path is None:
        raise KnowledgeNeuronError(
            f"{model.name}: Ray workers load the model themselves and need a registry name or a local "
            "folder (save it with save_pretrained and pass the folder)"
        )
    return str(model.path)


class RayPool:
    """``workers`` Ray actors holding the same model as ``model`` (a :class:`LoadedModel`).

    >>> with RayPool(model, PoolConfig(workers=2)) as pool:
    ...     for key, result in pool.map("locate", [(key, payload), ...]):
    ...         ...
    """

    def __init__(self, model, config: PoolConfig | None = None):
        self.config = config or PoolConfig()
        self.ray = import_ray()
        self.spec = model_spec(model)
        self.fingerprint = model.fingerprint
        self.weights = model.weights_digest()
        device = str(model.device)
        self.device = "cuda" if device.startswith("cuda") else device
        self.dtype = str(model.dtype).removeprefix("torch.")
        self._actors: list = []
        self._pids: dict = {}
        self._owns_ray = False
        self._replacements = (self.config.workers if self.config.replacements is None
                              else self.config.replacements)

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> RayPool:
        self.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def start(self) -> RayPool:
        ray, cfg = self.ray, self.config
        if not ray.is_initialized():
            env = {k: v for k, v in os.environ.items() if k.startswith(("KN_", "HF_", "TRANSFORMERS_"))}
            env.update({"OMP_NUM_THREADS": str(cfg.threads_per_worker), "HF_HUB_OFFLINE": "1",
                        "TOKENIZERS_PARALLELISM": "false"})
            options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False,
                       "runtime_env": {"env_vars": env}}
            if cfg.address is None:
                options.update(num_cpus=cfg.workers * cfg.threads_per_worker, object_store_memory=2**28)
            try:
                ray.init(address=cfg.address, **options)
            except Exception as exc:  # ray raises ConnectionError, RuntimeError, ValueError ...
                raise KnowledgeNeuronError(f"cannot start Ray ({type(exc).__name__}: {first_line(exc)})") from None
            self._owns_ray = True
        try:
            for _ in range(cfg.workers):
                self._spawn()
            infos = [self._get(actor.info.remote()) for actor in self._actors]
        except Exception:
            self.close()
            raise
        for actor, info in zip(self._actors, infos):
            self._admit(actor, info)
        logger.info("Ray pool: %d workers, pids %s", len(self._actors), list(self._pids.values()))
        return self

    def _admit(self, actor, info: dict) -> None:
        """A started worker joins the pool only if it holds the driver's model, weights and all."""
        self._pids[actor] = info["pid"]
        if info["fingerprint"] != self.fingerprint:
            self.close()
            raise KnowledgeNeuronError(f"Ray workers loaded {self.spec!r} as a different model "
                                       f"({info['fingerprint']} != {self.fingerprint})")
        if info["weights"] != self.weights:
            self.close()
            raise KnowledgeNeuronError(f"Ray workers loaded {self.spec!r} with other weights than the model in "
                                       "this process (edited, or another dtype): workers load the model from "
                                       "its name or folder, so save the edited model and give that folder")

    def _spawn(self):
        cfg = self.config
        gpus = cfg.gpus_per_worker or (1 if self.device.startswith("cuda") else 0)
        cls = self.ray.remote(num_cpus=cfg.threads_per_worker, num_gpus=gpus)(_Worker)
        actor = cls.remote(self.spec, self.device, self.dtype, cfg.threads_per_worker)
        self._actors.append(actor)
        return actor

    def close(self) -> None:
        for actor in self._actors:
            try:
                self.ray.kill(actor)
            except Exception:  # already dead
                pass
        self._actors.clear()
        if self._owns_ray and self.ray.is_initialized():
            self.ray.shutdown()
        self._owns_ray = False

    def pids(self) -> list[int]:
        """Process ids of the live actors."""
        return [self._pids[a] for a in self._actors if a in self._pids]

    # -- running -----------------------------------------------------------------------------
    def _get(self, ref):
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, KnowledgeNeuronError):
                raise KnowledgeNeuronError(str(cause)) from None
            if isinstance(cause, BaseException):
                raise cause from None
            raise
        except exceptions.RayActorError as exc:
            cause = getattr(exc, "error_msg", "") or str(exc)
            if "KnowledgeNeuronError" in cause:  # the model could not be loaded in the actor
                line = next((ln for ln in cause.splitlines() if "KnowledgeNeuronError:" in ln), cause)
                raise KnowledgeNeuronError(line.split("KnowledgeNeuronError:", 1)[1].strip()) from None
            raise

    def map(self, task: Callable, items: Iterable[tuple[str, tuple]]) -> Iterator[tuple[str, Any]]:
        """Run ``task`` on every ``(key, payload)``; yields ``(key, result)`` as results arrive.

        A task whose actor died is retried on another actor (each key yields exactly once);
        a task that raises stops the run with that exception."""
        check_task(task)
        if not self._actors:
            raise KnowledgeNeuronError("the Ray pool is not started (use it as a context manager)")
        ray, died_errors = self.ray, (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError)
        pending = deque(items)
        attempts: Counter = Counter()
        idle = list(self._actors)
        inflight: dict = {}
        while pending or inflight:
            while pending and idle:
                actor = idle.pop(0)
                key, payload = pending.popleft()
                inflight[actor.run.remote(task, payload)] = (actor, key, payload)
            if not inflight:
                raise KnowledgeNeuronError("every Ray worker died; nothing left to run the remaining facts")
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            actor, key, payload = inflight.pop(ref)
            try:
                result = self._get(ref)
            except died_errors as exc:
                attempts[key] += 1
                if actor in self._actors:
                    self._actors.remove(actor)
                logger.warning("Ray worker %s died on %s (%s); retrying elsewhere", self._pids.get(actor), key,
                               type(exc).__name__)
                if attempts[key] >= self.config.max_attempts:
                    raise KnowledgeNeuronError(f"{key}: its Ray worker died {attempts[key]} times; giving up") from None
                pending.appendleft((key, payload))
                while self._replacements > 0:  # a replacement may land on a node that is dying too
                    self._replacements -= 1
                    new = self._spawn()
                    try:
                        self._admit(new, self._get(new.info.remote()))
                    except died_errors as again:
                        logger.warning("a replacement Ray worker died before starting (%s)", type(again).__name__)
                        self._actors.remove(new)
                        continue
                    idle.append(new)
                    break
                continue
            idle.append(actor)
            yield key, result


def open_pool(model, workers: int | None, threads_per_worker: int = 1, address: str | None = None):
    """A :class:`RayPool` for ``workers`` (None: no pool; checks the input before Ray starts)."""
    if workers is None and address is None:
        return None
    config = PoolConfig(workers=workers or 1, threads_per_worker=threads_per_worker, address=address)
    return RayPool(model, config)
