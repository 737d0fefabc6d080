"""`characonsist ui`'s HTTP API and events, every endpoint, on the tiny random pipeline (saved and loaded like
any model folder): story files in and out, validation with the command line's messages, generation with its
events, cancel and the queue, regenerating one image (the others byte-identical), exports, the zip, the files
it serves and refuses, and the folder shared with `characonsist generate` both ways."""

from __future__ import annotations

import io
import json
import shlex
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from characonsist import cli  # noqa: E402
from characonsist.output import read_png_record  # noqa: E402
from characonsist.ui.server import create_app  # noqa: E402
from characonsist.ui.worker import Worker  # noqa: E402
from characonsist.ui.workspace import Workspace  # noqa: E402

SETTINGS = {"num_inference_steps": 3, "height": 64, "width": 64, "method_options": {"mask_step": "1"},
            "save_masks": True}


def doc(*actions, title="Cat and robot", character="a cat", background="park", name="walk"):
    return {"title": title, "character": character,
            "scenes": [{"name": name, "background": background, "images": [{"action": a} for a in actions]}]}


STORY = doc("sitting", "running", "jumping")


@pytest.fixture(scope="module")
def tiny_model(tiny_model):
    """conftest's saved tiny FLUX, as the text a command line or the UI is given."""
    return str(tiny_model)


def running_ui(model: str, root, polls: int = 600):
    """The UI on ``model`` with its stories in ``root``, as `characonsist ui` makes it: a test client (``.worker``
    its worker) once the worker has loaded the model (loading another in the test's thread meanwhile would race);
    stopped and closed after the ``yield``."""
    space = Workspace(root, model, flags=cli.FLAGS)
    worker = Worker(space, model)
    space.open()
    worker.start()
    client = TestClient(create_app(worker, ["testserver"]))
    client.worker = worker
    for _ in range(polls):
        if worker.model_state in ("ready", "failed"):
            break
        time.sleep(0.05)
    yield client
    worker.stop()
    space.close()


@pytest.fixture()
def ui(tiny_model, tmp_path):
    yield from running_ui(tiny_model, tmp_path / "ui")


