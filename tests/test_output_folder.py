"""Data safety and file-system problems: the output folder's lock, its owned temporaries, paths kept inside it,
files it did not write left alone, and one clear line (exit 2) for every file-system problem.

The engine is the fake of ``conftest.py`` (``characonsist.app.loading.load_engine`` monkeypatched).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from characonsist import cli
from characonsist.app import folder as folder_module
from characonsist.app import loading as app_loading
from characonsist.app.folder import JOURNAL_NAME, LOCK_NAME, TMP_MARK, FolderError, OutputFolder
from conftest import FakeEngine  # the fake engine; its fixture `fake` is conftest's
from test_cli import run, snapshot, write  # the CLI tests' helpers

ROOT = Path(__file__).resolve().parents[1]
STORY = "park#a cat#sits\npark#a cat#runs\n\nbeach#a dog#swims\nbeach#a dog#digs\n"
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0   # root ignores permission bits


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def child(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env, **kwargs)


HOLD = """
import sys, time
from characonsist.app.folder import OutputFolder
OutputFolder(sys.argv[1]).open()
print("locked", flush=True)
time.sleep(120)
"""


# ------------------------------------------------------------------ one run at a time

def test_a_second_run_stops_while_another_process_holds_the_folder(tmp_path, model_dir, fake, capsys):
    out = tmp_path / "out"
    holder = child(HOLD, str(out))
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run(tmp_path, model_dir, story=write(tmp_path, "story.txt", STORY)) == cli.EXIT_BAD_INPUT
        line = one_line(capsys.readouterr().err)
        assert f"{out} is in use by another characonsist run (pid {holder.pid} since" in line
        assert "wait for it to finish or choose another folder" in line
        assert fake.loads == [] and not (out / "group_000").exists()
    finally:
        holder.kill()   # SIGKILL, as a crash: the kernel drops the lock with the process
        holder.wait()
    assert run(tmp_path, model_dir, story=write(tmp_path, "story.txt", STORY)) == 0   # not left stuck
    assert (out / "group_001" / "storyboard.png").exists()


def test_two_story_files_into_one_folder_never_overwrite_each_other(tmp_path, model_dir, fake, capsys):
    a = write(tmp_path, "a.txt", "park#a cat#sits\npark#a cat#runs\n")
    b = write(tmp_path, "b.txt", "beach#a dog#swims\nbeach#a dog#digs\n")
    assert run(tmp_path, model_dir, story=a) == 0
    before = snapshot(tmp_path / "out")
    assert run(tmp_path, model_dir, story=b) == cli.EXIT_BAD_INPUT
    assert "generated with other settings" in capsys.readouterr().err
    assert snapshot(tmp_path / "out") == before
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["stories"] == [str(a)]


# ------------------------------------------------------------------ only what it wrote is deleted

KILLED_MID_WRITE = """
import os, sys
from characonsist.app import folder
out = folder.OutputFolder(sys.argv[1]).open()
folder.os.replace = lambda *a: os.kill(os.getpid(), 9)   # killed between writing the temporary and the rename
out.write_bytes("group_000/identity.png", b"half an image")
"""


def test_only_temporaries_this_tool_listed_are_deleted(tmp_path):
    out = tmp_path / "out"
    killed = child(KILLED_MID_WRITE, str(out))
    killed.wait()
    assert killed.returncode == -9
    leftover = [p for p in (out / "group_000").iterdir() if TMP_MARK in p.name]
    assert len(leftover) == 1 and leftover[0].read_bytes() == b"half an image"
    planted = {out / "group_000" / ".identity.png.tmp-999": b"a",                      # the old pattern
               out / "group_000" / f".frame_01.png{TMP_MARK}1-abcd": b"b",            # even ours, if not listed
               out / "home" / "projects" / "thesis" / ".draft.tex.tmp-autosave": b"c"}
    for path, data in planted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with OutputFolder(out):
        assert not leftover[0].exists()                 # the killed run's temporary: listed, so removed
        for path, data in planted.items():
            assert path.read_bytes() == data            # everything else stays
    assert not (out / JOURNAL_NAME).exists()


def test_the_journal_never_deletes_outside_the_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / f".victim{TMP_MARK}x"
    victim.write_bytes(b"precious")
    (out / JOURNAL_NAME).write_text(f"../{victim.name}\n{victim}\n")
    with OutputFolder(out):
        pass
    assert victim.read_bytes() == b"precious"


@pytest.mark.parametrize("name", [LOCK_NAME, JOURNAL_NAME])
def test_a_users_file_with_a_bookkeeping_name_is_neither_emptied_nor_deleted(tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("my shopping list\n")
    with pytest.raises(FolderError, match=f"{name} was not written by characonsist"):
        OutputFolder(out).open()
    assert (out / name).read_text() == "my shopping list\n"
    with OutputFolder(out / "fresh") as folder:          # what characonsist writes there is its own, run after run
        folder.write_bytes("a.txt", b"x")
    with OutputFolder(out / "fresh"):
        pass


def test_a_journal_line_torn_by_a_kill_does_not_block_the_next_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    left = out / "group_000" / f".frame_01.png{TMP_MARK}1-abcd"
    left.parent.mkdir()
    left.write_bytes(b"half")
    (out / JOURNAL_NAME).write_text(f"group_000/{left.name}\ngroup_000/.frame_02.png.tmp-chara")   # killed mid-line
    with OutputFolder(out):
        assert not left.exists()
    assert not (out / JOURNAL_NAME).exists()


def test_files_characonsist_did_not_write_are_never_replaced(tmp_path, model_dir, fake, capsys):
    story = write(tmp_path, "story.txt", STORY)
    mine = tmp_path / "out" / "group_000" / "frame_01.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own picture")
    for extra in ([], ["--overwrite"]):
        assert run(tmp_path, model_dir, *extra, story=story) == cli.EXIT_BAD_INPUT
        line = one_line(capsys.readouterr().err)
        assert "group_000/frame_01.png" in line and "did not write" in line and "move them away" in line
    assert mine.read_bytes() == b"my own picture" and fake.loads == []
    mine.unlink()
    (tmp_path / "out" / "manifest.json").write_text('{"mine": true}')
    assert run(tmp_path, model_dir, story=story) == cli.EXIT_BAD_INPUT
    assert "manifest.json was not written by characonsist" in one_line(capsys.readouterr().err)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == {"mine": True}


def test_planted_links_and_files_in_the_way_are_refused(tmp_path, model_dir, fake, capsys):
    story = write(tmp_path, "story.txt", STORY)
    out = tmp_path / "out"
    out.mkdir()
    victim = write(tmp_path, "victim.txt", "precious")
    (out / ".characonsist.lock").symlink_to(victim)          # the lock file is never followed out
    assert run(tmp_path, model_dir, story=story) == cli.EXIT_BAD_INPUT
    assert "is not a plain file (characonsist's lock file)" in one_line(capsys.readouterr().err)
    assert victim.read_text() == "precious"
    (out / ".characonsist.lock").unlink()
    (out / "group_001").write_text("a file where a group's folder goes")
    assert run(tmp_path, model_dir, story=story) == cli.EXIT_BAD_INPUT
    assert "group_001: group_001" in one_line(capsys.readouterr().err) and fake.loads == []
    assert (out / "group_001").read_text() == "a file where a group's folder goes"


# ------------------------------------------------------------------ never outside --out

def test_a_story_name_that_would_leave_the_folder_is_refused(tmp_path, model_dir, fake, capsys):
    dots = write(tmp_path, "...txt", "park#a cat#sits\npark#a cat#runs\n")      # stem ".."
    other = write(tmp_path, "b.txt", "beach#a dog#swims\nbeach#a dog#digs\n")
    out = tmp_path / "nest" / "out"
    assert cli.main(["generate", str(dots), str(other), "--model", str(model_dir), "--out", str(out),
                     "--quiet"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "...txt: the file's name (without its suffix) names its output folder, and '..' is not a folder name; " \
           "rename the file" in err
    assert not (tmp_path / "nest").exists() and fake.loads == []


def test_paths_are_kept_inside_the_folder(tmp_path, model_dir, fake, capsys):
    out = OutputFolder(tmp_path / "out")
    for bad in ("../x.png", "/etc/x.png", "a/../../x.png"):
        with pytest.raises(FolderError, match="outside"):
            out.path(bad)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "group_000").symlink_to(elsewhere)
    assert run(tmp_path, model_dir, story=write(tmp_path, "story.txt", STORY)) == cli.EXIT_BAD_INPUT
    assert "leads through a link out of --out" in one_line(capsys.readouterr().err)
    assert list(elsewhere.iterdir()) == []


# ------------------------------------------------------------------ file-system problems: one line, exit 2

def test_out_is_a_file_or_under_a_file(tmp_path, model_dir, fake, capsys):
    story = write(tmp_path, "story.txt", STORY)
    afile = write(tmp_path, "afile", "x")
    for out, says in ((afile, "is a file, not a folder"), (afile / "sub" / "out", "is a file, so nothing can be")):
        assert cli.main(["generate", str(story), "--model", str(model_dir), "--out", str(out),
                         "--quiet"]) == cli.EXIT_BAD_INPUT
        line = one_line(capsys.readouterr().err)
        assert str(out) in line and says in line
    assert fake.loads == [] and afile.read_text() == "x"


def without_override(args: list[str]) -> subprocess.CompletedProcess:
    """``python -m characonsist ARGS`` in a process that the permission bits bind: as it is for a user; for root,
    through util-linux's ``setpriv`` with the capabilities that bypass them dropped (still uid 0, so a root-owned
    file's owner bits apply)."""
    prefix = []
    if ROOT_USER:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root without util-linux's setpriv: the permission bits cannot bind this process")
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner"]
        probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
        if probe.returncode:   # dropping capabilities needs CAP_SETPCAP, which some containers withhold
            pytest.skip(f"setpriv cannot drop capabilities here: {probe.stderr.strip()}")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([*prefix, sys.executable, "-m", "characonsist", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow
def test_real_permissions_no_write_no_read(tmp_path, model_dir, fake, capsys):
    story = write(tmp_path, "story.txt", STORY)
    base = ["generate", str(story), "--model", str(model_dir), "--height", "32", "--width", "48", "--steps", "3",
            "--quiet"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    done = tmp_path / "done"
    try:
        fresh = without_override([*base, "--out", str(locked / "out")])          # cannot create it
        assert fresh.returncode == cli.EXIT_BAD_INPUT and "Traceback" not in fresh.stderr
        assert f"{locked / 'out'}" in one_line(fresh.stderr) and "permission denied" in fresh.stderr
        empty = without_override([*base, "--out", str(locked)])                   # exists, work remains
        assert empty.returncode == cli.EXIT_BAD_INPUT
        assert "is not writable (permission denied) and 2 group(s) remain" in one_line(empty.stderr)
        assert run(tmp_path, model_dir, story=story, out="done") == 0             # finished, then made read-only
        before = snapshot(done)
        for folder in (done, *[p for p in done.rglob("*") if p.is_dir()]):
            folder.chmod(0o555)
        noop = without_override([*base, "--out", str(done)])
        assert noop.returncode == 0 and noop.stderr == "", noop.stderr            # nothing to do: nothing written
        story.chmod(0)
        unreadable = without_override([*base, "--out", str(tmp_path / "o")])
        assert unreadable.returncode == cli.EXIT_BAD_INPUT
        assert f"{story}: cannot read the story file (Permission denied)" in one_line(unreadable.stderr)
    finally:
        for folder in (locked, *[p for p in done.rglob("*") if p.is_dir()], done):
            if folder.exists():
                folder.chmod(0o755)
        story.chmod(0o644)
    assert snapshot(done) == before and not (locked / "out").exists() and len(fake.loads) == 1


@pytest.fixture
def tmpfs(tmp_path):
    """A real small file system of its own (root with the right to mount: this project's machines and CI), so
    read-only and full disks are the kernel's, not a stand-in; skipped where it cannot be mounted."""
    mounted = []

    def mount(name: str, size: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command here")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
        mounted.append(where)
        return where

    def remount(where: Path, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True, capture_output=True)

    mount.remount = remount
    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], capture_output=True)


def test_a_real_read_only_file_system(tmp_path, model_dir, fake, capsys, tmpfs):
    disk = tmpfs("disk", "4m")
    story = write(tmp_path, "story.txt", STORY)
    assert run(disk, model_dir, story=story) == 0
    before = snapshot(disk / "out")
    tmpfs.remount(disk, "ro")
    assert run(disk, model_dir, story=story) == 0                   # nothing to do: nothing to write
    assert run(disk, model_dir, story=story, out="new") == cli.EXIT_BAD_INPUT
    line = one_line(capsys.readouterr().err)
    assert str(disk / "new") in line and "read-only file system" in line and "choose a writable place" in line
    more = write(tmp_path, "story.txt", STORY + "\ncity#a cat#waits\ncity#a cat#sleeps\n")
    assert run(disk, model_dir, story=more) == cli.EXIT_BAD_INPUT   # a group to make, on a read-only disk
    assert "is not writable (read-only file system) and 1 group(s) remain" in one_line(capsys.readouterr().err)
    assert len(fake.loads) == 1 and snapshot(disk / "out") == before


def test_a_real_full_disk_stops_with_one_line_and_resumes_when_there_is_room(tmp_path, model_dir, fake, capsys,
                                                                           tmpfs):
    disk = tmpfs("disk", "16k")
    story = write(tmp_path, "story.txt", STORY)
    assert run(disk, model_dir, story=story) == cli.EXIT_BAD_INPUT
    line = one_line(capsys.readouterr().err)
    assert "no space left on the device; free some space and rerun the same command to resume" in line
    assert not [p for p in (disk / "out").rglob("*") if TMP_MARK in p.name]     # no torn temporary left behind
    kept = snapshot(disk / "out")
    tmpfs.remount(disk, "size=4m")
    assert run(disk, model_dir, story=story) == 0
    done = snapshot(disk / "out")
    assert all(done[name] == data for name, data in kept.items())            # what was finished stayed as it was
    assert {"group_000/identity.png", "group_001/frame_01.png"} <= done.keys()


def test_no_permission_is_found_before_any_work(tmp_path, model_dir, fake, capsys, monkeypatch):
    monkeypatch.setattr(folder_module.os, "access", lambda path, mode: False)   # as for a non-root user
    assert run(tmp_path, model_dir, story=write(tmp_path, "story.txt", STORY)) == cli.EXIT_BAD_INPUT
    line = one_line(capsys.readouterr().err)
    assert "is not writable (permission denied)" in line and "choose a place you can write to" in line
    assert fake.loads == []


def read_only(monkeypatch):
    """The folder's file system turns read-only: creating the lock file fails with EROFS."""
    real_open = os.open

    def fake_open(path, flags, *args):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(folder_module.os, "open", fake_open)


def test_read_only_output_noop_rerun_succeeds_and_work_stops_before_the_model(tmp_path, model_dir, fake, capsys,
                                                                             monkeypatch):
    story = write(tmp_path, "story.txt", STORY)
    assert run(tmp_path, model_dir, story=story) == 0
    before = snapshot(tmp_path / "out")
    with monkeypatch.context() as m:
        read_only(m)
        assert run(tmp_path, model_dir, story=story) == 0            # nothing to do: nothing to write
        (tmp_path / "out" / "group_001" / "frame_01.png").unlink()
        assert run(tmp_path, model_dir, story=story) == cli.EXIT_BAD_INPUT
        line = one_line(capsys.readouterr().err)
        assert "is not writable (read-only file system) and 1 group(s) remain" in line
    assert len(fake.loads) == 1
    assert run(tmp_path, model_dir, story=story) == 0
    assert snapshot(tmp_path / "out") == before


def test_disk_full_mid_run_stops_with_one_line_and_keeps_what_is_done(tmp_path, model_dir, fake, capsys,
                                                                      monkeypatch):
    story = write(tmp_path, "story.txt", STORY)
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > 5:   # the manifest, then group_000's two images and storyboard fit; then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(folder_module.os, "fsync", fsync)
    assert run(tmp_path, model_dir, story=story) == cli.EXIT_BAD_INPUT
    line = one_line(capsys.readouterr().err)
    assert "group_001" in line and "no space left on the device" in line
    assert "free some space and rerun the same command to resume" in line
    out = tmp_path / "out"
    assert (out / "group_000" / "storyboard.png").exists()
    assert not [p for p in out.rglob("*") if TMP_MARK in p.name]
    monkeypatch.setattr(folder_module.os, "fsync", real_fsync)
    assert run(tmp_path, model_dir, story=story) == 0
    assert fake.calls == ["group_000", "group_001", "group_001"]   # resumed, group_000 not made again


def test_unreadable_or_wrong_story_files(tmp_path, model_dir, fake, capsys, monkeypatch):
    folder = tmp_path / "stories"
    folder.mkdir()
    assert run(tmp_path, model_dir, story=folder) == cli.EXIT_BAD_INPUT
    assert f"{folder}: is a folder, not a story file" in one_line(capsys.readouterr().err)
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)                       # reading it would block forever
    assert run(tmp_path, model_dir, story=fifo) == cli.EXIT_BAD_INPUT
    assert f"{fifo}: not a regular file (a device, pipe or socket); give a story file" in \
        one_line(capsys.readouterr().err)
    story = write(tmp_path, "story.txt", STORY)
    real = Path.read_text

    def denied(self, *args, **kwargs):
        if self == story:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Path, "read_text", denied)
        assert run(tmp_path, model_dir, story=story) == cli.EXIT_BAD_INPUT
    line = one_line(capsys.readouterr().err)
    assert f"{story}: cannot read the story file (Permission denied); check its permissions" in line
    if not ROOT_USER:
        story.chmod(0)
        assert run(tmp_path, model_dir, story=story) == cli.EXIT_BAD_INPUT
        assert "cannot read the story file" in one_line(capsys.readouterr().err)
    assert fake.loads == []


