"""Data-parallel runs on the CPU, on the shipped toy model: two processes started with the command
``--gpus 2`` starts (``accelerate launch --multi_gpu --num_processes 2 -m characonsist ...``, which on a machine
without CUDA runs them on the CPU), and a local Ray cluster. Every group is written exactly once, a killed
process's groups are taken up by a rerun, and the folder (images, storyboards, manifest) equals a one-process
run's byte for byte. Workers run with one torch thread (torchrun's and Ray's default), so the reference does too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from characonsist import cli
from characonsist.app import parallel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from dp_compare import compare_folders, differences, strip_timings  # noqa: E402

SCENES = ["a sunny beach", "a green forest", "a grey city", "a starry night", "a sunny beach", "a grey city"]
KINDS = ["a robot", "a cat", "a bird", "a robot", "a cat", "a bird"]
STORY = "\n".join(f"{scene}#{kind}#big in the middle\n{scene}#{kind}#small on the left\n"
                  for scene, kind in zip(SCENES, KINDS, strict=True))          # six groups: identity + one frame each
ARGS = ["--model", "toy", "--steps", "3"]
GROUPS = [f"group_{i:03d}" for i in range(len(SCENES))]
WRITTEN = re.compile(r"(group_\d+): written \((?:process|worker) (\d+)\)")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The story file, with the same relative path in every run (the manifest records it as given)."""
    folder = tmp_path_factory.mktemp("dp")
    (folder / "story.txt").write_text(STORY)
    return folder