def events(client, job_id) -> list[dict]:
    """A job's server-sent events until its end (the stream closes itself)."""
    with client.stream("GET", f"/api/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]


def run(client, **payload) -> list[dict]:
    response = client.post("/api/jobs", json=payload)
    assert response.status_code == 202, response.text
    return events(client, response.json()["id"])


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_page_assets_and_info(ui):
    page = ui.get("/")
    assert page.status_code == 200 and 'id="generate"' in page.text
    assert "http" not in page.text.replace('href="/', "").lower()    # nothing fetched from elsewhere
    for asset, kind in (("/app.js", "javascript"), ("/style.css", "css")):
        response = ui.get(asset)
        assert response.status_code == 200 and kind in response.headers["content-type"]
        assert "http://" not in response.text and "https://" not in response.text
    assert ui.get("/nothing.js").status_code == 404
    info = ui.get("/api/info").json()
    assert info["methods"]["characonsist"]["options"]["share_bg"] is True
    assert {"vanilla", "consistory", "storysync", "storydiffusion"} <= set(info["methods"])
    assert info["layouts"] == ["storyboard", "strip", "2x2", "panel"]
    assert info["formats"] == ["yaml", "toml", "text"]
    assert info["defaults"]["num_inference_steps"] >= 1 and info["loading"] == ""
    assert info["seed"] == 2025   # the one default seed (seeds.DEFAULT_SEED), which the page starts from


def test_story_files_in_every_format_round_trip(ui):
    from characonsist.storyfile import load_story

    example = Path(__file__).parents[1] / "examples" / "toy-story.yaml"
    parsed = ui.post("/api/parse", json={"filename": "toy-story.yaml", "text": example.read_text()}).json()["story"]
    want = [(g.name, g.images, g.captions) for g in load_story(example).groups]
    for fmt, suffix in (("yaml", ".yaml"), ("toml", ".toml")):
        saved = ui.post("/api/storyfile", json={"name": "toy", "story": parsed, "format": fmt}).json()
        assert saved["filename"] == f"toy{suffix}"
        back = ui.post("/api/parse", json={"filename": saved["filename"], "text": saved["text"]}).json()["story"]
        again = ui.post("/api/storyfile", json={"story": back, "format": "yaml"}).json()["text"]
        from characonsist.app.stories import parse_story

        story = parse_story(saved["text"], saved["filename"])
        assert [(g.name, g.images, g.captions) for g in story.groups] == want
        assert [(g.name, g.images, g.captions) for g in parse_story(again, "x.yaml").groups] == want
    # the text format holds no captions or seeds: refused, with what to do
    refused = ui.post("/api/storyfile", json={"story": parsed, "format": "text"})
    assert refused.status_code == 422 and "save it as YAML or TOML" in refused.json()["problems"][0]
    plain = ui.post("/api/parse", json={"filename": "s.txt", "text": "park#a cat#sitting\npark#a cat#running\n"})
    text = ui.post("/api/storyfile", json={"story": plain.json()["story"], "format": "text"}).json()["text"]
    assert text == "park#a cat#sitting\npark#a cat#running\n"
    bad = ui.post("/api/parse", json={"filename": "../../etc/s.txt", "text": "park#a cat\n"})
    assert bad.status_code == 422
    assert bad.json()["problems"] == ["s.txt:1: 'park#a cat' has 1 '#' but needs exactly two: background#character#action"]


def test_validation_names_the_pages_fields_and_places(ui):
    ok = ui.post("/api/validate", json={"name": "walk", "story": STORY, "settings": SETTINGS}).json()
    assert ok["groups"] == ["000_walk"] and ok["settings"]["num_inference_steps"] == 3
    assert ok["command"].startswith("characonsist generate ") and "--steps 3" in ok["command"]
    bad = json.loads(json.dumps(STORY))
    bad["scenes"][0]["images"][2]["action"] = ""
    response = ui.post("/api/validate", json={"name": "walk", "story": STORY, "settings": {**SETTINGS, "num_inference_steps": 0,
                                                                                        "guidance_scale": -1}})
    assert response.status_code == 422
    assert response.json()["problems"] == ["Steps=0 must be between 1 and 1000", "Guidance=-1 must be >= 0"]
    response = ui.post("/api/validate", json={"name": "walk", "story": bad, "settings": SETTINGS})
    assert any("scenes[0].frames[1]: the action field is empty" in p for p in response.json()["problems"])
    assert ui.post("/api/validate", json={"name": "../up", "story": STORY}).status_code == 422
    unknown = ui.post("/api/validate", json={"name": "walk", "story": STORY,
                                             "settings": {**SETTINGS, "method_options": {"nonsense": "1"}}})
    assert "has no option(s) 'nonsense'" in unknown.json()["problems"][0]


def test_generate_streams_progress_and_images_and_the_cli_resumes_it(ui, tmp_path, capsys):
    seen = run(ui, kind="generate", name="walk", story=STORY, settings=SETTINGS)
    types = [e["type"] for e in seen]
    assert types[:3] == ["queued", "started", "plan"] and types[-1] == "done"
    assert [e["seq"] for e in seen] == list(range(len(seen)))
    loaded = [e for e in seen if e["type"] == "loading"]          # the page's header follows the model's state
    assert loaded[-1]["state"] == "ready" and types.index("group_started") > seen.index(loaded[-1])
    steps = [(e["phase"], e["done"], e["total"]) for e in seen if e["type"] == "progress"]
    assert steps[0][0] == "prerun" and steps[-1] == ("main", 3, 3)
    (group,) = [e for e in seen if e["type"] == "group"]
    images = group["gallery"]["images"]
    assert [im["role"] for im in images] == ["identity", "frame", "frame"]
    for im in images:
        response = ui.get(im["url"])
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert ui.get(images[1]["mask"]).status_code == 200 and ui.get(images[1]["match"]).status_code == 200
    folder = tmp_path / "ui" / "walk"
    assert (folder / "story.yaml").read_text().startswith("# characonsist story")
    listed = ui.get("/api/stories").json()["stories"]
    assert listed == [{"name": "walk", "title": "Cat and robot", "groups": 1, "done": 1}]
    opened = ui.get("/api/stories/walk").json()
    assert opened["story"]["character"] == "a cat" and opened["settings"]["num_inference_steps"] == 3
    before = {p: p.read_bytes() for p in folder.rglob("*.png")}
    # the command the UI shows resumes the story from the command line: nothing left to do, nothing rewritten
    argv = shlex.split(opened["command"])[1:]
    assert cli.main(argv) == 0
    assert "0 to generate" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in folder.rglob("*.png")} == before
    # a second generate from the UI: every group done, no work
    again = run(ui, kind="generate", name="walk", story=opened["story"], settings=opened["settings"])
    assert [e for e in again if e["type"] == "plan"][0]["todo"] == []
    assert not [e for e in again if e["type"] == "progress"]


LIVE = {**SETTINGS, "method_options": {}}     # the default mask step: a 2-step layout pre-run whose step 0 the main run takes


def _previews(seen) -> list[dict]:
    return [e for e in seen if e["type"] == "preview"]