def test_bench_json_and_demo_out_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    import types

    import characonsist.toy

    ran = []
    bench = types.ModuleType("characonsist.toy.bench")
    bench.add_arguments = lambda parser: (parser.add_argument("--json"), parser.add_argument("--images"))
    bench.run = lambda args: ran.append(args) or 0
    monkeypatch.setitem(sys.modules, "characonsist.toy.bench", bench)
    monkeypatch.setattr(characonsist.toy, "bench", bench, raising=False)
    afile = write(tmp_path, "afile", "x")
    for argv, says in ((["--json", str(afile / "r.json")], "is a file, so nothing can be created under it"),
                       (["--json", str(tmp_path)], "is a folder: give a file path"),
                       (["--images", str(afile)], "is a file, not a folder")):
        assert cli.main(["bench", "toy", *argv]) == cli.EXIT_BAD_INPUT
        assert says in one_line(capsys.readouterr().err)
    assert ran == []

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", args.json)

    bench.run = full
    assert cli.main(["bench", "toy", "--json", str(tmp_path / "r.json")]) == cli.EXIT_BAD_INPUT
    assert f"writing {tmp_path / 'r.json'}: no space left" in one_line(capsys.readouterr().err)
    assert cli.main(["demo", "--out", str(afile), "--quiet"]) == cli.EXIT_BAD_INPUT
    assert "--out" in one_line(capsys.readouterr().err)


