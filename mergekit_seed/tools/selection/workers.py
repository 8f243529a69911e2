"""Where ``select``'s work runs: in this process, one job after another (the default), or as Ray
tasks over this machine's devices or a cluster (``--ray``, ``--ray-address``).

A job is a function and its arguments: a seed's scoring, or a candidate's merge and validation
score. :meth:`Workers.submit` starts one and returns ``finish``, which waits for its result
(or raises its error). The sweep starts up to :attr:`Workers.window` jobs ahead of the one it
takes next, and takes them in order, so that its choice, record and output are the same
wherever the jobs ran. In this process a job runs when ``finish`` is called: one at a time,
exactly as before there were workers. Ray is imported only by :class:`RayWorkers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from mergekit_seed.errors import UserError
from mergekit_seed.quiet import quiet_libraries


RAY_INSTALL_HINT = "pip install 'mergekit-seed[ray]'"

Finish = Callable[[], Any]


class Workers:
    """Jobs run in this process, each when its result is asked for: one at a time, none
    started ahead (``window``)."""

    at_once = 1
    window = 1

    def shared(self, value: Any) -> Any:
        """``value`` as jobs receive it (Ray: stored once in its object store)."""
        return value

    def submit(self, function: Callable[..., Any], *args: Any) -> Finish:
        return lambda: function(*args)

    def describe(self) -> List[str]:
        """What the terminal says about where the work runs ([] in this process)."""
        return []

    def close(self) -> None:
        """Stop every job still running."""

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()


@dataclass(frozen=True)
class RaySettings:
    """``--ray``: where the Ray runtime is (None: a local one over this machine's CPUs and GPUs)
    and what each task asks of it."""

    address: Optional[str] = None
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0

    @property
    def resources(self) -> Dict[str, float]:
        return {"CPU": self.cpus_per_task, **({"GPU": self.gpus_per_task} if self.gpus_per_task else {})}


def _run_job(function: Callable[..., Any], *args: Any) -> Any:
    """A job inside a Ray worker: other libraries' bars and notices silenced, as select's own."""
    quiet_libraries()
    return function(*args)


class RayWorkers(Workers):
    """Jobs run as Ray tasks, each asking for ``settings.resources``. ``at_once`` is how many of
    them the cluster holds at once; twice as many are started (``window``), the rest queued by
    Ray, so that a task slot whose job finished early is not idle while the sweep waits, in
    order, for a slower one. Every worker must see the folders the jobs name (the seeds, the
    base, and OUT's parent, where candidates are merged)."""

    def __init__(self, settings: RaySettings):
        try:
            import ray
        except ImportError:
            raise UserError(f"--ray runs select's jobs on Ray, which is not installed; {RAY_INSTALL_HINT}") from None
        self._ray = ray
        self.settings = settings
        where = settings.address or "a local Ray runtime"
        # a caller's own Ray session (select() from Python inside one) is used as it is, and left running
        self._owned = not ray.is_initialized()
        try:
            if self._owned:  # workers' output would break up select's progress bar; errors come back with results
                ray.init(address=settings.address, log_to_driver=False, include_dashboard=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as error:
            what = (
                f"--ray-address {settings.address}: cannot join that Ray cluster"
                if settings.address
                else "--ray: cannot start a local Ray runtime"
            )
            raise UserError(f"{what} ({_first_line(error)})") from None
        self._remote = ray.remote(_run_job)
        self._running: Dict[Any, None] = {}
        self._shared: Dict[int, Any] = {}
        self.cluster = {name: float(ray.cluster_resources().get(name, 0.0)) for name in ("CPU", "GPU")}
        fits = [math.floor(self.cluster[name] / need + 1e-9) for name, need in settings.resources.items()]
        self.at_once = min(fits)
        self.window = 2 * self.at_once
        if self.at_once < 1:
            self._shutdown()
            lacking = next(name for name, fit in zip(settings.resources, fits) if fit < 1)
            raise UserError(
                f"--{lacking.lower()}s-per-task {settings.resources[lacking]:g}: {where} has "
                f"{self.cluster[lacking]:g} {lacking}s; ask for fewer per task or join a cluster with more"
            )

    def shared(self, value: Any) -> Any:
        if id(value) not in self._shared:
            self._shared[id(value)] = (value, self._ray.put(value))
        return self._shared[id(value)][1]

    def submit(self, function: Callable[..., Any], *args: Any) -> Finish:
        resources = self.settings.resources
        reference = self._remote.options(num_cpus=resources["CPU"], num_gpus=resources.get("GPU", 0)).remote(
            function, *args
        )
        self._running[reference] = None
        return lambda: self._result(reference)

    def _result(self, reference: Any) -> Any:
        from ray.exceptions import RayError, RayTaskError

        try:
            return self._ray.get(reference)
        except RayTaskError as error:
            if isinstance(error.cause, UserError):
                raise error.cause from None
            raise
        except RayError as error:  # a worker or node lost, out of memory: not the job's own error
            raise UserError(
                f"a Ray task failed ({_first_line(error)}); run select again: finished work is read back"
            ) from None
        finally:
            self._running.pop(reference, None)

    def describe(self) -> List[str]:
        asks = ", ".join(f"{amount:g} {name}" for name, amount in self.settings.resources.items())
        held = ", ".join(f"{self.cluster[name]:g} {name}s" for name in ("CPU", "GPU"))
        where = self.settings.address or "local runtime"
        return [f"ray: {self.at_once} tasks at once, each asking for {asks} ({where}: {held})"]

    def close(self) -> None:
        running = list(self._running)
        for reference in running:
            self._ray.cancel(reference, force=True)
        if running:  # let the cancelled tasks stop before their folders are removed
            self._ray.wait(running, num_returns=len(running), timeout=30)
        self._running.clear()
        self._shared.clear()
        self._shutdown()

    def _shutdown(self) -> None:
        if self._owned:
            self._ray.shutdown()


def workers_for(settings: Optional[RaySettings]) -> Workers:
    """This process's workers, or Ray's with ``settings``."""
    return Workers() if settings is None else RayWorkers(settings)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