def test_live_previews_come_per_step_in_order_and_never_reach_the_folder(ui, tmp_path):
    import base64

    ui.worker.preview_interval = 0                     # every step (the page's default is one per 0.5 s)
    assert ui.get("/api/info").json()["previews"]["modes"] == ["linear", "exact"]
    live = run(ui, kind="generate", name="live", story=STORY, settings=LIVE, previews=True)
    still = run(ui, kind="generate", name="still", story=STORY, settings=LIVE)   # previews are asked for
    assert live[-1]["type"] == still[-1]["type"] == "done" and not _previews(still)
    shown = _previews(live)
    assert [(e["group"], e["step"], e["steps"], e["mode"]) for e in shown] == [("000_walk", k, 3, "linear")
                                                                                 for k in (1, 2, 3)]
    types = [e["type"] for e in live]
    first, last = types.index("preview"), len(types) - 1 - types[::-1].index("preview")
    assert types.index("group_started") < first and last < types.index("group")    # while the group denoises
    for event in shown:
        assert [im["index"] for im in event["images"]] == [0, 1, 2] and event["ms"] >= 0
        for im in event["images"]:
            head, _, data = im["url"].partition(",")
            assert head == "data:image/jpeg;base64"
            with Image.open(io.BytesIO(base64.b64decode(data))) as picture:   # at most the image's own size
                assert picture.format == "JPEG" and picture.size == (im["width"], im["height"]) == (64, 64)
    print(f"preview cost per event (3 images, tiny model): {[e['ms'] for e in shown]} ms")
    # the same images and the same files with previews on and off: nothing of them is written
    folders = [tmp_path / "ui" / name for name in ("live", "still")]
    listing = [sorted(p.relative_to(f).as_posix() for p in f.rglob("*") if p.is_file()) for f in folders]
    assert listing[0] == listing[1]
    for rel in listing[0]:
        if rel.endswith(".png"):
            assert np.array_equal(pixels(folders[0] / rel), pixels(folders[1] / rel)), rel
    # one every preview_interval: the first step's only, here
    ui.worker.preview_interval = 3600
    slow = run(ui, kind="generate", name="slow", story=STORY, settings=LIVE, previews="linear")
    assert [e["step"] for e in _previews(slow)] == [1]
    # regenerate shows them too, exact (a VAE decode) when asked; the earlier job's log keeps no pictures
    ui.worker.preview_interval = 0
    again = run(ui, kind="regenerate", name="live", group="000_walk", index=1, seed=5, previews="exact")
    assert again[-1]["type"] == "done" and [e["mode"] for e in _previews(again)] == ["exact"] * 3
    old = ui.get(f"/api/jobs/{live[0]['job']}").json()["log"]
    assert all(im["url"] is None for e in _previews(old) for im in e["images"])
    refused = ui.post("/api/jobs", json={"kind": "generate", "name": "x", "story": STORY, "previews": "fast"})
    assert refused.status_code == 422 and "previews: 'fast'; give true, false or one of linear, exact" in refused.text


def test_a_failing_preview_turns_previews_off_and_the_story_goes_on(ui, tmp_path, monkeypatch):
    from characonsist import preview

    def broken(*args, **kwargs):
        raise RuntimeError("no decoder")

    monkeypatch.setattr(preview, "previews", broken)
    ui.worker.preview_interval = 0
    seen = run(ui, kind="generate", name="broken", story=STORY, settings=LIVE, previews=True)
    assert seen[-1]["type"] == "done" and not _previews(seen)
    (failed,) = [e for e in seen if e["type"] == "preview_failed"]
    assert failed["message"] == "RuntimeError: no decoder" and failed["group"] == "000_walk"
    assert all((tmp_path / "ui" / "broken" / "000_walk" / f).is_file()
               for f in ("identity.png", "frame_01.png", "frame_02.png"))


def test_regenerate_one_image_keeps_the_others_byte_identical(ui, tmp_path, tiny_model):
    run(ui, kind="generate", name="walk", story=STORY, settings=SETTINGS)
    folder = tmp_path / "ui" / "walk" / "000_walk"
    files = ["identity.png", "frame_01.png", "frame_02.png"]
    old = {f: pixels(folder / f) for f in files}
    seen = run(ui, kind="regenerate", name="walk", group="000_walk", index=1, seed=77)
    done = seen[-1]
    assert done["type"] == "done" and done["seed"] == 77
    assert done["kept_differing"] == []        # the engine gave the other images bit-identical again
    assert not np.array_equal(pixels(folder / "frame_01.png"), old["frame_01.png"])
    for f in ("identity.png", "frame_02.png"):
        assert np.array_equal(pixels(folder / f), old[f])
        assert not any("kept as it was" in n for n in read_png_record(folder / f)["notes"])
    assert read_png_record(folder / "frame_01.png")["seed"] == 77
    opened = ui.get("/api/stories/walk").json()
    assert opened["story"]["scenes"][0]["images"][1]["seed"] == 77
    # the folder is exactly what `characonsist generate` makes of the saved story: same images from scratch
    fresh = tmp_path / "fresh"
    argv = shlex.split(opened["command"])[1:]
    argv[argv.index("--out") + 1] = str(fresh)
    assert cli.main(argv) == 0
    for f in files:
        assert np.array_equal(pixels(fresh / "000_walk" / f), pixels(folder / f)), f
        assert read_png_record(fresh / "000_walk" / f)["settings_hash"] == read_png_record(folder / f)["settings_hash"]
    assert ui.post("/api/jobs", json={"kind": "regenerate", "name": "walk", "group": "000_walk"}).status_code == 422
    missing = run(ui, kind="regenerate", name="walk", group="nope", index=1)
    assert missing[-1]["type"] == "error" and "no generated group 'nope'" in missing[-1]["message"]


