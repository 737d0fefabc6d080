"""Story runs on a Ray cluster: one actor per GPU holding a loaded pipeline, each story group a task, the results
returned to the driver, which holds the output folder as a one-process run does (lock, resume, manifest).

    characonsist generate story.txt --model M --out DIR --ray [ADDRESS] [--workers N]

    from characonsist.app import StoryRequest, ray_runner
    summary = ray_runner.generate(StoryRequest(stories=["story.txt"], model="M", out="DIR"), address="auto")

- **The driver writes.** The process that runs ``generate`` validates the request, takes the folder's lock,
  plans against the disk and writes every image, storyboard and the manifest (``StoryRun.write``); actors never
  see the folder, so it need not be shared between hosts.
- **Tasks handed out one at a time.** Each actor gets one group; when its result comes back the next group goes
  to it, so a group is given to one actor at a time and slow hosts take fewer groups.
- **Lost actors.** A group whose actor died (its host went away) goes back to the queue for the others; when no
  actor is left, the run stops with what is written, and a rerun does the rest.

Every node needs characonsist installed and the model reachable (the same hub id in its cache or the same path).
Ray is an optional extra: ``pip install 'characonsist[ray]'``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import platform
import time
from collections import deque

from ..inputs import InputError, excerpt
from .jobs import run_job, with_picture_bytes
from .parallel import ParallelError, Summary, check_one_model_per_gpu, to_cpu
from .request import StoryRequest, validate_request
from .session import StoryRun, failure_message, load_engine
from .settings import label, setting


class StoryWorker:
    """A Ray actor's state: the model, loaded once, and the function that generates a group with it. Loading
    errors are kept and reported by ``ready`` (an actor that raises in ``__init__`` only says it died)."""

    def __init__(self, ref, settings, names: dict | None = None, engine_factory=None):
        self.settings = dataclasses.replace(settings, gpu_ids=(0,))   # Ray sets CUDA_VISIBLE_DEVICES
        self.names = names
        self.error = None
        self.engine = None
        _quiet_libraries()    # the driver shows the progress; loading bars of every actor would bury it
        try:
            self.engine = load_engine(ref, self.settings, False, engine_factory)
        except Exception as error:
            self.error = f"{type(error).__name__}: {error}"

    def ready(self) -> dict:
        """Where this actor runs and what its model takes (or why it could not load it)."""
        info = {"host": platform.node(), "pid": os.getpid(), "error": self.error}
        if self.engine is not None:
            info.update(tokenizer=getattr(self.engine, "tokenizer", None), limits=getattr(self.engine, "limits", None))
        return info

    def generate(self, job) -> tuple:
        """``("result", GroupResult on the CPU)`` or ``("failed", why)``."""
        try:
            return "result", to_cpu(run_job(job, self.engine))
        except Exception as error:   # one bad group must not end the run
            return "failed", failure_message(error, self.settings, self.names)


def _quiet_libraries() -> None:
    for name in ("diffusers", "transformers"):
        try:
            logging = importlib.import_module(f"{name}.utils.logging")
            logging.set_verbosity_error()
            logging.disable_progress_bar()
        except Exception:
            pass


def _ray(names: dict | None = None):
    try:
        import ray
    except ImportError:
        raise InputError(f"{label(names, 'ray')} needs Ray: pip install 'characonsist[ray]' (on every node of the "
                         "cluster)") from None
    return ray


def generate(request: StoryRequest, names: dict | None = None, address: str | None = None,
             workers: int | None = None, on_plan=None, on_start=None, on_group=None, say=None, engine_factory=None,
             init: dict | None = None) -> Summary:
    """Run ``request`` on Ray (see the module docstring). ``address``: as ``ray.init`` takes it (None: an already
    initialised Ray, RAY_ADDRESS or a new local instance, started with ``init`` keyword arguments); ``workers``:
    actors (default one per GPU of the cluster). ``on_plan(run)``, ``on_start()`` and ``on_group(job, worker, ok)``
    as in ``app.parallel.generate``. Raises what a one-process run raises; ParallelError when no actor could load the
    model."""
    say = say or (lambda *a: None)
    if workers is not None and workers < 1:
        raise InputError(f"{setting(names, 'workers', workers)}: give at least 1")
    checked = validate_request(request, names=names)     # bad input is reported before Ray starts
    check_one_model_per_gpu(checked.settings.memory, names)
    t0 = time.perf_counter()
    ray = _ray(names)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, **(init or {}))
    actors = []
    try:
        resources = _resources(ray, workers, names)
        gpu = "num_gpus" in resources
        if request.dtype == "auto" and checked.settings.dtype != ("bfloat16" if gpu else "float32"):
            # "auto" is for the actors' device, not this process's (a head node may have no GPU)
            request = dataclasses.replace(request, dtype="bfloat16" if gpu else "float32")
            checked = validate_request(request, names=names)
        with StoryRun(checked) as run:
            run.engine_factory = engine_factory or run.engine_factory
            todo = run.todo
            summary = Summary(run.jobs, len(todo))
            if on_plan is not None:
                on_plan(run)
            if not todo:
                return summary
            count = min(resources.pop("count"), len(todo))
            remote = ray.remote(**resources)(StoryWorker)
            actors = [remote.remote(checked.ref, checked.settings, names, engine_factory) for _ in range(count)]
            infos = ray.get([a.ready.remote() for a in actors])
            failed = [f"worker {i} on {info['host']}: {info['error']}" for i, info in enumerate(infos) if info["error"]]
            if failed:
                raise ParallelError("the model could not be loaded by every Ray worker: " + "; ".join(failed))
            run.check_loaded(infos[0].get("tokenizer"), infos[0].get("limits"))
            hosts = sorted({info["host"] for info in infos})
            say(f"{count} Ray worker(s) on {len(hosts)} host(s) ({', '.join(hosts)}), {'one GPU' if gpu else 'one CPU'} "
                "each")
            summary.processes = count
            summary.load_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            if on_start is not None:
                on_start()
            _dispatch(ray, run, todo, actors, summary, on_group)
            summary.failed = run.failed
            summary.run_seconds = time.perf_counter() - t1
            return summary
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def _resources(ray, workers: int | None, names: dict | None = None) -> dict:
    """Actor options (one GPU each, or one CPU on a cluster without GPUs) and how many actors."""
    cluster = ray.cluster_resources()
    gpus, cpus = int(cluster.get("GPU", 0)), int(cluster.get("CPU", 0))
    if gpus:
        if workers is not None and workers > gpus:
            raise InputError(f"{setting(names, 'workers', workers)}: the Ray cluster has {gpus} GPU(s); each worker "
                             "takes one")
        return {"num_gpus": 1, "count": workers or gpus}
    if workers is None:
        raise InputError(f"the Ray cluster has no GPU: give {setting(names, 'workers', 'N')} to run N workers on its CPUs "
                         "(slow; for trying the setup out)")
    if workers > cpus:
        raise InputError(f"{setting(names, 'workers', workers)}: the Ray cluster has {cpus} CPU(s) and no GPU; each "
                         "worker takes one")
    return {"num_cpus": 1, "count": workers}


def _dispatch(ray, run: StoryRun, todo: list, actors: list, summary: Summary, on_group) -> None:
    """Hand the groups to the actors one at a time and write each result as it comes back."""
    from ray.exceptions import RayActorError, RayError

    pending = deque(range(len(todo)))
    running: dict = {}          # object ref -> (worker index, group index)
    alive = dict(enumerate(actors))

    def submit(worker: int) -> None:
        if pending:
            index = pending.popleft()
            # the picture travels as bytes: the actor may be on a machine without the file
            running[alive[worker].generate.remote(with_picture_bytes(todo[index]))] = (worker, index)

    for worker in list(alive):
        submit(worker)
    try:
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            worker, index = running.pop(done[0])
            job = todo[index]
            try:
                kind, payload = ray.get(done[0])
            except RayActorError as error:    # the actor (or its host) is gone: its group goes to another
                del alive[worker]
                pending.appendleft(index)
                summary.lost.append(f"Ray worker {worker} was lost ({type(error).__name__}); "
                                    f"{'its group went to another worker' if alive else 'no worker is left'}")
                if not alive:
                    break
                for other in alive:            # an idle worker takes the returned group
                    if all(w != other for w, _ in running.values()):
                        submit(other)
                continue
            except RayError as error:         # e.g. a result that could not be sent back: this group failed
                kind, payload = "failed", f"{type(error).__name__}: {excerpt(str(error), 300)}"
            submit(worker)                    # the actor works on its next group while this one is written
            ok = run.write(job, payload) if kind == "result" else run.fail(job, payload)
            summary.written_by[job.folder] = worker
            if on_group is not None:
                on_group(job, worker, ok)
    except BaseException:
        for ref in running:
            ray.cancel(ref, force=True)
        raise
