"""Data-parallel story runs on one host: one process per GPU, each with its own model, the story groups split
between the processes, one output folder with one manifest.

    accelerate launch --multi_gpu --num_processes 2 -m characonsist generate story.txt --model M --out DIR
    characonsist generate story.txt --model M --out DIR --gpus 2          # starts the same

A group is the unit (its frames attend to its identity in one batch), so groups are independent. How the
processes share the output folder (docs/ARCHITECTURE.md):

- **One writer.** Process 0 holds the folder as a one-process run does (``StoryRun``): it validates the request,
  takes the folder's lock, plans against what is on disk (resume) and is the only process that writes: images,
  storyboards and the manifest, each through an atomic rename. The other processes never open the folder.
- **A fixed split.** Process 0 sends the plan (the groups still to do) to every process; each takes its share
  with accelerate's ``PartialState.split_between_processes`` (the same contiguous slices on every process), so
  no two processes generate the same group.
- **Results to the writer.** The other processes send each ``GroupResult`` (moved to the CPU) to process 0 over
  a gloo process group; a thread of process 0 receives them while its main thread generates its own share and
  writes them between its own groups. No NCCL is involved: nothing but finished images crosses processes.
- **Kills.** When a process dies, torchrun (under ``accelerate launch``) stops the others; process 0 saves the
  manifest (the groups written so far are done, the rest to do). A rerun plans again from the disk and splits
  what is left between its processes.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import pickle
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from ..inputs import InputError
from .jobs import Job, run_job
from .request import StoryRequest, validate_request
from .session import StoryRun, failure_message, load_engine
from .settings import StorySettings, setting

WAIT = timedelta(days=1)   # a group may take hours in sequential offload; torchrun stops the run if a process dies
_SIZE_TAG, _DATA_TAG = 1, 2


@dataclass(frozen=True)
class Plan:
    """What process 0 sends every other process: the model, the run's settings, the front end's field names (for
    messages) and the groups still to do."""

    ref: object               # app.model.ModelRef
    settings: StorySettings
    names: dict
    todo: list[Job]


class ParallelError(RuntimeError):
    """Another process of the run failed (it could not load the model, or it was lost); one line."""


@dataclass
class Processes:
    """This process's place among the processes of a data-parallel run (``join()``); objects travel over gloo."""

    state: object              # accelerate.PartialState
    rank: int
    size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> str:
        """This process's GPU (``cuda:LOCAL_RANK``), or ``cpu`` where there is none."""
        import torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"

    def share(self, items: list) -> list:
        """This process's contiguous slice of ``items`` (``PartialState.split_between_processes``)."""
        with self.state.split_between_processes(list(items)) as part:
            return list(part)

    def broadcast(self, obj=None):
        """Process 0's ``obj`` on every process."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every process's ``obj`` on process 0 (in rank order); None elsewhere."""
        import torch.distributed as dist

        out = [None] * self.size if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        """Leave the process group (``destroy_process_group``), for a Python caller that goes on after the run.
        The command line's processes do not: they leave through ``exit_process``."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def send(self, obj) -> None:
        """Send ``obj`` (pickled) to process 0, which takes it with ``receive``."""
        import torch
        import torch.distributed as dist

        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        dist.send(torch.tensor([len(data)], dtype=torch.int64), dst=0, tag=_SIZE_TAG)
        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst=0, tag=_DATA_TAG)

    def receive(self) -> tuple[int, object]:
        """On process 0: the next object any process sent, with its sender's rank."""
        import torch
        import torch.distributed as dist

        size = torch.zeros(1, dtype=torch.int64)
        src = dist.recv(size, src=None, tag=_SIZE_TAG)   # from whichever process sends first
        data = torch.empty(int(size), dtype=torch.uint8)
        dist.recv(data, src=src, tag=_DATA_TAG)
        return src, pickle.loads(data.numpy().tobytes())


def launched_processes() -> int:
    """How many processes the launcher started (torchrun's / accelerate launch's ``WORLD_SIZE``; 1 if none)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def join() -> Processes | None:
    """Join the run's other processes when a launcher started several (``accelerate launch``, ``torchrun``), or
    None for a process alone. The process group is gloo (CPU), with a long timeout: processes wait for each
    other's groups, and only finished images travel."""
    if launched_processes() <= 1:
        return None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available(), backend="gloo", timeout=WAIT)
    if state.num_processes != launched_processes():
        raise RuntimeError(f"the launcher started {launched_processes()} processes but accelerate sees "
                           f"{state.num_processes} ({state.distributed_type})")
    return Processes(state, state.process_index, state.num_processes, state.local_process_index)


def exit_process(code: int) -> None:
    """End a process that a launcher started as one of several (``python -m characonsist`` under ``accelerate
    launch`` / torchrun) with ``code``, once its work is done: stdout and stderr flushed and Python's exit handlers
    run, then ``os._exit``, so no C++ destructor runs. A normal interpreter exit tears gloo's threads down, with or
    without ``destroy_process_group`` first, and that teardown aborted a finished run now and then on a loaded
    2-core CI machine ("terminate called without an active exception", SIGABRT, exit -6, which torchrun reports as
    a failed run although every result had been written). A process alone exits normally (``sys.exit``)."""
    if launched_processes() <= 1:
        sys.exit(code)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else 1)


