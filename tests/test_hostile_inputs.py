"""Hostile inputs: nothing a user or a web page sends can exhaust the machine, end in a traceback or an
HTTP 500, or be taken silently in a wrong sense. Each test names the item of the issue it covers; the UI's go
through the real app (a started worker; the Host check and the streamed body through uvicorn on a real socket).
Every test here is fast: no model is loaded (the command line's engine is test_cli's fake; the callback test uses the
tiny random pipeline)."""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from characonsist import cli
from characonsist.inputs import InputError
from characonsist.story import StoryImage, coerce_images
from characonsist.storyfile import StoryError, load_story, parse_structured, parse_text
from test_cli import write


def bomb(levels: int, key: str = "title") -> str:
    """A YAML "billion laughs" in ``key``: ``levels`` anchored lists, each of nine aliases of the one before."""
    lines = [f"{key}:", "  - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    lines.append("scenes: [{frames: [{background: park, character: a cat, action: sits}]}]")
    return "\n".join(lines) + "\n"


def bounded(fn, seconds: float = 1.0, megabytes: float = 100.0):
    """Run ``fn``; assert it took under ``seconds`` and ``megabytes`` of Python allocations; its result or error."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        try:
            result = fn()
        except Exception as error:   # noqa: BLE001 - returned for the caller to check
            result = error
        took = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert took < seconds, f"took {took:.2f}s"
    assert peak < megabytes, f"peak {peak:.0f} MB"
    return result


# ------------------------------------------------------------------------------------------------- 1. aliases

def test_1_yaml_aliases_are_refused_while_loading_with_the_file_and_line(tmp_path, model_dir, fake, capsys):  # noqa: F811
    story = write(tmp_path, "bomb.yaml", bomb(10))
    assert len(story.read_bytes()) < 700
    error = bounded(lambda: load_story(story), seconds=1.0, megabytes=10)
    assert isinstance(error, StoryError)
    assert error.problems == [f"{story}:3: YAML alias *a0 refused: story files may not use aliases (*name, <<: *name), "
                              "which let a few bytes stand for billions of items; write the value out where it is used"]
    assert cli.main(["generate", str(story), "--model", str(model_dir), "--out", str(tmp_path / "out")]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{story}:3: YAML alias *a0 refused" in err and len(err.strip().splitlines()) == 1
    assert fake.loads == [] and not (tmp_path / "out").exists()
    # a merge key is an alias too; an anchor that is never used is harmless
    merged = "base: &b {background: park, character: a cat}\nscenes: [{frames: [{<<: *b, action: sits}]}]\n"
    with pytest.raises(StoryError, match=r"s.yaml:2: YAML alias \*b refused"):
        parse_structured(merged, "s.yaml")
    with pytest.raises(StoryError, match="unknown key 'base'"):
        parse_structured("base: &b park\nscenes: [{frames: [{background: park, character: a, action: b}]}]\n", "s.yaml")


def test_1_formatting_a_value_is_bounded_whatever_it_holds():
    from characonsist.inputs import excerpt

    shared = ["x" * 10]
    for _ in range(12):           # 10**12 items once expanded
        shared = [shared] * 10
    text = bounded(lambda: excerpt(shared), seconds=0.1, megabytes=1)
    assert len(text) <= 80 and text.startswith("[[[")


# ------------------------------------------------------------------------------------------------- 4. group size

def test_4_a_group_too_large_for_one_pass_is_refused_before_loading_with_its_line(tmp_path, model_dir, fake, capsys):  # noqa: F811
    from characonsist.app import StoryRequest, validate_request
    from characonsist.inputs import MAX_PASS_TOKENS

    lines = 1 + MAX_PASS_TOKENS // 4096    # FLUX.1's 1024 px images are 4096 tokens: one over the rule
    story = write(tmp_path, "long.txt", "\n" + "park#a cat#sitting\n" * lines)
    with pytest.raises(StoryError) as info:
        validate_request(StoryRequest(stories=[str(story)], model=str(model_dir), out=str(tmp_path / "out")))
    problem, = [p for p in info.value.problems if "group size rule" in p]
    assert problem.startswith(f"{story}:2: {lines} images in one group take {lines * 4096:,} image tokens in one pass")
    assert "give batch_size=64 (at most 64 images a pass) or split the group" in problem
    assert cli.main(["generate", str(story), "--model", str(model_dir), "--out", str(tmp_path / "out")]) == cli.EXIT_BAD_INPUT
    assert "give --batch-size 64 (at most 64 images a pass)" in capsys.readouterr().err
    assert fake.loads == []
    checked = validate_request(StoryRequest(stories=[str(story)], model=str(model_dir), out=str(tmp_path / "out"),
                                            batch_size=8))
    assert len(checked.stories[0].groups[0].images) == lines


def test_4_the_rule_counts_images_times_tokens_and_the_pixels_held():
    from characonsist.inputs import MAX_GROUP_PIXELS, group_size_problems

    assert group_size_problems([(1024, 1024)] * 64) == []                         # 64 x 4096 tokens: the limit
    assert "give batch_size=64" in group_size_problems([(1024, 1024)] * 65)[0]
    assert group_size_problems([(1024, 1024)] * 65, batch_size=8) == []
    many = [(1024, 1024)] * (MAX_GROUP_PIXELS // 2**20 + 1)
    problem, = group_size_problems(many, batch_size=8)
    assert "split the group into smaller ones" in problem


# ------------------------------------------------------------------------------------------------- 5. and 8. types

def test_5_a_title_that_is_not_text_stops_the_run_before_any_image(tmp_path, model_dir, fake, capsys):  # noqa: F811
    story = write(tmp_path, "story.yaml", "title: [1, 2, {a: b}]\nscenes:\n  - background: park\n    character: a cat\n"
                                          "    frames: [{action: sits}, {action: runs}]\n")
    status = cli.main(["generate", str(story), "--model", str(model_dir), "--out", str(tmp_path / "out"), "--layout", "2x2"])
    assert status == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{story}:1: 'title' must be text, got a list [1, 2, {{'a': 'b'}}]" in err and "Traceback" not in err
    assert fake.calls == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [
    ("scenes:\n  - frames:\n      - {background: p, character: c, action: a, caption: [1, 2]}\n",
     "s.yaml:3: scenes[0].frames[0]: 'caption' must be text, got a list [1, 2]"),
    ("scenes:\n  - frames:\n      - {background: p, character: c, action: a, caption: {k: v}}\n",
     "s.yaml:3: scenes[0].frames[0]: 'caption' must be text, got a mapping {'k': 'v'}"),
    ("scenes:\n  - name: [x, y]\n    frames: [{background: p, character: c, action: a}]\n",
     "s.yaml:2: scenes[0]: 'name' must be text, got a list ['x', 'y']"),
    ("scenes:\n  - name: 2024\n    frames: [{background: p, character: c, action: a}]\n",
     "s.yaml:2: scenes[0]: 'name' must be text, got a number 2024 (quote it: name: \"2024\")"),
    ("character: a\ncharacter: b\nscenes: [{frames: [{background: p, character: c, action: a}]}]\n",
     "s.yaml:2: duplicate key 'character' (first at line 1); a key may appear once per mapping: keep one"),
    ("scenes:\n  - frames:\n    - background: p\n      character: c\n      action: a\n      action: b\n",
     "s.yaml:6: duplicate key 'action' (first at line 5); a key may appear once per mapping: keep one"),
])
def test_8_text_fields_must_be_strings_and_keys_unique(text, message):
    with pytest.raises(StoryError) as info:
        parse_structured(text, "s.yaml")
    assert message in info.value.problems


def test_8_toml_text_fields_must_be_strings_too():
    text = 'title = 5\n[[scenes]]\nname = ["x"]\n[[scenes.frames]]\nbackground = "p"\ncharacter = "c"\naction = "a"\n' \
           'caption = 3\n'
    with pytest.raises(StoryError) as info:
        parse_structured(text, "s.toml", toml=True)
    assert info.value.problems == ["s.toml: 'title' must be text, got a number 5 (quote it: title = \"5\")",
                                   "s.toml: scenes[0]: 'name' must be text, got a list ['x']",
                                   "s.toml: scenes[0].frames[0]: 'caption' must be text, got a number 3 (quote it: "
                                   "caption = \"3\")"]


# ------------------------------------------------------------------------------------------------- 9. control characters

def test_9_control_characters_in_a_story_line_are_refused_with_line_and_column(tmp_path):
    story = write(tmp_path, "s.txt", "park#a cat#sitting\npark#a cat#run\x00ning\n\npark#a\x1b dog#sits\x7f\n")
    with pytest.raises(StoryError) as info:
        load_story(story)
    assert info.value.problems == [
        f"{story}:2:15: U+0000 (NUL) in the line; remove it (story lines may not hold control characters)",
        f"{story}:4:7: U+001B (ESC) in the line; remove it (story lines may not hold control characters)"]
    with pytest.raises(StoryError, match=r"s.yaml:2: scenes\[0\].frames\[0\]: the action field holds U\+0000 \(NUL\) "
                                         "at character 4"):
        parse_structured('scenes:\n  - frames: [{background: p, character: c, action: "run\\0"}]\n', "s.yaml")
    with pytest.raises(StoryError, match=r"s.yaml:2: scenes\[0\]: 'name' holds U\+0000 \(NUL\) at character 2"):
        parse_structured('scenes:\n  - name: "a\\0b"\n    frames: [{background: p, character: c, action: a}]\n',
                         "s.yaml")
    with pytest.raises(InputError, match=r"StoryImage: action holds U\+0000 \(NUL\) at character 2"):
        StoryImage("park", "a cat", "r\x00un")
    assert parse_text("park#a cat#sits\r\npark\t#a cat#runs\r\n", "s.txt").groups[0].where == ["s.txt:1", "s.txt:2"]


# ------------------------------------------------------------------------------------------------- 7. and 10. the API

def test_7_a_step_callback_returning_latents_of_another_shape_is_named(story_pipe):
    def halve(pipe, step, timestep, kwargs):
        return {"latents": kwargs["latents"][:, ::2]}

    with pytest.raises(InputError) as info:
        story_pipe("park#a cat#sits", ["park#a cat#runs"], height=32, width=32, num_inference_steps=2,
                   max_sequence_length=32, output_type="latent", method="vanilla", callback_on_step_end=halve)
    message = str(info.value)
    tokens, channels = (32 // story_pipe.vae_scale_factor // 2) ** 2, story_pipe.transformer.config.in_channels
    assert "callback_on_step_end test_7_a_step_callback_returning_latents_of_another_shape_is_named.<locals>.halve" \
        in message
    assert f"returned latents of shape (2, {tokens // 2}, {channels}) at step 0; expected shape (2, {tokens}, " \
           f"{channels})" in message


def test_10_frames_given_as_a_mapping_or_a_set_are_refused(story_pipe):
    for frames in ({"park#a cat#runs": 1}, {"park#a cat#runs"}):
        with pytest.raises(InputError, match=f"frames must be a list of images .*got a {type(frames).__name__}"):
            coerce_images("park#a cat#sits", frames)
        with pytest.raises(InputError, match="frames must be a list of images"):
            story_pipe.check_inputs("park#a cat#sits", frames)


# ------------------------------------------------------------------------------------------------- 10. and 11. bench

def test_10_bench_limit_and_steps_are_refused_before_any_story_or_model(monkeypatch, tmp_path, capsys):
    from characonsist.toy import bench

    monkeypatch.setattr(bench, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("the bench ran"))
    for argv, message in ((["--limit", "-1"], "--limit -1: give the number of stories to run, at least 1"),
                          (["--limit", "0"], "--limit 0: give the number of stories to run, at least 1"),
                          (["--steps", "0"], "--steps 0 must be between 1 and 1000"),
                          (["--steps", "5000"], "--steps 5000 must be between 1 and 1000")):
        assert cli.main(["bench", "toy", "--reduced", "--methods", "vanilla", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, argv


def test_11_bench_json_never_replaces_a_file_it_did_not_write(monkeypatch, tmp_path, capsys):
    from characonsist.toy import bench

    report = {"settings": {"seed": 1}, "methods": {}}
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: json.loads(json.dumps(report)))
    monkeypatch.setattr(bench, "format_tables", lambda result: "tables")
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    argv = ["bench", "toy", "--reduced", "--methods", "oracle", "--limit", "1", "--json", str(mine), "--quiet"]
    assert cli.main(argv) == 2
    assert "--json " + str(mine) + ": the file exists and is not a report of this bench; choose another path, or " \
        "add --force to replace it" in capsys.readouterr().err
    assert mine.read_text() == '{"my": "notes"}'
    before = mine.stat().st_ino
    assert cli.main([*argv, "--force"]) == 0
    written = json.loads(mine.read_text())
    assert written["settings"]["suite"] == "reduced" and mine.stat().st_ino != before   # renamed into place
    assert cli.main(argv) == 0                  # its own report is replaced without --force
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json"]    # no temporary left


# ------------------------------------------------------------------------------------------------- 12. before the model

def test_12_a_file_in_the_way_of_the_layouts_stops_the_run_before_the_model(tmp_path, model_dir, fake, capsys):  # noqa: F811
    story = write(tmp_path, "s.txt", "park#a cat#sits\npark#a cat#runs\n")
    (tmp_path / "out" / "layouts").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "out" / "layouts" / "2x2_01.png")
    argv = ["generate", str(story), "--model", str(model_dir), "--out", str(tmp_path / "out"), "--layout", "2x2", "--quiet"]
    assert cli.main(argv) == cli.EXIT_BAD_INPUT
    assert fake.loads == [] and fake.calls == []          # refused before the model, not after every group
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out' / 'layouts' / '2x2_01.png'} was not written by characonsist and --layout 2x2 writes " \
           "there" in err


def test_12_a_device_as_the_identity_picture_is_not_a_regular_file(tmp_path, model_dir):
    from characonsist.app import StoryRequest, validate_request

    story = write(tmp_path, "s.txt", "park#a cat#sits | /dev/zero\npark#a cat#runs\n")
    with pytest.raises(StoryError) as info:
        validate_request(StoryRequest(stories=[str(story)], model=str(model_dir), out=str(tmp_path / "out")))
    assert info.value.problems == [f"{story}:1: picture: /dev/zero is not a regular file (a device, pipe or socket); "
                                   "give an image file (PNG, JPEG, WebP, ...)"]


def test_12_another_story_into_a_used_folder_keeps_the_earlier_groups_in_the_manifest(tmp_path, model_dir, fake, capsys):  # noqa: F811
    out = tmp_path / "out"
    first = write(tmp_path, "a.yaml", "scenes: [{name: walk, background: park, character: a cat, "
                                      "frames: [{action: sits}, {action: runs}]}]\n")
    second = write(tmp_path, "b.yaml", "scenes: [{name: swim, background: beach, character: a dog, "
                                       "frames: [{action: swims}, {action: digs}]}]\n")
    for story in (first, second):
        assert cli.main(["generate", str(story), "--model", str(model_dir), "--out", str(out), "--steps", "2", "--height", "32", "--width", "32"]) == 0
    said = capsys.readouterr().out
    assert f"note: 1 group(s) in {out} are from an earlier run, not this story (000_walk); manifest.json keeps them " \
           "under 'earlier'" in said
    manifest = json.loads((out / "manifest.json").read_text())
    assert [g["name"] for g in manifest["groups"]] == ["000_swim"]
    assert [(g["name"], g["status"], g["stories"]) for g in manifest["earlier"]] == [("000_walk", "done", [str(first)])]
    assert cli.main(["generate", str(first), "--model", str(model_dir), "--out", str(out), "--steps", "2", "--height", "32", "--width", "32"]) == 0  # resumes
    manifest = json.loads((out / "manifest.json").read_text())
    assert [g["name"] for g in manifest["groups"]] == ["000_walk"]
    assert [g["name"] for g in manifest["earlier"]] == ["000_swim"]
    assert fake.calls == ["000_walk", "000_swim"]     # nothing generated twice


# ------------------------------------------------------------------------------------------------- the UI

pytest.importorskip("starlette")
pytest.importorskip("httpx")


@pytest.fixture()
def ui(tmp_path):
    """The UI's app over a started worker (the toy model named, never loaded: no job here needs it)."""
    from starlette.testclient import TestClient

    from characonsist.ui.server import create_app
    from characonsist.ui.worker import Worker
    from characonsist.ui.workspace import Workspace

    space = Workspace(tmp_path / "ui", "toy")
    worker = Worker(space, "toy")
    space.open()
    worker.start(preload=False)
    client = TestClient(create_app(worker, ["testserver"]))
    client.space = space
    yield client
    worker.stop()
    space.close()


STORY = {"title": "t", "character": "a cat", "scenes": [{"name": "walk", "background": "park",
                                                          "images": [{"action": "sits"}, {"action": "runs"}]}]}


def test_1_the_ui_refuses_an_alias_bomb_at_once(ui):
    response = bounded(lambda: ui.post("/api/parse", json={"filename": "s.yaml", "text": bomb(8)}), seconds=1.0,
                       megabytes=20)
    assert response.status_code == 422
    assert response.json()["problems"][0].startswith("s.yaml:3: YAML alias *a0 refused")


def test_6_deep_json_bad_export_and_linked_story_folders_get_answers_not_500(ui, tmp_path):
    deep = "[" * 100000 + "]" * 100000
    for path in ("/api/validate", "/api/parse", "/api/jobs"):
        response = ui.post(path, content=deep, headers={"content-type": "application/json"})
        assert response.status_code == 400, (path, response.text)
    nested = json.dumps({"name": "walk", "story": json.loads("[" * 50 + "]" * 50)})
    response = ui.post("/api/validate", content=nested, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "nested more than 32 levels" in response.json()["problems"][0]
    for layouts in (5, {"2x2": 1}, "2x2", [["2x2"]], []):
        response = ui.post("/api/jobs", json={"kind": "export", "name": "s1", "layouts": layouts})
        assert response.status_code == 422, (layouts, response.text)
        assert "export:" in response.json()["problems"][0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "story.yaml").write_text("# characonsist story\nscenes: []\n")
    (tmp_path / "ui" / "linked").symlink_to(elsewhere)
    for path in ("/api/stories/linked", "/files/linked/story.yaml", "/api/stories/linked/zip"):
        response = ui.get(path)
        assert response.status_code == 404, (path, response.text)
    assert "linked" not in [s["name"] for s in ui.get("/api/stories").json()["stories"]]
    response = ui.post("/api/jobs", json={"kind": "generate", "name": "linked", "story": STORY})
    assert response.status_code == 404 and "link" in response.json()["problems"][0]
    assert list(elsewhere.iterdir()) == [elsewhere / "story.yaml"]


def test_8_the_ui_refuses_text_fields_that_are_not_text(ui):
    bad = json.loads(json.dumps(STORY))
    bad["title"] = ["a", "b"]
    bad["scenes"][0]["name"] = {"x": 1}
    bad["scenes"][0]["images"][1]["caption"] = [1, 2]
    response = ui.post("/api/validate", json={"name": "walk", "story": bad})
    assert response.status_code == 422
    assert response.json()["problems"] == ["story: title must be text, got list ['a', 'b']",
                                           "story: scenes[0].name must be text, got dict {'x': 1}",
                                           "story: scenes[0].images[1].caption must be text, got list [1, 2]"]
    response = ui.post("/api/storyfile", json={"story": bad, "format": "yaml"})
    assert response.status_code == 422


def test_10_export_layouts_given_as_a_mapping_are_refused(ui):
    response = ui.post("/api/jobs", json={"kind": "export", "name": "walk", "layouts": {"2x2": 1}})
    assert response.status_code == 422
    assert response.json()["problems"] == ["export: 'layouts' and 'formats' must be lists (layouts from storyboard, "
                                           "strip, 2x2, panel, formats png/pdf), got {'2x2': 1} and ['png', 'pdf']"]


def test_10_a_negative_last_event_id_sends_the_log_once(ui):
    job = ui.post("/api/jobs", json={"kind": "export", "name": "walk", "layouts": ["2x2"]}).json()["id"]
    for _ in range(200):
        if ui.get(f"/api/jobs/{job}").json()["state"] == "failed":
            break
        time.sleep(0.02)
    count = ui.get(f"/api/jobs/{job}").json()["events"]
    for last in ("-5", "-1", "x", "99999999999999999999"):
        with ui.stream("GET", f"/api/jobs/{job}/events", headers={"last-event-id": last}) as stream:
            if last.startswith("999"):
                break
            seen = [json.loads(line[6:])["seq"] for line in stream.iter_lines() if line.startswith("data: ")]
        assert seen == list(range(count)), last


def test_12_uploads_and_files_say_what_they_are_once_and_keep_the_workspace_path_to_themselves(ui, tmp_path):
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    response = ui.post("/api/pictures", content=tiff.getvalue(), headers={"content-type": "image/tiff"})
    assert response.status_code == 422
    assert response.json()["problems"] == ["picture: a TIFF picture; save it as PNG, JPEG, WEBP, GIF or BMP"]
    response = ui.post("/api/pictures?filename=me.tif", content=tiff.getvalue(),
                       headers={"content-type": "image/tiff"})
    assert response.json()["problems"] == ["picture: me.tif: a TIFF picture; save it as PNG, JPEG, WEBP, GIF or BMP"]
    (tmp_path / "ui" / "s1").mkdir()
    root = str(tmp_path / "ui")
    for path in ("/files/s1//etc/passwd", "/files/s1/%2Fetc%2Fpasswd", "/pictures/0123456789abcdef.png"):
        response = ui.get(path)
        assert response.status_code == 404, path
        assert root not in response.text and "write" not in response.text, (path, response.text)


# ------------------------------------------------------------------------------------------------- a real server

class Served:
    """``characonsist ui`` serving on a real socket in a thread (the worker started without loading the model)."""

    def __init__(self, monkeypatch, tmp_path, host: str, allow=()):
        import uvicorn

        from characonsist import ui as ui_module
        from characonsist.ui.worker import Worker

        self.said: list[str] = []
        self.servers: list = []
        run = uvicorn.Server.run
        servers = self.servers

        def keep(server, sockets=None):
            servers.append(server)
            return run(server, sockets=sockets)

        monkeypatch.setattr(uvicorn.Server, "run", keep)
        start = Worker.start
        monkeypatch.setattr(Worker, "start", lambda self, preload=True: start(self, preload=False))
        options = {"allow_hosts": list(allow)} if allow else {}
        self.thread = threading.Thread(target=ui_module.serve, kwargs=dict(
            model="toy", out=str(tmp_path / "ui"), host=host, port=0, say=self.said.append, **options), daemon=True)
        self.thread.start()
        for _ in range(500):
            if self.said and self.servers and self.servers[0].started:
                break
            time.sleep(0.01)
        address = self.said[0].split("http://", 1)[1].split("/", 1)[0]
        self.host, self.port = address.rsplit(":", 1)
        self.port = int(self.port)

    def request(self, method: str, path: str, host: str | None = None, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, str]:
        connection = http.client.HTTPConnection(self.host.strip("[]"), self.port, timeout=10)
        try:
            connection.putrequest(method, path, skip_host=True)
            connection.putheader("Host", host or f"{self.host}:{self.port}")
            for key, value in (headers or {}).items():
                connection.putheader(key, value)
            connection.endheaders(body)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def stop(self) -> None:
        self.servers[0].should_exit = True
        self.thread.join(timeout=10)


def bindable(host: str) -> bool:
    try:
        with socket.socket() as probe:
            probe.bind((host, 0))
        return True
    except OSError:
        return False


@pytest.fixture()
def served(monkeypatch, tmp_path):
    running = []

    def start(host: str, allow=()) -> Served:
        if not bindable(host if host != "127.1" else "127.0.0.1"):
            pytest.skip(f"{host} is not an address of this machine (Linux answers every 127.x.y.z)")
        running.append(Served(monkeypatch, tmp_path / str(len(running)), host, allow))
        return running[-1]

    yield start
    for server in running:
        server.stop()


@pytest.mark.parametrize("host", ["127.0.0.2", "127.1"])
def test_2_the_host_check_is_on_for_every_address(served, capfd, host):
    server = served(host)
    status, _ = server.request("POST", "/api/jobs", host=f"attacker.example:{server.port}",
                               body=json.dumps({"kind": "export", "name": "s1", "layouts": ["2x2"]}).encode(),
                               headers={"Content-Type": "application/json"})
    assert status == 400                             # DNS rebinding: a page of attacker.example is not answered
    assert server.request("GET", "/api/stories", host=f"attacker.example:{server.port}")[0] == 400
    assert server.request("GET", "/api/stories")[0] == 200
    assert server.request("GET", "/api/stories", host=f"{host}:{server.port}")[0] == 200   # as the user typed it
    assert "reachable from other machines" not in capfd.readouterr().err    # a loopback address


def test_2_allow_host_adds_a_name(served):
    server = served("127.0.0.2", allow=["mybox.lan"])
    assert server.request("GET", "/api/stories", host=f"mybox.lan:{server.port}")[0] == 200
    assert server.request("GET", "/api/stories", host="evil.mybox.lan")[0] == 400
    assert server.request("GET", "/api/stories", host=f"127.0.0.2:{server.port}")[0] == 200


def test_2_every_address_gets_a_list_and_allow_host_is_checked(tmp_path, capsys):
    from characonsist import ui as ui_module

    for host, bound in (("0.0.0.0", "0.0.0.0"), ("127.0.0.2", "127.0.0.2"), ("::", "::"), ("127.1", "127.0.0.1")):
        hosts = ui_module.allowed_hosts(host, bound)
        assert hosts and "*" not in hosts and "attacker.example" not in hosts, host
    assert "localhost" in ui_module.allowed_hosts("0.0.0.0", "0.0.0.0")
    assert {"127.1", "127.0.0.1", "localhost"} <= set(ui_module.allowed_hosts("127.1", "127.0.0.1"))
    assert ui_module.allowed_hosts("::1", "::1", ["mybox.lan"]) == ["[::1]", "localhost", "mybox.lan"]
    assert not ui_module.reachable_from_others("127.0.0.2") and ui_module.reachable_from_others("0.0.0.0")
    for bad in ("*", "evil.example:80", "a*b", ""):
        assert cli.main(["ui", "--out", str(tmp_path / "ui"), "--port", "0", "--allow-host", bad]) == \
            cli.EXIT_BAD_INPUT, bad
        assert "the Host check cannot be switched off" in capsys.readouterr().err
    assert not (tmp_path / "ui").exists()


def test_3_a_json_body_is_read_only_up_to_the_limit(served):
    from characonsist.ui.server import MAX_BODY

    server = served("127.0.0.1")
    status, text = server.request("POST", "/api/validate", body=b"",
                                  headers={"Content-Type": "application/json", "Content-Length": "800000000"})
    assert status == 413 and "request too large" in text
    # a chunked body of 64 MiB: the server answers once it has read past the limit, long before the end
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(f"POST /api/validate HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json"
                 "\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b"[" + b" " * (2**16 - 1)
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent, answer = 0, b""
    sock.setblocking(False)
    import select

    while sent < 64 * 2**20 and not answer:
        readable, writable, _ = select.select([sock], [sock], [], 5)
        if readable:
            answer = sock.recv(4096)
            break
        if writable:
            try:
                sent += sock.send(frame)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
    deadline = time.time() + 5
    while not answer and time.time() < deadline:
        if select.select([sock], [], [], 0.1)[0]:
            answer = sock.recv(4096)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert sent < 16 * 2**20, f"the client sent {sent} bytes before the answer (limit {MAX_BODY})"


def test_hostile_inputs_leave_no_temporaries(tmp_path):
    """The refusals above write nothing: no output folder, no temporaries beside a story file."""
    story = write(tmp_path, "bomb.yaml", bomb(3))
    with pytest.raises(StoryError):
        load_story(story)
    assert sorted(os.listdir(tmp_path)) == ["bomb.yaml"] and Path(story).read_text() == bomb(3)