def test_regenerate_keeps_images_the_engine_would_change_and_says_so(ui, tmp_path):
    """StorySync's frames read the references (the first images): regenerating one changes the others in a
    fresh run; the UI keeps them as they were, byte-identical, with a note."""
    settings = {**SETTINGS, "method": "storysync", "method_options": {}}
    run(ui, kind="generate", name="sync", story=STORY, settings=settings)
    folder = tmp_path / "ui" / "sync" / "000_walk"
    old = {f: pixels(folder / f) for f in ("identity.png", "frame_02.png")}
    done = run(ui, kind="regenerate", name="sync", group="000_walk", index=1)[-1]
    assert done["type"] == "done" and done["kept_differing"]
    for f, was in old.items():
        assert np.array_equal(pixels(folder / f), was)
    notes = read_png_record(folder / "identity.png")["notes"] if 0 in done["kept_differing"] else \
        read_png_record(folder / "frame_02.png")["notes"]
    assert any("kept as it was when image 1 was regenerated" in n for n in notes)


def test_cancel_a_running_job_and_a_queued_one(ui, tmp_path):
    long = {**SETTINGS, "num_inference_steps": 400}
    first = ui.post("/api/jobs", json={"kind": "generate", "name": "long", "story": STORY, "settings": long,
                                       "previews": True}).json()
    second = ui.post("/api/jobs", json={"kind": "generate", "name": "queued", "story": STORY, "settings": SETTINGS})
    third = ui.post("/api/jobs", json={"kind": "generate", "name": "walk", "story": STORY, "settings": SETTINGS})
    queued = ui.get("/api/jobs").json()["jobs"]
    assert [j["state"] for j in queued][1:] == ["queued", "queued"]   # one job at a time on the model
    assert ui.post(f"/api/jobs/{second.json()['id']}/cancel", json={}).json()["state"] == "cancelled"
    with ui.stream("GET", f"/api/jobs/{first['id']}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["type"] == "progress":
                assert ui.post(f"/api/jobs/{first['id']}/cancel", json={}).status_code == 200
                break
    seen = events(ui, first["id"])
    assert seen[-1]["type"] == "cancelled"
    steps = [e["done"] for e in seen if e["type"] == "progress"]
    assert steps[-1] < 400
    assert events(ui, third.json()["id"])[-1]["type"] == "done"      # the queue goes on
    assert ui.worker.loads == 1                                        # the model loaded once for all of them
    assert events(ui, second.json()["id"])[-1]["type"] == "cancelled"
    assert not (tmp_path / "ui" / "queued").exists()
    log = ui.get(f"/api/jobs/{first['id']}").json()
    assert log["state"] == "cancelled" and log["log"][-1]["type"] == "cancelled"
    assert ui.get("/api/jobs/nope").status_code == 404


def test_conflicting_edit_needs_overwrite(ui):
    run(ui, kind="generate", name="walk", story=STORY, settings=SETTINGS)
    changed = doc("sitting", "running", "waving")
    error = run(ui, kind="generate", name="walk", story=changed, settings=SETTINGS)[-1]
    assert error["type"] == "error" and error["conflict"] is True
    assert "frame_02 action 'jumping' -> 'waving'" in error["message"]
    assert run(ui, kind="generate", name="walk", story=changed, settings=SETTINGS, overwrite=True)[-1]["type"] == "done"


def test_export_layouts_zip_and_the_cli_layouts_are_the_same_files(ui, tmp_path, capsys):
    run(ui, kind="generate", name="walk", story=STORY, settings=SETTINGS)
    done = run(ui, kind="export", name="walk", layouts=["2x2", "strip"], formats=["png", "pdf"])[-1]
    assert [f["path"] for f in done["files"]] == ["layouts/2x2_01.png", "layouts/2x2.pdf", "layouts/strip_01.png",
                                                  "layouts/strip.pdf"]
    pdf = ui.get(done["files"][1]["url"])
    assert pdf.headers["content-type"] == "application/pdf" and pdf.content.startswith(b"%PDF")
    folder = tmp_path / "ui" / "walk"
    page = read_png_record(folder / "layouts" / "2x2_01.png")
    assert page["layout"] == "2x2" and page["pages"] == 1
    before = {p.name: p.read_bytes() for p in (folder / "layouts").iterdir()}
    argv = shlex.split(ui.get("/api/stories/walk").json()["command"])[1:] + ["--layout", "2x2", "--layout", "strip"]
    assert cli.main(argv) == 0
    assert "layouts (1/1 group(s))" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (folder / "layouts").iterdir()} == before   # one implementation
    listed = ui.get("/api/stories/walk").json()["exports"]
    assert [e["path"] for e in listed] == sorted(f"layouts/{n}" for n in before)
    archive = zipfile.ZipFile(io.BytesIO(ui.get("/api/stories/walk/zip").content))
    names = archive.namelist()
    assert "walk/story.yaml" in names and "walk/manifest.json" in names and "walk/000_walk/frame_02.png" in names
    assert "walk/layouts/2x2.pdf" in names and not any("/." in n for n in names)
    bad = ui.post("/api/jobs", json={"kind": "export", "name": "walk", "layouts": ["poster"]})
    assert bad.status_code == 422 and "storyboard, strip, 2x2, panel" in bad.json()["problems"][0]
    nothing = run(ui, kind="export", name="none", layouts=["2x2"])[-1]
    assert nothing["type"] == "error"