def launch_command(processes: int, argv: list[str], module: str = "characonsist") -> list[str]:
    """The ``accelerate launch`` command that runs ``python -m characonsist ARGV`` in ``processes`` processes on
    this host, one GPU each (what ``--gpus N`` starts)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", module, *argv]


def launch_environment() -> dict[str, str]:
    """The environment for ``launch_command``: this one, with gloo on the loopback interface (all processes are on
    this host; in containers the host name may not resolve to an address gloo can use) unless set already."""
    env = dict(os.environ)
    if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE`` (e.g. ``--gpus 2`` before relaunching)."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == name:
            skip = True
        elif not word.startswith(name + "="):
            out.append(word)
    return out


def check_one_model_per_gpu(mode: str, names: dict | None = None) -> None:
    """Refuse the memory mode that spreads one model over several GPUs when each worker holds its own model."""
    if mode == "balanced":
        raise InputError(f"{setting(names, 'memory', 'balanced')} spreads one model over several GPUs; with one "
                         "process (or Ray actor) per GPU each holds a whole model: use "
                         f"{setting(names, 'memory', 'none')} or model-offload")


def to_cpu(obj):
    """``obj`` with every tensor on the CPU (results cross processes; the writer may have no GPU of theirs)."""
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(x) for x in obj)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_cpu(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


# ---------------------------------------------------------------------------------------------- the run

@dataclass
class Summary:
    """What a data-parallel run did (on process 0: every group; elsewhere: this process's)."""

    jobs: list[Job] = field(default_factory=list)   # every group of the run (process 0)
    todo: int = 0                                   # groups that were left to generate at the start
    failed: int = 0
    written_by: dict[str, int] = field(default_factory=dict)   # group folder -> rank of the process that made it
    processes: int = 1
    load_seconds: float = 0.0      # validation, plan and loading the model in every process
    run_seconds: float = 0.0       # from every model loaded to the last group written
    stopped: bool = False          # a worker whose run process 0 stopped before any work
    lost: list[str] = field(default_factory=list)   # processes that stopped early, and why


def generate(request: StoryRequest, procs: Processes | None, names: dict | None = None, on_plan=None,
             on_start=None, on_group=None, progress: bool = False, engine_factory=None) -> Summary:
    """One process's part of a data-parallel run of ``request`` (``procs`` None: the only process).

    On process 0, ``on_plan(run)`` is called once the folder is locked and planned, ``on_start()`` once every
    process has loaded the model, ``on_group(job, rank, ok)`` after each group is written (or failed), wherever it
    was generated (from process 0's writer thread). Process 0 raises what a one-process run raises (InputError,
    StoryError, FolderError, KeyboardInterrupt) after telling the others to stop, and ParallelError when another
    process could not load the model; a worker whose run was stopped returns ``Summary(stopped=True)``.
    ``engine_factory(ref, settings, progress)`` replaces ``app.loading.load_engine`` (benchmarks with random
    weights)."""
    t0 = time.perf_counter()
    size = procs.size if procs else 1
    if procs is not None and not procs.main:
        return _work(procs, t0, engine_factory)
    try:
        checked = validate_request(request, names=names)
        if size > 1:
            check_one_model_per_gpu(checked.settings.memory, names)
        if procs is not None:   # this process's GPU
            checked = dataclasses.replace(checked, settings=dataclasses.replace(checked.settings,
                                                                                gpu_ids=(procs.local_rank,)))
        run = StoryRun(checked).__enter__()
    except BaseException:
        if procs is not None:
            procs.broadcast(None)          # the others stop; this process reports the error
        raise
    with _Closing(run):
        run.engine_factory = engine_factory or run.engine_factory
        todo = run.todo
        if procs is not None:
            procs.broadcast(Plan(checked.ref, checked.settings, checked.names, todo))
        if on_plan is not None:
            on_plan(run)
        summary = Summary(run.jobs, len(todo), processes=size)
        if not todo:
            return summary
        mine = procs.share(range(len(todo))) if procs else list(range(len(todo)))
        try:
            run.load(progress=progress)
            problem = None
        except Exception as error:     # told to the others first, then raised
            problem = error
        if procs is not None:
            statuses = procs.gather(None)
            lost = [f"process {rank}: {status}" for rank, status in enumerate(statuses) if status]
            go = problem is None and not lost
            procs.broadcast(go)
            if problem is None and lost:
                raise ParallelError("the model could not be loaded in every process: " + "; ".join(lost))
        if problem is not None:
            raise problem
        summary.load_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        if on_start is not None:
            on_start()
        writer = _Writer(run, todo, summary, on_group)    # the one thread that writes into the folder
        inbox = _Inbox(procs, writer) if procs is not None and size > 1 else None
        try:
            for index in mine:
                writer.check()
                try:
                    message = ("result", index, run_job(todo[index], run.engine))
                except Exception as error:  # one bad group must not end the run (as in StoryRun.run)
                    message = ("failed", index, failure_message(error, checked.settings, checked.names))
                writer.put(0, message)
            if inbox is not None:
                inbox.wait(writer)
        finally:
            writer.close()     # what is queued (finished groups) is written first; its error is raised here
        summary.failed = run.failed
        summary.run_seconds = time.perf_counter() - t1
        return summary


def _work(procs: Processes, t0: float, engine_factory) -> Summary:
    """A process other than 0: generate this process's share of the plan and send each result to process 0."""
    plan = procs.broadcast()
    if plan is None:
        return Summary(stopped=True, processes=procs.size)
    todo = plan.todo
    summary = Summary(todo=len(todo), processes=procs.size)
    if not todo:
        return summary
    mine = procs.share(range(len(todo)))
    settings = dataclasses.replace(plan.settings, gpu_ids=(procs.local_rank,))   # this process's GPU
    engine, status = None, None
    if mine:
        try:
            engine = load_engine(plan.ref, settings, False, engine_factory)
        except Exception as error:
            status = f"{type(error).__name__}: {error}"
    procs.gather(status)
    if not procs.broadcast():
        return Summary(stopped=True, processes=procs.size)
    summary.load_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    try:
        for index in mine:
            try:
                result = run_job(todo[index], engine)
                message = ("result", index, to_cpu(result))
            except Exception as error:     # one bad group must not end the run (as in StoryRun.run)
                message = ("failed", index, failure_message(error, settings, plan.names))
                summary.failed += 1
            procs.send(message)
    except Exception as error:     # e.g. a result that cannot be pickled: process 0 learns why, then stops waiting
        try:
            procs.send(("lost", f"{type(error).__name__}: {error}"))
        except Exception:
            pass                       # process 0 is gone too
        raise
    procs.send(("done",))
    summary.run_seconds = time.perf_counter() - t1
    return summary


class _Writer:
    """Process 0's writer thread: every group, its own or another process's, is written here, one at a time, while
    the main thread generates (a group's PNGs take about a second to encode: off the GPU's critical path)."""

    def __init__(self, run: StoryRun, todo: list[Job], summary: Summary, on_group=None):
        self.run, self.todo, self.summary, self.on_group = run, todo, summary, on_group
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True, name="characonsist-writer")
        self.thread.start()

    def put(self, rank: int, message: tuple) -> None:
        self.queue.put((rank, message))

    def check(self) -> None:
        """Raise the error that stopped the writer (e.g. the disk is full)."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Write what is queued, stop the thread, raise its error. Interrupted meanwhile (Ctrl-C, torchrun's
        SIGTERM): the group being written is finished, the rest left for a rerun, then the interrupt goes on (the
        folder is closed only once nothing writes into it: no temporary outlives its journal)."""
        self.queue.put(None)
        try:
            while self.thread.is_alive():
                self.thread.join(timeout=1.0)     # in steps: a signal still gets through
        except KeyboardInterrupt:
            self.stopping = True
            self.thread.join(timeout=60)
            raise
        self.check()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None or self.stopping:
                continue                      # stopped: the rest is left for a rerun
            rank, message = item
            try:
                self._handle(rank, message)
            except BaseException as error:
                self.error = error

    def _handle(self, rank: int, message: tuple) -> None:
        kind = message[0]
        if kind == "lost":
            self.summary.lost.append(f"process {rank}: {message[1]}" if rank >= 0 else message[1])
            return
        job = self.todo[message[1]]
        ok = self.run.write(job, message[2]) if kind == "result" else self.run.fail(job, message[2])
        self.summary.written_by[job.folder] = rank
        if self.on_group is not None:
            self.on_group(job, rank, ok)