def test_manifest_is_strict_json(tmp_path, model_dir, fake):
    original = FakeEngine.__call__

    def nan_settings(self, job, progress_callback=None):
        result = original(self, job)
        result.settings = {"method": "characonsist", "odd": float("nan"), "inf": float("inf")}
        return result

    fake.__class__ = type("NanEngine", (FakeEngine,), {"__call__": nan_settings})
    assert run(tmp_path, model_dir, story=write(tmp_path, "story.txt", STORY)) == 0

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text(), parse_constant=refuse)
    assert manifest["groups"][0]["engine_settings"] == {"method": "characonsist", "odd": None, "inf": None}


def test_empty_out_and_unreadable_weights_are_one_line(tmp_path, model_dir, capsys, monkeypatch):
    story = write(tmp_path, "story.txt", STORY)
    assert cli.main(["generate", str(story), "--model", str(model_dir), "--out", " ", "--quiet"]) == 2
    assert "--out: give an output folder" in one_line(capsys.readouterr().err)

    def unreadable(ref, settings, progress=True):
        raise PermissionError(errno.EACCES, "Permission denied", str(model_dir / "transformer" / "x.safetensors"))

    monkeypatch.setattr(app_loading, "load_engine", unreadable)
    assert run(tmp_path, model_dir, story=story) == cli.EXIT_BAD_INPUT
    line = one_line(capsys.readouterr().err)
    assert f"loading the model from {model_dir / 'transformer' / 'x.safetensors'}: permission denied" in line