@pytest.fixture(scope="module")
def reference(workdir):
    """The one-process run."""
    here, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(workdir)
    torch.set_num_threads(1)
    try:
        assert cli.main(["generate", "story.txt", *ARGS, "--out", "one", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
        os.chdir(here)
    return workdir / "one"


def launch(workdir: Path, out: str, mark: str = "") -> subprocess.Popen:
    """Two processes on the CPU, started by the command ``--gpus 2`` starts."""
    command = parallel.launch_command(2, ["generate", "story.txt", *ARGS, "--out", out])
    env = {**parallel.launch_environment(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "CHARACONSIST_TEST_RUN": mark, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def written(output: str) -> list[tuple[str, int]]:
    return [(m.group(1), int(m.group(2))) for m in WRITTEN.finditer(output)]


def test_launch_command_and_options():
    argv = ["generate", "s.txt", "--gpus", "2", "--out", "o", "--gpus=3", "--model", "toy"]
    assert parallel.without_option(argv, "--gpus") == ["generate", "s.txt", "--out", "o", "--model", "toy"]
    command = parallel.launch_command(4, ["generate", "s.txt"])
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "4" and "--multi_gpu" in command
    assert command[-4:] == ["-m", "characonsist", "generate", "s.txt"]
    assert parallel.launched_processes() == 1 and parallel.join() is None    # alone: no process group


def test_gpus_without_cuda_is_one_clear_line(workdir, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert cli.main(["generate", str(workdir / "story.txt"), *ARGS, "--out", str(workdir / "x"), "--gpus", "2"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    assert cli.main(["generate", str(workdir / "story.txt"), *ARGS, "--out", str(workdir / "x"), "--workers", "2"]) == 2
    assert "--workers N is the number of Ray actors" in capsys.readouterr().err
    story = str(workdir / "story.txt")
    assert cli.main(["generate", "--ray", story, story, *ARGS, "--out", str(workdir / "x")]) == 2
    assert "put --ray after the story files" in capsys.readouterr().err
    assert not (workdir / "x").exists()


def _worker_pid(mark: str, rank: int) -> int | None:
    """The pid of the launched process of ``rank`` in the run marked ``mark`` (from /proc)."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = dict(item.split("=", 1) for item in environ.read_bytes().decode(errors="replace").split("\0")
                       if "=" in item)
        except OSError:
            continue
        if env.get("CHARACONSIST_TEST_RUN") == mark and env.get("RANK") == str(rank) and "LOCAL_RANK" in env:
            return int(environ.parent.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc")
def test_two_processes_a_killed_one_and_a_rerun_write_every_group_once(workdir, reference):
    """Process 1 is killed once the first group is written; torchrun stops process 0, which saves the manifest.
    The rerun (two processes again) takes up exactly the groups left, split between both; the folder then equals
    the one-process run's byte for byte (no stray temporaries, the manifest included)."""
    out, mark = workdir / "two", uuid.uuid4().hex
    process = launch(workdir, "two", mark)
    deadline = time.monotonic() + 240
    while not list(out.glob("group_*/storyboard.png")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = _worker_pid(mark, 1)
    assert pid is not None, "process 1 had ended before its groups were done"
    os.kill(pid, signal.SIGKILL)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    first = written(output)
    assert {rank for _, rank in first} <= {0, 1}
    manifest = json.loads((out / "manifest.json").read_text())      # whole, never half-written
    done = {g["name"] for g in manifest["groups"] if g["status"] == "done"}
    assert {g for g, _ in first} <= done
    left = [g for g in GROUPS if g not in done]
    assert {"group_003", "group_004", "group_005"} & set(left)      # process 1's share was cut short

    process = launch(workdir, "two")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    assert f"{len(done)} already done, {len(left)} to generate over 2 processes" in output
    again = written(output)
    assert sorted(g for g, _ in again) == left                       # the rest, each exactly once
    half = (len(left) + 1) // 2                                      # accelerate's contiguous split
    assert dict(again) == {g: 0 if i < half else 1 for i, g in enumerate(left)}
    assert compare_folders(reference, out) == []


@pytest.mark.slow
def test_bench_toy_in_two_processes_merges_one_json(workdir):
    common = ["--reduced", "--limit", "3", "--methods", "oracle", "--threads", "1", "--quiet"]   # the readout, no model
    here = os.getcwd()
    os.chdir(workdir)
    try:
        assert cli.main(["bench", "toy", *common, "--json", "b1.json", "--images", "b1"]) == 0
    finally:
        os.chdir(here)
    command = parallel.launch_command(2, ["bench", "toy", *common, "--json", "b2.json", "--images", "b2"])
    env = {**parallel.launch_environment(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "toy bench: 3 stories (reduced)" in result.stdout and "2 processes on cpu" in result.stdout
    one, two = (json.loads((workdir / name).read_text()) for name in ("b1.json", "b2.json"))
    assert two["settings"]["processes"] == 2 and len(two["methods"]["oracle"]["stories"]) == 3
    assert differences(strip_timings(one), strip_timings(two)) == []
    assert compare_folders(workdir / "b1", workdir / "b2") == []


def test_merged_bench_results_equal_one_run():
    """The merge alone (oracle: no model): two shares of a suite give the one-process result."""
    from characonsist.toy import bench, runner, scoring
    from characonsist.toy.suite import reduced_suite

    stories = reduced_suite()[:3]
    whole = runner.run_bench(None, stories, ["oracle"])
    parts = [runner.run_bench(None, stories[:2], ["oracle"]), runner.run_bench(None, stories[2:], ["oracle"])]
    merged = scoring.merge_results(parts)
    assert differences(strip_timings(bench._plain(whole)), strip_timings(bench._plain(merged))) == []
    assert merged["methods"]["oracle"]["metrics"]["wall_seconds"] == max(
        p["methods"]["oracle"]["metrics"]["wall_seconds"] for p in parts)


@pytest.mark.slow
def test_ray_local_cluster_writes_every_group_once_like_one_process(workdir, reference, capsys):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=200 * 2**20)
    here = os.getcwd()
    os.chdir(workdir)
    try:
        assert cli.main(["generate", "story.txt", *ARGS, "--out", "ray", "--ray", "--workers", "2"]) == 0
        output = capsys.readouterr().out
        done = written(output)
        assert sorted(g for g, _ in done) == GROUPS                        # every group exactly once
        assert {worker for _, worker in done} == {0, 1}                   # by both actors
        assert "2 Ray worker(s) on 1 host(s)" in output
        assert compare_folders(reference, workdir / "ray") == []
        assert cli.main(["generate", "story.txt", *ARGS, "--out", "ray", "--ray", "--workers", "2"]) == 0
        assert "6 already done, 0 to generate" in capsys.readouterr().out  # resume: nothing to do, no actor
    finally:
        os.chdir(here)
        ray.shutdown()


@pytest.mark.slow
def test_dp_bench_runs_the_parallel_path_in_one_process(tmp_path):
    """bench/dp_bench.py (the GPU measurement) at toy widths on the CPU: random weights through the same run."""
    import dp_bench

    threads = torch.get_num_threads()
    try:
        status = dp_bench.main(["--size", "tiny", "--stories", "2", "--frames", "1", "--steps", "2", "--height", "64",
                                "--max-sequence-length", "128", "--out", str(tmp_path), "--images", str(tmp_path / "img"),
                                "--inputs", str(tmp_path / "in"), "--tag", "t"])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    result = json.loads((tmp_path / "dp_t.json").read_text())
    assert (result["processes"], result["groups"], result["images"]) == (1, 2, 4)
    assert result["per_process"][0]["groups"] == ["group_000", "group_001"] and result["run_seconds"] > 0
    manifest = json.loads((tmp_path / "img" / "manifest.json").read_text())
    assert [g["status"] for g in manifest["groups"]] == ["done", "done"]


class _Ref:
    def __init__(self, value=None, error=None):
        self.value, self.error = value, error


class _Actor:
    """A fake Ray actor handle: ``generate.remote(job)`` gives a ref; after ``dies_after`` groups it is lost."""

    def __init__(self, name: str, dies_after: int | None = None):
        self.name, self.dies_after, self.taken = name, dies_after, []
        self.generate = self

    def remote(self, job):
        from ray.exceptions import RayActorError

        self.taken.append(job.folder)
        if self.dies_after is not None and len(self.taken) > self.dies_after:
            return _Ref(error=RayActorError())
        return _Ref(("result", f"{job.folder} by {self.name}"))


class _FakeRay:
    def wait(self, refs, num_returns=1):
        return refs[:1], refs[1:]

    def get(self, ref):
        if ref.error is not None:
            raise ref.error
        return ref.value

    def cancel(self, ref, force=False):
        pass


def test_ray_dispatch_hands_a_lost_actors_group_to_another():
    pytest.importorskip("ray")
    from types import SimpleNamespace

    from characonsist.app import ray_runner

    written = []
    run = SimpleNamespace(write=lambda job, payload: written.append((job.folder, payload)) or True,
                          fail=lambda job, why: pytest.fail(why))
    todo = [SimpleNamespace(folder=g, group=SimpleNamespace(picture=None)) for g in GROUPS]
    actors = [_Actor("a"), _Actor("b", dies_after=1)]
    summary = parallel.Summary()
    ray_runner._dispatch(_FakeRay(), run, todo, actors, summary, None)
    assert sorted(g for g, _ in written) == GROUPS                    # every group once, none lost
    assert len(actors[1].taken) == 2 and actors[1].taken[1] in actors[0].taken   # its second group went to "a"
    assert summary.lost and "went to another worker" in summary.lost[0]


def test_writer_stops_at_a_file_system_error_and_raises_it():
    from types import SimpleNamespace

    from characonsist.app.folder import FolderError

    def write(job, result):
        if job.folder == "group_001":
            raise FolderError("writing group_001/identity.png: no space left on the device")
        return True

    seen = []
    run = SimpleNamespace(write=write, fail=None, failed=0)
    todo = [SimpleNamespace(folder=g) for g in GROUPS[:3]]
    writer = parallel._Writer(run, todo, parallel.Summary(), lambda job, rank, ok: seen.append(job.folder))
    for index in range(3):
        writer.put(index % 2, ("result", index, None))
    with pytest.raises(FolderError, match="no space"):
        writer.close()
    assert seen == ["group_000"]          # nothing after the error is written


class _Procs:
    """A stand-in for ``parallel.Processes``: what process 0 broadcasts, and what a worker receives."""

    def __init__(self, rank: int, received=None):
        self.rank, self.size, self.local_rank, self.main = rank, 2, rank, rank == 0
        self.sent, self.received = [], received

    def broadcast(self, obj=None):
        self.sent.append(obj)
        return obj if self.main else self.received


@pytest.mark.slow
def test_bad_input_is_reported_by_process_0_and_stops_the_others(workdir):
    from characonsist.app import StoryRequest
    from characonsist.inputs import InputError

    request = StoryRequest(stories=[str(workdir / "story.txt")], model="toy", out=str(workdir / "bad"),
                           num_inference_steps=0)
    main = _Procs(0)
    with pytest.raises(InputError, match="num_inference_steps=0"):
        parallel.generate(request, main)
    assert main.sent == [None]                     # the others are told to stop before any work
    worker = parallel.generate(request, _Procs(1, received=None))
    assert worker.stopped and not (workdir / "bad").exists()
    request.num_inference_steps, request.memory = 2, "balanced"
    with pytest.raises(InputError, match="balanced"):
        parallel.generate(request, _Procs(0))


def test_close_leaves_the_process_group(tmp_path):
    """A Python caller can leave gloo's group and go on."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    procs = parallel.Processes(state=None, rank=0, size=1, local_rank=0)
    assert dist.is_initialized()
    procs.close()
    assert not dist.is_initialized()
    procs.close()                          # a second close (error paths) is harmless


@pytest.mark.slow
def test_a_launched_process_exits_with_its_code_after_the_exit_handlers():
    """``exit_process``: under a launcher (WORLD_SIZE > 1) the code survives, buffered output and atexit handlers
    are not lost, and no interpreter teardown runs (no ``__del__`` at exit); alone, a normal ``sys.exit``."""
    script = ("import atexit, sys\n"
              "from characonsist.app.parallel import exit_process\n"
              "class Late:\n"
              "    def __del__(self): print('teardown ran', flush=True)\n"
              "late = Late()\n"
              "atexit.register(lambda: print('handler ran', flush=True))\n"
              "sys.stdout.write('buffered ')\n"
              "exit_process(3)\n")
    for size, teardown in (("2", False), ("1", True)):
        env = {**os.environ, "WORLD_SIZE": size}
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 3, result.stderr
        assert result.stdout.startswith("buffered handler ran")
        assert ("teardown ran" in result.stdout) is teardown


def test_ray_messages_name_the_workers_field_as_the_front_end_does():
    """A cluster too small for the workers asked for: the application layer names the field, the command line its
    flag (the cluster is described by an object with Ray's ``cluster_resources``; Ray itself is not needed)."""
    from types import SimpleNamespace

    from characonsist.app import ray_runner
    from characonsist.inputs import InputError

    cluster = SimpleNamespace(cluster_resources=lambda: {"GPU": 1, "CPU": 8})
    with pytest.raises(InputError, match=r"^workers=3: the Ray cluster has 1 GPU\(s\)"):
        ray_runner._resources(cluster, 3)
    with pytest.raises(InputError, match=r"^--workers 3: the Ray cluster has 1 GPU\(s\)"):
        ray_runner._resources(cluster, 3, {"workers": "--workers"})
    cpus = SimpleNamespace(cluster_resources=lambda: {"CPU": 8})
    with pytest.raises(InputError, match="give workers='N' to run N workers on its CPUs"):
        ray_runner._resources(cpus, None)
    assert ray_runner._resources(cpus, 2) == {"num_cpus": 1, "count": 2}