def test_a_command_line_run_opens_and_resumes_in_the_ui(ui, tmp_path, tiny_model, capsys):
    story = tmp_path / "two.txt"
    story.write_text("park#a cat#sitting\npark#a cat#running\n\nbeach#a robot#standing\nbeach#a robot#waving\n")
    folder = tmp_path / "ui" / "from-cli"
    argv = ["generate", str(story), "--model", tiny_model, "--out", str(folder), "--height", "64", "--width", "64",
            "--steps", "3", "--option", "mask_step=1", "--seed", "5", "--quiet"]
    assert cli.main(argv) == 0
    for path in (folder / "group_001").iterdir():   # as if the run had been stopped before its second group
        if path.is_file():
            path.unlink()
    kept = (folder / "group_000" / "frame_01.png").read_bytes()
    opened = ui.get("/api/stories/from-cli").json()
    assert [im["action"] for im in opened["story"]["scenes"][1]["images"]] == ["standing", "waving"]
    assert opened["settings"]["seed"] == 5 and opened["settings"]["save_masks"] is False
    seen = run(ui, kind="generate", name="from-cli", story=opened["story"], settings=opened["settings"])
    assert [e for e in seen if e["type"] == "plan"][0]["todo"] == ["group_001"]
    assert seen[-1]["type"] == "done"
    assert (folder / "group_000" / "frame_01.png").read_bytes() == kept
    assert cli.main(argv[:-1]) == 0        # and the command line sees it finished
    assert "2 already done, 0 to generate" in capsys.readouterr().out


def test_files_and_requests_it_refuses(ui, tmp_path):
    run(ui, kind="generate", name="walk", story=STORY, settings=SETTINGS)
    folder = tmp_path / "ui" / "walk"
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    (folder / "link.png").symlink_to(secret)
    for path in ("/files/walk/%2e%2e/%2e%2e/secret.png", "/files/walk/000_walk/%2e%2e%2f%2e%2e%2fsecret.png", "/files/walk/link.png",
                 "/files/walk/.characonsist.lock", "/files/walk/nothing.png", "/files/Walk/story.yaml"):
        assert ui.get(path).status_code in (404, 422), path
    assert ui.get("/files/walk/story.yaml").status_code == 200
    archive = zipfile.ZipFile(io.BytesIO(ui.get("/api/stories/walk/zip").content))
    assert "walk/link.png" not in archive.namelist()
    form = ui.post("/api/jobs", content="kind=generate", headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415      # a cross-site form cannot start work
    assert ui.get("/api/info", headers={"host": "evil.example"}).status_code == 400   # DNS rebinding
    assert ui.post("/api/jobs", json={"kind": "delete", "name": "walk"}).status_code == 422
    assert ui.get("/api/stories/nothing").status_code == 404


def test_second_ui_on_the_same_folder_and_network_warning(tmp_path, monkeypatch, capsys):
    import uvicorn

    from characonsist import ui as ui_module
    from characonsist.app import FolderError

    space = Workspace(tmp_path / "ui", "toy")
    space.open()
    try:
        with pytest.raises(FolderError, match="in use by another characonsist run"):
            Workspace(tmp_path / "ui", "toy").open()
    finally:
        space.close()
    assert "localhost" in ui_module.allowed_hosts("127.0.0.1", "127.0.0.1")   # the check is on for every address:
    assert "evil.example" not in ui_module.allowed_hosts("0.0.0.0", "0.0.0.0")    # test_hostile_inputs.py
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    monkeypatch.setattr(Worker, "start", lambda self, preload=True: None)
    monkeypatch.setattr(Worker, "stop", lambda self: None)
    monkeypatch.setattr(ui_module, "bind", lambda host, port: _FakeSocket(host, port))
    assert ui_module.serve("toy", str(tmp_path / "net"), host="0.0.0.0", port=9) == 0
    out, err = capsys.readouterr()
    assert "http://0.0.0.0:9/" in out and "reachable from other machines" in err
    assert ui_module.serve("toy", str(tmp_path / "local"), host="127.0.0.1", port=9) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--port", "99999"], "--port 99999: must be a port number between 0 and 65535"),
    (["--port", "-1"], "--port -1: must be a port number between 0 and 65535"),
    (["--host", "no-such-host.invalid"], "--host no-such-host.invalid: not an address of this machine"),
    (["--host", "192.0.2.1"], "--host 192.0.2.1 --port 0: is not an address of this machine"),   # TEST-NET-1
    (["--port", "IN-USE"], "is in use; choose another port (--port 0 picks a free one)"),
])
def test_a_bad_address_is_one_line_before_the_model(tmp_path, capsys, monkeypatch, args, message):
    import socket

    from characonsist.ui import worker as worker_module

    monkeypatch.setattr(worker_module.Worker, "__init__", lambda *a, **k: pytest.fail("the model was looked at"))
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    args = [str(held.getsockname()[1]) if a == "IN-USE" else a for a in args]
    if "--port" not in args:
        args += ["--port", "0"]
    try:
        assert cli.main(["ui", "--out", str(tmp_path / "ui"), *args]) == cli.EXIT_BAD_INPUT
    finally:
        held.close()
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "ui").exists()