@pytest.mark.parametrize("change, message", [
    ({"num_layers": "two"}, "TypeError"),                           # a config the model class cannot be built from
    ({"num_attention_heads": 8}, "expected shape"),                 # weights of another shape than the config says
])
def test_a_model_folder_with_broken_files_is_one_line(tmp_path, capsys, change, message):
    import shutil

    from characonsist.toy.model import TOY_MODEL_DIR

    model = tmp_path / "model"
    shutil.copytree(TOY_MODEL_DIR, model)
    config = model / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    story = write(tmp_path, "story.txt", "a sunny beach#a robot#big in the middle\na grey city#a robot#small on the left\n")
    assert cli.main(["generate", str(story), "--model", str(model), "--out", str(tmp_path / "out"), "--steps", "2",
                     "--quiet"]) == cli.EXIT_BAD_INPUT
    line = one_line(capsys.readouterr().err)
    assert f"loading the model {model}: " in line and message in line and "check the model's files" in line


@pytest.mark.slow
def test_real_permissions_for_the_bench_report_and_the_demo(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        bench = without_override(["bench", "toy", "--limit", "1", "--json", str(locked / "report.json")])
        demo = without_override(["demo", "--out", str(locked / "demo"), "--quiet"])
    finally:
        locked.chmod(0o755)
    for done, path in ((bench, locked / "report.json"), (demo, locked / "demo")):
        assert done.returncode == cli.EXIT_BAD_INPUT and "Traceback" not in done.stderr
        line = one_line(done.stderr)
        assert str(path) in line and "permission denied" in line
    assert list(locked.iterdir()) == []