class _Inbox:
    """Process 0's receiver thread: the other processes' messages, as they come, go to the writer."""

    def __init__(self, procs: Processes, writer: _Writer):
        self.thread = threading.Thread(target=self._receive, args=(procs, writer), daemon=True,
                                       name="characonsist-inbox")
        self.thread.start()

    @staticmethod
    def _receive(procs: Processes, writer: _Writer) -> None:
        pending = procs.size - 1
        while pending:
            try:
                rank, message = procs.receive()
            except Exception as error:    # a process died or the connection broke: stop waiting for anyone
                writer.put(-1, ("lost", f"the connection to the other processes broke ({type(error).__name__}: "
                                        f"{error}); their unfinished groups are left for a rerun"))
                return
            if message[0] in ("done", "lost"):
                pending -= 1
            if message[0] != "done":
                writer.put(rank, message)

    def wait(self, writer: _Writer) -> None:
        """Until every other process is done (or lost), or the writer stopped."""
        while self.thread.is_alive():
            writer.check()
            self.thread.join(timeout=1.0)


class _Closing:
    """Close a ``StoryRun`` (manifest saved, lock released) however the block ends."""

    def __init__(self, run: StoryRun):
        self.run = run

    def __enter__(self) -> StoryRun:
        return self.run

    def __exit__(self, *exc) -> None:
        self.run.__exit__(*exc)