class _FakeSocket:
    def __init__(self, host, port):
        self.address = (host, port)

    def getsockname(self):
        return self.address

    def close(self):
        pass


# ------------------------------------------------------------------------------------------ the identity's picture

def png_bytes(size=(96, 40), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, color)
    image.paste((20, 20, 220), (size[0] // 3, size[1] // 4, 2 * size[0] // 3, 3 * size[1] // 4))
    image.save(buffer, "PNG")
    return buffer.getvalue()


def upload(client, data: bytes, filename="me.png", kind="application/octet-stream"):
    return client.post("/api/pictures", params={"filename": filename}, content=data, headers={"content-type": kind})


def test_picture_upload_is_checked_stored_by_its_bytes_and_served(ui, tmp_path, monkeypatch):
    from characonsist.ui import workspace as workspace_module

    data = png_bytes()
    first = upload(ui, data, filename="../../etc/passwd.png")     # a path from the browser is only a name
    assert first.status_code == 201, first.text
    stored = first.json()
    digest = __import__("hashlib").sha256(data).hexdigest()
    assert stored["file"] == f"{digest[:16]}.png" and stored["image"] == f"../pictures/{digest[:16]}.png"
    assert (stored["name"], stored["width"], stored["height"], stored["format"]) == ("passwd.png", 96, 40, "PNG")
    pictures = tmp_path / "ui" / "pictures"
    assert [p.name for p in pictures.iterdir()] == [stored["file"]]
    assert (pictures / stored["file"]).read_bytes() == data                    # its bytes as uploaded
    assert not (tmp_path / "etc").exists()
    again = upload(ui, data, filename="copy.png")                              # the same picture: the same file
    assert again.status_code == 200 and again.json()["file"] == stored["file"] and not again.json()["stored"]
    served = ui.get(stored["url"])
    assert served.status_code == 200 and served.headers["content-type"] == "image/png" and served.content == data
    jpeg = io.BytesIO()
    Image.new("RGB", (30, 20), (1, 2, 3)).save(jpeg, "JPEG")
    assert upload(ui, jpeg.getvalue(), "x.jpg", "image/jpeg").json()["file"].endswith(".jpg")

    bad = upload(ui, b"GIF89a but not really", filename="../../secret/notes.png")
    assert bad.status_code == 422
    assert bad.json()["problems"] == ["picture: notes.png: not an image PIL can read (PNG, JPEG, WebP, BMP, TIFF, ...)"]
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, "TIFF")
    refused = upload(ui, tiff.getvalue(), "scan.tif")
    assert refused.status_code == 422 and "scan.tif: a TIFF picture; save it as PNG, JPEG, WEBP, GIF or BMP" in \
        refused.json()["problems"][0]
    assert upload(ui, b"", "empty.png").json()["problems"] == [
        "picture: empty.png: the file is empty; choose a picture (PNG, JPEG, WebP, GIF or BMP)"]
    big = upload(ui, b"\0" * (workspace_module.MAX_PICTURE_BYTES + 1), "huge.png")
    assert big.status_code == 413 and "16 MiB" in big.json()["problems"][0]
    form = upload(ui, data, kind="multipart/form-data; boundary=x")
    assert form.status_code == 415                                              # a cross-site form cannot send it
    assert len(list(pictures.iterdir())) == 2                                   # nothing refused was kept
    # a file there that characonsist did not write is never replaced
    other = png_bytes(color=(0, 200, 0))
    name = __import__("hashlib").sha256(other).hexdigest()[:16] + ".png"
    (pictures / name).write_bytes(b"someone else's")
    assert upload(ui, other).status_code == 409 and (pictures / name).read_bytes() == b"someone else's"
    monkeypatch.setattr(workspace_module, "MAX_PICTURE_PIXELS", 1000)
    many = upload(ui, png_bytes((50, 30)), "wide.png")
    assert many.status_code == 422 and "50x30 is more than 0.001 megapixels" in many.json()["problems"][0]
    for path in ("/pictures/%2e%2e%2fmanifest.json", "/pictures/nothing.png", f"/pictures/{name[:-4]}.txt",
                 "/pictures/0123456789abcdef.png"):
        assert ui.get(path).status_code == 404, path
    assert ui.post("/api/validate", json={"name": "pictures", "story": STORY}).status_code == 422


def picture_story(ref, actions=("sitting", "running")):
    story = doc(*actions)
    story["scenes"][0]["images"][0]["image"] = ref
    return story


def test_generate_with_a_picture_and_resume_it_from_the_command_line(ui, tmp_path, monkeypatch, capsys):
    stored = upload(ui, png_bytes()).json()
    story = picture_story(stored["image"])
    settings = {**SETTINGS, "inversion": "renoise"}
    checked = ui.post("/api/validate", json={"name": "walk", "story": story, "settings": settings}).json()
    assert any("identity picture" in n and "96x40 upscaled to 154x64, centre-cropped to 64x64" in n
               for n in checked.get("notes", [])), checked
    assert any(n.startswith(f"walk/story.yaml: scenes[0].identity: identity picture pictures/{stored['file']}")
               for n in checked["notes"]), checked      # paths inside the folder, relative to it
    assert not any(str(tmp_path) in n for n in checked["notes"])
    assert "--inversion renoise" in checked["command"]
    seen = run(ui, kind="generate", name="walk", story=story, settings=settings)
    assert seen[-1]["type"] == "done", seen[-1]
    assert "inversion" not in {e.get("phase") for e in seen if e["type"] == "progress"}   # renoise: no inversion pass
    gallery = [e for e in seen if e["type"] == "group"][0]["gallery"]
    picture = gallery["picture"]
    assert picture["url"] == stored["url"] and picture["inversion"] == "renoise"
    assert isinstance(picture["psnr"], float) and picture["fit"].startswith("96x40 upscaled")
    assert "reconstruction PSNR" in gallery["images"][0]["notes"][0]
    assert f"identity from the picture pictures/{stored['file']}" in gallery["images"][0]["notes"][0]
    folder = tmp_path / "ui" / "walk"
    from characonsist.picture import fit_picture, psnr

    fitted, _ = fit_picture(Image.open(io.BytesIO(png_bytes())).convert("RGB"), 64, 64)
    with Image.open(folder / "000_walk" / "identity.png") as identity:   # the identity shown is the reconstruction
        assert abs(psnr(identity, fitted) - picture["psnr"]) < 1e-6
    assert f"image: ../pictures/{stored['file']}" in (folder / "story.yaml").read_text()
    manifest = json.loads((folder / "manifest.json").read_text())
    record = manifest["groups"][0]["identity"]["picture"]
    assert record["path"] == str(tmp_path / "ui" / "pictures" / stored["file"]) and record["sha256"] == stored["sha256"]
    before = {p: p.read_bytes() for p in folder.rglob("*.png")}
    # the command the UI shows resumes it; so does the saved story file read from another folder, relative paths
    opened = ui.get("/api/stories/walk").json()
    assert opened["story"]["scenes"][0]["images"][0]["image"] == stored["image"]
    assert opened["settings"]["inversion"] == "renoise" and opened["groups"][0]["picture"]["psnr"] == picture["psnr"]
    assert cli.main(shlex.split(opened["command"])[1:]) == 0
    monkeypatch.chdir(tmp_path / "ui")
    argv = shlex.split(opened["command"])[1:]
    argv[1], argv[argv.index("--out") + 1] = "walk/story.yaml", "walk"
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.count("0 to generate") == 2
    assert {p: p.read_bytes() for p in folder.rglob("*.png")} == before
    # the zip holds the picture where the story file's ../pictures/ points once unpacked
    names = zipfile.ZipFile(io.BytesIO(ui.get("/api/stories/walk/zip").content)).namelist()
    assert f"pictures/{stored['file']}" in names and "walk/story.yaml" in names
    # story files in every format keep the reference
    for fmt, filename in (("yaml", "s.yaml"), ("toml", "s.toml"), ("text", "s.txt")):
        plain = picture_story(stored["image"]) if fmt == "text" else story
        if fmt == "text":
            plain["title"], plain["scenes"][0]["name"] = "", ""
        text = ui.post("/api/storyfile", json={"story": plain, "format": fmt}).json()["text"]
        back = ui.post("/api/parse", json={"filename": filename, "text": text}).json()["story"]
        assert back["scenes"][0]["images"][0]["image"] == stored["image"], fmt
    assert text.splitlines()[0] == f"park#a cat#sitting | {stored['image']}"
    # a picture the UI did not store is never read: the story names it, the check says to upload it
    for ref in ("/etc/hostname", "../walk/story.yaml", "me.png"):
        refused = ui.post("/api/validate", json={"name": "walk", "story": picture_story(ref), "settings": SETTINGS})
        assert refused.status_code == 422 and refused.json()["problems"][0].startswith(
            f"scenes[0].identity: picture {ref!r} is not one uploaded to this UI"), refused.json()


def test_a_command_line_run_with_a_picture_resumes_in_the_ui_once_the_picture_is_uploaded(ui, tmp_path, tiny_model,
                                                                                           capsys):
    data = png_bytes((50, 70), (10, 120, 200))
    (tmp_path / "me.png").write_bytes(data)
    story = tmp_path / "mine.txt"
    story.write_text("park#a cat#sitting | me.png\npark#a cat#running\n")
    folder = tmp_path / "ui" / "mine"
    assert cli.main(["generate", str(story), "--model", tiny_model, "--out", str(folder), "--height", "64", "--width",
                     "64", "--steps", "3", "--option", "mask_step=1", "--quiet"]) == 0
    opened = ui.get("/api/stories/mine").json()
    assert opened["story"]["scenes"][0]["images"][0]["image"] == str(tmp_path / "me.png")   # outside: not read
    assert opened["groups"][0]["picture"]["url"] is None and opened["groups"][0]["picture"]["psnr"] is not None
    refused = ui.post("/api/validate", json={"name": "mine", "story": opened["story"], "settings": opened["settings"]})
    assert refused.status_code == 422 and "not one uploaded to this UI" in refused.json()["problems"][0]
    stored = upload(ui, data, "me.png").json()
    opened = ui.get("/api/stories/mine").json()                 # the same bytes: the story names the stored copy
    assert opened["story"]["scenes"][0]["images"][0]["image"] == stored["image"]
    assert opened["groups"][0]["picture"]["url"] == stored["url"]
    kept = (folder / "group_000" / "identity.png").read_bytes()
    seen = run(ui, kind="generate", name="mine", story=opened["story"], settings=opened["settings"])
    assert seen[-1]["type"] == "done" and [e for e in seen if e["type"] == "plan"][0]["todo"] == []
    assert (folder / "group_000" / "identity.png").read_bytes() == kept


def test_the_ui_loads_its_model_as_generate_would_and_says_so(tiny_model, tmp_path, capsys):
    """A small GPU's memory mode and weight format reach the UI's one model, every story's manifest and the
    command it shows; what cannot work is refused before the UI starts."""
    import importlib.util

    from characonsist.ui.form import Loading

    for argv, message in ((["--memory", "auto"], "--memory/--quantize auto plans for one story's size"),
                          (["--memory", "model-offload"], "needs a CUDA GPU and none is visible"),
                          (["--quantize", "int4"], "unknown weight format --quantize 'int4'"),
                          (["--gpu-ids", "x"], "--gpu-ids 'x' must be comma-separated integers")):
        assert cli.main(["ui", "--model", tiny_model, "--out", str(tmp_path / "refused"), "--port", "0",
                         *argv]) == cli.EXIT_BAD_INPUT, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "refused").exists()
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao not installed")

    from torchao.utils import TorchAOBaseTensor

    space = Workspace(tmp_path / "ui", tiny_model, Loading(quantize="int8", dtype="float32", memory="0"), cli.FLAGS)
    worker = Worker(space, tiny_model)
    assert space.loading == Loading(memory="none", quantize="int8", dtype="float32")   # "0" is the official none
    space.open()
    worker.start()
    try:
        client = TestClient(create_app(worker, ["testserver"]))
        seen = run(client, kind="generate", name="walk", story=doc("sitting", "running"), settings=SETTINGS)
        assert seen[-1]["type"] == "done", seen[-1]
        assert isinstance(worker.pipe.transformer.transformer_blocks[0].attn.to_q.weight, TorchAOBaseTensor)
        settings = json.loads((tmp_path / "ui" / "walk" / "manifest.json").read_text())["settings"]
        assert settings["quantize"] == "int8" and settings["dtype"] == "float32"
        command = client.get("/api/stories/walk").json()["command"]
        assert "--quantize int8 --dtype float32" in command and "--memory" not in command
        assert client.get("/api/info").json()["loading"] == "--quantize int8 --dtype float32"   # the page's header
    finally:
        worker.stop()
        space.close()
    capsys.readouterr()
    assert cli.main(shlex.split(command)[1:]) == 0      # the shown command loads alike: the story is done, not changed
    assert "1 group(s), 1 already done, 0 to generate" in capsys.readouterr().out


@pytest.mark.slow
def test_an_unwritable_folder_is_refused_at_start(tmp_path):
    from test_output_folder import one_line, without_override  # real permission bits, root included

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        done = without_override(["ui", "--out", str(locked), "--port", "0"])
    finally:
        locked.chmod(0o755)
    assert done.returncode == cli.EXIT_BAD_INPUT and "Traceback" not in done.stderr
    assert f"--out {locked} is not writable (permission denied); the UI writes its stories there" in \
        one_line(done.stderr)
    assert list(locked.iterdir()) == []
