"""ViStoryBench in ``characonsist eval``: the converter, the output layout, every metric (tiny random models and
hand-made detectors/encoders with known answers) and prompt alignment against a local fake endpoint."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from characonsist import cli
from characonsist.evaluate import vistory_metrics as vm
from characonsist.evaluate.runfolder import read_run
from characonsist.evaluate.vistorybench import (
    LITE,
    dataset_root,
    export_layout,
    read_map,
    read_story,
    shots_from_layout,
    shots_from_runs,
)
from characonsist.storyfile import load_story


def _text(en: str, ch: str | None = None) -> dict:
    return {"en": en, "ch": ch or f"中文 {en}"}


def _shot(index: int, chars: list[str], scene="a forest", script="walks", camera="Long shot") -> dict:
    return {"index": index, "Setting Description": _text(scene), "Plot Correspondence": _text(f"plot {index}"),
            "Characters Appearing": {"en": chars, "ch": [f"名{c}" for c in chars]},
            "Static Shot Description": _text(script), "Shot Perspective Design": _text(camera)}


def _image(path: Path, colour, size=(48, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_dataset(folder: Path) -> Path:
    """Three stories in the benchmark's layout (hub folder name ViStoryBench): 01 and 08 are in Lite, 02 is not."""
    root = folder / "ViStoryBench"
    chars = {"Rabbit": {"name_en": "Rabbit", "name_ch": "兔子", "prompt_en": "a brown rabbit", "prompt_ch": "棕兔",
                        "tag": "non_human", "num_of_appearances": 2},
             "Ann": {"name_en": "Ann", "name_ch": "安", "prompt_en": "a girl in a red coat", "prompt_ch": "红衣女孩",
                     "tag": "unrealistic_human", "num_of_appearances": 2},
             "Owl": {"name_en": "Owl", "name_ch": "猫头鹰", "prompt_en": "an old owl", "prompt_ch": "老猫头鹰",
                     "tag": "non_human", "num_of_appearances": 0}}
    for sid in ("01", "02", "08"):
        shots = [_shot(1, ["Rabbit"], scene="a sunny meadow", script="Rabbit hops", camera="Full shot"),
                 _shot(2, ["Rabbit", "Ann"], scene="a river bank", script="Ann feeds Rabbit"),
                 _shot(3, [], scene="an empty road", script="leaves blow"),
                 _shot(4, ["Ann"], script="Ann waves", camera="Close-up")]
        broken = {k: v for k, v in _shot(5, ["Ann"]).items() if k != "Shot Perspective Design"}
        story = {"Story_type": _text("fairy tale"), "Characters": chars, "Shots": shots + [broken]}
        (root / sid).mkdir(parents=True)
        (root / sid / "story.json").write_text("\ufeff" + json.dumps(story, ensure_ascii=False), encoding="utf-8")
        _image(root / sid / "image" / "Rabbit" / "00.jpg", (150, 100, 50))
        _image(root / sid / "image" / "Rabbit" / "01.jpg", (160, 110, 60))
        _image(root / sid / "image" / "Ann" / "00.jpg", (200, 30, 30))
        _image(root / sid / "image" / "Owl" / "00.png", (90, 90, 90))
    return folder


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "data")


def test_reader_follows_the_benchmark_loader(dataset):
    root = dataset_root(dataset)
    assert root.name == "ViStoryBench" and "08" in LITE
    story = read_story(root, "01", "en")
    assert [s.index for s in story.shots] == [1, 2, 3, 4]      # the shot missing a field is left out, with a note
    assert any("missing Shot Perspective Design" in n for n in story.notes)
    assert story.shots[1].keys == ["Rabbit", "Ann"] and story.shots[1].names == ["Rabbit", "Ann"]
    assert [p.name for p in story.characters["Rabbit"].jpgs] == ["00.jpg", "01.jpg"]
    assert story.characters["Owl"].jpgs == [] and story.characters["Owl"].images[0].name == "00.png"
    ch = read_story(root, "01", "ch")
    assert ch.shots[1].names == ["名Rabbit", "名Ann"] and ch.shots[1].keys == ["Rabbit", "Ann"]
    assert ch.characters["Ann"].prompt == "红衣女孩" and ch.shots[0].scene == "中文 a sunny meadow"


def test_converter_writes_story_files_groups_per_character(dataset, tmp_path, capsys):
    out = tmp_path / "stories"
    assert cli.main(["eval", "convert", "vistorybench", str(dataset), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 stories, 6 groups" in printed and "3 shots with several characters" in printed
    assert sorted(p.name for p in out.iterdir()) == ["01.yaml", "02.yaml", "08.yaml", "vistorybench.json"]
    story = load_story(out / "01.yaml")                   # the project's own parser accepts it
    rabbit, ann = story.groups
    assert rabbit.name == "000_01-rabbit" and ann.name == "001_01-ann"
    assert rabbit.picture == str((dataset / "ViStoryBench/01/image/Rabbit/00.jpg").resolve())
    assert rabbit.identity.character == "a brown rabbit"
    assert [f.spec() for f in rabbit.frames] == ["a sunny meadow#a brown rabbit#Rabbit hops Perspective: Full shot",
                                                 "a river bank#a brown rabbit#Ann feeds Rabbit Perspective: Long shot"]
    assert [f.background for f in ann.frames] == ["a river bank", "a forest"]
    assert rabbit.captions[1] == "Full shot;plot 1;Rabbit hops;Rabbit is a brown rabbit;a sunny meadow;"
    mapping = read_map(out)
    info = mapping["stories"]["01"]
    assert info["groups"]["000_01-rabbit"] == {"character": "Rabbit", "identity_shot": None, "frame_shots": [1, 2]}
    assert info["primary"] == {"1": "000_01-rabbit", "2": "000_01-rabbit", "4": "001_01-ann"}
    text = (out / "01.yaml").read_text()
    assert "shot 3: no character" in text and "shot 2: 2 characters" in text and "'Owl' appears in no shot" in text
    # text only (the leaderboard's setting): the first shot is the generated identity
    assert cli.main(["eval", "convert", "vistorybench", str(dataset), "--out", str(tmp_path / "t"), "--lite",
                     "--text-only"]) == 0
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["01.yaml", "08.yaml", "vistorybench.json"]
    lite = load_story(tmp_path / "t" / "08.yaml")
    assert lite.groups[0].picture is None and lite.groups[0].identity.action == "Rabbit hops Perspective: Full shot"
    assert read_map(tmp_path / "t")["stories"]["08"]["groups"]["000_08-rabbit"]["identity_shot"] == 1
    # a file it did not write is kept
    (tmp_path / "t" / "08.yaml").write_text("scenes: []\n")
    assert cli.main(["eval", "convert", "vistorybench", str(dataset), "--out", str(tmp_path / "t"), "--lite"]) == 2
    assert "not written by the converter" in capsys.readouterr().err
    assert (tmp_path / "t" / "08.yaml").read_text() == "scenes: []\n"
    assert cli.main(["eval", "convert", "vistorybench", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no ViStoryBench stories here" in capsys.readouterr().err


def _fake_run(folder: Path, story_file: Path, colours: dict[str, list], prefix: str = "") -> Path:
    """A run folder as `characonsist generate` writes it for a converted story (manifest + PNGs); ``colours`` gives
    each group's image colours (identity first), None for an unfinished image; ``prefix`` as with several stories."""
    story = load_story(story_file)
    groups = []
    for group in story.groups:
        entries = []
        for k, (image, colour) in enumerate(zip(group.images, colours[group.name], strict=True)):
            path = f"{prefix}{group.name}/{'identity' if k == 0 else f'frame_{k:02d}'}.png"
            if colour is not None:
                _image(folder / path, colour, (64, 48))
            entries.append({"path": path, "prompt": image.prompt, "background": image.background,
                            "character": image.character, "action": image.action, "finished": colour is not None})
        groups.append({"name": prefix + group.name, "identity": entries[0], "frames": entries[1:]})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"format": "characonsist-manifest/1",
                                                      "settings": {"method": "characonsist"}, "groups": groups}))
    return folder


def test_run_to_benchmark_layout_and_back(dataset, tmp_path):
    out = tmp_path / "stories"
    assert cli.main(["eval", "convert", "vistorybench", str(dataset), "--out", str(out)]) == 0
    run = _fake_run(tmp_path / "run01", out / "01.yaml",
                    {"000_01-rabbit": [(1, 1, 1), (10, 0, 0), (20, 0, 0)], "001_01-ann": [(2, 2, 2), (0, 30, 0), None]})
    shots = shots_from_runs([read_run(run)], read_map(out))
    # shot 1 and 2 from the rabbit's group (shot 2's first character), shot 4 unfinished, shot 3 has no character
    assert {k: v.name for k, v in shots["01"].items()} == {1: "frame_01.png", 2: "frame_02.png"}
    # several story files in one run: groups are <story stem>/<group>
    run2 = _fake_run(tmp_path / "run02", out / "02.yaml",
                     {"000_02-rabbit": [(1, 1, 1), (5, 0, 0), (6, 0, 0)], "001_02-ann": [(2, 2, 2), (7, 0, 0), (8, 0, 0)]},
                     prefix="02/")
    both = shots_from_runs([read_run(run), read_run(run2)], read_map(out))
    assert sorted(both) == ["01", "02"] and both["02"][4] == run2 / "02/001_02-ann/frame_02.png"
    root = export_layout(shots, tmp_path / "outputs", "characonsist", "base", "en", "20260101_120000", "png")
    assert root == tmp_path / "outputs/characonsist/base/en/20260101_120000"
    assert sorted(p.name for p in (root / "01").iterdir()) == ["shot_01.png", "shot_02.png"]
    assert Image.open(root / "01/shot_02.png").getpixel((0, 0)) == (20, 0, 0)
    # the benchmark's reader rule: int(name.split('_')[-1].split('.')[0]) is the shot index
    back = shots_from_layout(root)
    assert {k: v.name for k, v in back["01"].items()} == {1: "shot_01.png", 2: "shot_02.png"}
    # a second export into our folder completes it; a folder we did not write is refused
    export_layout(shots, tmp_path / "outputs", "characonsist", "base", "en", "20260101_120000", "png")
    (tmp_path / "outputs/other/base/en/20260101_120000").mkdir(parents=True)
    with pytest.raises(ValueError, match="not written by this export"):
        export_layout(shots, tmp_path / "outputs", "other", "base", "en", "20260101_120000")
    jpg = export_layout(shots, tmp_path / "j", "m", timestamp="20260101_120001")
    assert (jpg / "01" / "shot_01.jpg").is_file()


# ----------------------------------------------------------------------------- CIDS, OCCM, copy-paste: known answers

class ColourDetector:
    """Boxes by image colour: a red image holds two characters (left and right halves), any other one (whole)."""

    def detect(self, image, caption="character", threshold=0.25):
        import torch

        r, g, b = image.getpixel((0, 0))
        if r > 180 and g < 60:
            return torch.tensor([[0.25, 0.5, 0.5, 1.0], [0.75, 0.5, 0.5, 1.0]]), torch.tensor([0.9, 0.8])
        return torch.tensor([[0.5, 0.5, 1.0, 1.0]]), torch.tensor([0.7])


class ColourEncoder:
    """Unit mean colour of the left column of pixels (+ a constant); mirrored images differ when asymmetric."""

    def embed(self, images):
        if not images:
            return None, []
        feats = np.stack([np.r_[np.asarray(im.convert("RGB"), np.float64)[:, 0].mean(0), 10.0] for im in images])
        return feats / np.linalg.norm(feats, axis=1, keepdims=True), list(range(len(images)))


def test_cids_occm_and_copy_paste_by_hand(dataset):
    story = read_story(dataset_root(dataset), "01")
    ref_rabbit = ColourEncoder().embed([Image.open(p) for p in story.characters["Rabbit"].jpgs])[0]  # JPEG colours
    shot_dir = dataset / "shots"
    _image(shot_dir / "1.png", (150, 100, 50))      # shot 1: rabbit, one box
    _image(shot_dir / "2.png", (200, 30, 30))       # shot 2: rabbit + Ann, two boxes (red)
    _image(shot_dir / "4.png", (0, 0, 250))         # shot 4: Ann, one box
    shots = {1: shot_dir / "1.png", 2: shot_dir / "2.png", 4: shot_dir / "4.png"}
    models = vm.CidsModels(ColourDetector(), ColourEncoder(), face=None)
    result = vm.cids_story(story, shots, models)
    m = result["metrics"]
    assert m["occm"] == pytest.approx(100.0, abs=1e-3)        # 1, 2 and 1 boxes for 1, 2 and 1 characters
    e = ColourEncoder()
    f1 = e.embed([Image.new("RGB", (4, 4), (150, 100, 50))])[0][0]
    f2 = e.embed([Image.new("RGB", (4, 4), (200, 30, 30))])[0][0]
    cross_rabbit = np.mean(np.stack([f1, f2]) @ ref_rabbit.T)
    assert result["characters"]["Rabbit"]["cross"] == pytest.approx(round(cross_rabbit, 4))
    assert result["characters"]["Rabbit"]["self"] == pytest.approx(round(float(f1 @ f2), 4))
    assert result["characters"]["Owl"] == {"cross": 0.0, "self": 0.0, "matched": 0}       # never matched: 0
    chars = result["characters"]
    assert m["cids_cross_mean"] == pytest.approx(round(sum(c["cross"] for c in chars.values()) / 3, 4))
    assert result["shots"][2]["Rabbit"]["box"] is not None and result["shots"][2]["Ann"]["box"] is not None
    # uniform references: the mirror equals the original, so copy-paste is exactly 1/2
    assert m["copy_paste_score"] == pytest.approx(0.5)
    # one box too many in shot 4: E = 1, D = 2
    _image(shot_dir / "4.png", (220, 20, 20))
    m2 = vm.cids_story(story, shots, models)["metrics"]
    assert m2["occm"] == pytest.approx((100 + 100 + 100 * math.exp(-1 / (1 + 1e-6))) / 3, abs=1e-3)


def test_crop_boxes_truncates_and_clamps_like_the_benchmark():
    import torch

    image = Image.new("RGB", (100, 50))
    crops, kept = vm.crop_boxes(image, torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.999, 0.5, 0.3, 2.0],
                                                     [0.0, 0.0, 0.0, 0.0]]))
    assert kept == [0, 1] and crops[0].size == (50, 26)   # (25, 12.5, 75, 37.5): PIL rounds half to even: 12, 38
    assert crops[1].size == (100 - 84, 50)                                 # int(99.9) = 99, clamped to the image


def test_face_alignment_maps_landmarks_onto_the_template():
    rng = np.random.default_rng(0)
    src = vm.ARCFACE_DST * 1.7 + np.array([13.0, 7.0]) + rng.normal(0, 0.01, (5, 2))
    m = vm.similarity_transform(src, vm.ARCFACE_DST)
    mapped = src @ m[:, :2].T + m[:, 2]
    assert np.abs(mapped - vm.ARCFACE_DST).max() < 0.05
    assert vm.face_thresholds()[:3] == pytest.approx([0.45, 0.35, 0.25]) and len(vm.face_thresholds()) == 4
    # a bright dot at an integer pixel p lands at M p in the aligned crop (OpenCV's warpAffine convention)
    for scale in (1.7, 0.6):
        src = vm.ARCFACE_DST * scale + np.array([13.0, 7.0])
        m = vm.similarity_transform(src, vm.ARCFACE_DST)
        image = Image.new("RGB", (224, 224))
        dot = np.round(src[2])
        image.putpixel((int(dot[0]), int(dot[1])), (255, 255, 255))
        aligned = np.asarray(vm.align_face(image, src))
        y, x = np.unravel_index(aligned[..., 0].argmax(), aligned.shape[:2])
        ex, ey = m[:, :2] @ dot + m[:, 2]
        assert abs(x - ex) <= 0.5 + 1e-6 and abs(y - ey) <= 0.5 + 1e-6


# ------------------------------------------------------------------------------------------- tiny real models

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from characonsist.evaluate.tiny import (
        save_tiny_adaface,
        save_tiny_aesthetic,
        save_tiny_arcface,
        save_tiny_csd,
        save_tiny_facenet,
        save_tiny_grounding_dino,
        save_tiny_models,
        save_tiny_retinaface,
        save_tiny_scrfd,
    )

    folder = tmp_path_factory.mktemp("vistory_models")
    paths = {k: v for k, v in save_tiny_models(folder / "base").items() if k == "clip"}
    paths["gdino"] = save_tiny_grounding_dino(folder / "gdino")
    paths["csd"] = str(save_tiny_csd(folder / "csd.pth"))
    paths["siglip"], head = save_tiny_aesthetic(folder / "aesthetic")
    paths["head"] = str(head)
    paths["arcface"] = str(save_tiny_arcface(folder / "arcface.onnx"))
    paths["retinaface"] = str(save_tiny_retinaface(folder / "retinaface.pth"))
    paths["scrfd"] = str(save_tiny_scrfd(folder / "scrfd_10g_bnkps.onnx"))
    paths["adaface"] = str(save_tiny_adaface(folder / "adaface.ckpt"))
    paths["facenet"] = str(save_tiny_facenet(folder / "facenet.pt"))
    return paths


def test_csd_matches_a_plain_openai_visual_forward(tiny):
    import torch

    model = vm.CsdModel(tiny["csd"], "cpu", progress=False)
    state = torch.load(tiny["csd"])
    x = model.pixels(Image.new("RGB", (60, 30), (10, 200, 90)))
    # OpenAI CLIP's VisionTransformer written out: conv, class token, positions, ln_pre, blocks, ln_post on CLS
    p = {k.removeprefix("backbone."): v for k, v in state.items()}
    t = torch.nn.functional.conv2d(x, p["conv1.weight"], stride=p["conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    t = torch.cat([p["class_embedding"].expand(1, 1, -1), t], 1) + p["positional_embedding"]
    ln = lambda v, n: torch.nn.functional.layer_norm(v, v.shape[-1:], p[f"{n}.weight"], p[f"{n}.bias"])  # noqa: E731
    t = ln(t, "ln_pre")
    width = t.shape[-1]
    for n in range(2):
        b = f"transformer.resblocks.{n}."
        h = ln(t, b + "ln_1")
        attn = torch.nn.MultiheadAttention(width, 1, batch_first=True)
        attn.in_proj_weight.data, attn.in_proj_bias.data = p[b + "attn.in_proj_weight"], p[b + "attn.in_proj_bias"]
        attn.out_proj.weight.data, attn.out_proj.bias.data = p[b + "attn.out_proj.weight"], p[b + "attn.out_proj.bias"]
        t = t + attn(h, h, h, need_weights=False)[0]
        h = ln(t, b + "ln_2") @ p[b + "mlp.c_fc.weight"].T + p[b + "mlp.c_fc.bias"]
        t = t + (h * torch.sigmoid(1.702 * h)) @ p[b + "mlp.c_proj.weight"].T + p[b + "mlp.c_proj.bias"]
    style = torch.nn.functional.normalize(ln(t[:, 0], "ln_post") @ p["last_layer_style"], dim=-1)
    assert np.abs(model.embed_pixels(x) - style.detach().numpy()).max() < 1e-5


def test_csd_self_and_cross(dataset, tiny):
    model = vm.CsdModel(tiny["csd"], "cpu", progress=False)
    story = read_story(dataset_root(dataset), "01")
    _image(dataset / "s/1.png", (30, 60, 90))
    _image(dataset / "s/2.png", (30, 60, 90))
    _image(dataset / "s/3.png", (200, 10, 10))
    result = vm.csd_story(story, {1: dataset / "s/1.png", 2: dataset / "s/2.png"}, model)
    assert result["metrics"]["self_csd"] == pytest.approx(1.0, abs=1e-5)
    emb = lambda p: model.embed([Image.open(p)])[0]  # noqa: E731
    refs = story.characters
    shot1 = emb(dataset / "s/1.png") @ emb(refs["Rabbit"].images[0])
    shot2 = (emb(dataset / "s/2.png") @ emb(refs["Rabbit"].images[0]) + emb(dataset / "s/2.png") @ emb(
        refs["Ann"].images[0])) / 2
    assert result["metrics"]["cross_csd"] == pytest.approx((shot1 + shot2) / 2, abs=1e-5)
    # shot 3 has no character: the story's first character with a picture stands in
    r3 = vm.csd_story(story, {3: dataset / "s/3.png"}, model)
    assert r3["metrics"]["cross_csd"] == pytest.approx(emb(dataset / "s/3.png") @ emb(refs["Rabbit"].images[0]), abs=1e-5)
    assert r3["metrics"]["self_csd"] == 0.0                                  # fewer than two shots
    with pytest.raises(vm.ModelUnavailable, match="not a CSD checkpoint"):
        vm.CsdModel(tiny["head"], "cpu", progress=False)


def test_aesthetic_is_the_head_on_the_unit_pooled_siglip_embedding(dataset, tiny):
    import torch
    from transformers import SiglipVisionModel

    model = vm.AestheticPredictor(tiny["head"], tiny["siglip"], "cpu", progress=False)
    image = Image.new("RGB", (90, 70), (120, 40, 200))
    x = torch.from_numpy(np.asarray(image.resize((378, 378), Image.BILINEAR), np.float32) / 255).permute(2, 0, 1)[None]
    tower = SiglipVisionModel.from_pretrained(tiny["siglip"]).eval()
    pooled = tower(pixel_values=x).pooler_output
    head = {k.removeprefix("scoring_head."): v for k, v in torch.load(tiny["head"]).items()}
    h = pooled / pooled.norm(dim=-1, keepdim=True)
    for k in (0, 2, 4, 6):
        h = h @ head[f"{k}.weight"].T + head[f"{k}.bias"]
    expected = float((h @ head["8.weight"].T + head["8.bias"]).detach())
    assert model.score(image) == pytest.approx(expected, abs=1e-5)
    _image(dataset / "a/1.png", (120, 40, 200), (90, 70))
    _image(dataset / "a/2.png", (10, 40, 20), (90, 70))
    story = vm.aesthetic_story({1: dataset / "a/1.png", 2: dataset / "a/2.png"}, model)
    assert story["metrics"]["aesthetic_score"] == pytest.approx(
        (expected + model.score(Image.open(dataset / "a/2.png"))) / 2, abs=1e-5)


def test_cids_with_tiny_grounding_dino_clip_and_arcface(dataset, tiny):
    detector = vm.GroundingDino(tiny["gdino"], "cpu")
    boxes, scores = detector.detect(Image.new("RGB", (70, 50), (90, 20, 20)))
    assert boxes.shape[1] == 4 and bool((scores[:-1] >= scores[1:]).all()) and bool((scores > 0.25).all())
    face = vm.FaceEncoder(tiny["arcface"], tiny["retinaface"], "cpu", progress=False)
    models = vm.CidsModels(detector, vm.ClipEncoder(tiny["clip"], "cpu"), face)
    story = read_story(dataset_root(dataset), "01")
    story.characters["Ann"].tag = "realistic_human"                          # through the face path
    _image(dataset / "g/1.png", (30, 90, 150), (80, 60))
    _image(dataset / "g/2.png", (30, 90, 150), (80, 60))
    _image(dataset / "g/4.png", (30, 90, 150), (80, 60))
    shots = {k: dataset / f"g/{k}.png" for k in (1, 2, 4)}
    result = vm.cids_story(story, shots, models)
    m = result["metrics"]
    assert 0 <= m["occm"] <= 100 and -1 <= m["cids_cross_mean"] <= 1
    assert result["characters"]["Rabbit"]["matched"] == 2
    assert result["characters"]["Rabbit"]["self"] == pytest.approx(1.0, abs=1e-5)       # identical shots
    assert 0 <= m["copy_paste_score"] <= 1


# --------------------------------------------------------------------------------------- prompt alignment endpoint

class FakeEndpoint(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeEndpoint.requests.append({"path": self.path, "auth": self.headers["Authorization"], "body": body})
        if self.headers["Authorization"] == "Bearer broken":
            self.send_error(500, "broken")
            return
        texts = [c.get("text", "") for m in body["messages"] for c in m["content"] if c["type"] == "text"]
        if "shot distance" in texts[0] and body["temperature"] == 0:
            answer = "Analysis: no number here"                 # retried with a higher temperature
        elif "shot distance" in texts[0]:
            answer = "Analysis: fine.\nScore: 2"
        elif "setting" in texts[0]:
            answer = "Analysis: good.\nScore: 4"
        else:
            answer = "Analysis: ok.\nScore: 3"
        data = json.dumps({"choices": [{"message": {"content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    FakeEndpoint.requests = []
    server = HTTPServer(("127.0.0.1", 0), FakeEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_prompt_alignment_against_a_local_endpoint(dataset, endpoint):
    story = read_story(dataset_root(dataset), "01")
    _image(dataset / "p/1.png", (1, 2, 3), (64, 64))
    aligner = vm.PromptAligner(endpoint, "sk-test", "test-model")
    result = vm.prompt_align_story(story, {1: dataset / "p/1.png"}, aligner)
    assert result["metrics"] == {"scene": 4, "character_action": 3, "camera": 2}
    first = FakeEndpoint.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    body = first["body"]
    assert body["model"] == "test-model" and body["seed"] == 123 and body["max_tokens"] == 512
    content = body["messages"][0]["content"]
    assert content[1]["text"] == "a sunny meadow" and content[2]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    temps = [r["body"]["temperature"] for r in FakeEndpoint.requests if "shot distance" in
             r["body"]["messages"][0]["content"][0]["text"]]
    assert temps == [0.0, 0.1]
    assert vm.PromptAligner(endpoint + "/v1/", "k").url == endpoint + "/v1/chat/completions"
    broken = vm.PromptAligner(endpoint, "broken", attempts=2, timeout=5)
    with pytest.raises(vm.PromptAlignError, match=r"no usable answer after 2 tries \(HTTP 500"):
        broken.score([{"role": "user", "content": []}])


def test_suite_end_to_end_on_a_run_with_export(dataset, tiny, endpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VISTORYBENCH_API_KEY", raising=False)
    stories = tmp_path / "stories"
    assert cli.main(["eval", "convert", "vistorybench", str(dataset), "--out", str(stories)]) == 0
    run = _fake_run(tmp_path / "run01", stories / "01.yaml",
                    {"000_01-rabbit": [(1, 1, 1), (150, 100, 50), (200, 30, 30)],
                     "001_01-ann": [(2, 2, 2), (0, 30, 0), (200, 30, 30)]})
    models = ["--grounding-dino", tiny["gdino"], "--cids-clip", tiny["clip"], "--arcface", tiny["arcface"],
              "--arcface-detector", tiny["scrfd"], "--face-detector", tiny["retinaface"], "--adaface",
              tiny["adaface"], "--facenet", tiny["facenet"], "--csd", tiny["csd"], "--aesthetic", tiny["head"],
              "--siglip", tiny["siglip"], "--device", "cpu", "-q"]
    report = tmp_path / "report"
    code = cli.main(["eval", "--suite", "vistorybench", "--dataset", str(dataset), "--map", str(stories), str(run),
                     "--export", str(tmp_path / "outputs"), "--timestamp", "20260102_030405", "--report-dir",
                     str(report), *models])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "prompt_align: off" in printed and "cids: cids_cross_mean" in printed and "csd: self_csd" in printed
    layout = tmp_path / "outputs/characonsist/base/en/20260102_030405"
    assert sorted(p.name for p in (layout / "01").iterdir()) == ["shot_01.jpg", "shot_02.jpg", "shot_04.jpg"]
    data = json.loads((report / "vistorybench.json").read_text())
    assert data["status"] == {"prompt_align": data["status"]["prompt_align"], "cids": "ok", "csd": "ok",
                              "aesthetic": "ok"}
    assert set(data["overall"]["cids"]) >= {"cids_cross_mean", "cids_self_mean", "occm", "copy_paste_score"}
    # the exported folder is scored the same (JPEG-compressed, so close), with prompt alignment on
    code = cli.main(["eval", "--suite", "vistorybench", "--dataset", str(dataset), str(layout), "--api-key", "k",
                     "--base-url", endpoint, "--report-dir", str(tmp_path / "r2"), *models])
    printed = capsys.readouterr().out
    assert code == 0, printed
    again = json.loads((tmp_path / "r2" / "vistorybench.json").read_text())
    assert again["overall"]["prompt_align"] == {"scene": 4, "character_action": 3, "camera": 2}
    assert "single_character_action" in again["overall"]["cids"]
    assert again["overall"]["aesthetic"]["aesthetic_score"] == pytest.approx(
        data["overall"]["aesthetic"]["aesthetic_score"], abs=0.05)
    # a model that cannot be had: skipped with its name, the others still run; none at all: exit 1
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code = cli.main(["eval", "--suite", "vistorybench", "--dataset", str(dataset), str(layout), "--vistory-metrics",
                     "csd", "--csd", "ViStoryBench/VistoryBench_pretrain:csd/csd_vit-large.pth", "-q"])
    captured = capsys.readouterr()
    assert code == 1 and "csd: skipped: cannot download 'csd/csd_vit-large.pth' from" in captured.out
    # bad input: one line each
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--suite", "vistorybench", str(run)])
    assert exit_info.value.code == 2 and "needs --dataset" in capsys.readouterr().err
    assert cli.main(["eval", "--suite", "vistorybench", "--dataset", str(dataset), str(run), *models]) == 2
    assert "--map" in capsys.readouterr().err


# ------------------------------------------------------------------------------ realistic humans: the face mix

def _noise(path: Path, seed: int, size=(96, 72)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_adaface_checkpoint_round_trip_and_ir101_shape(tiny, tmp_path):
    import torch

    from characonsist.evaluate.adaface import AdaFace, IResNet, read_checkpoint, shape_of

    model = AdaFace(tiny["adaface"], "cpu", progress=False)          # a Lightning file with an unknown class inside
    saved = torch.load(tiny["adaface"], weights_only=False)["state_dict"]
    assert read_checkpoint(tiny["adaface"]).keys() == {k[6:] for k in saved if k.startswith("model.")}
    assert (model.net.widths, model.net.units, model.net.dim) == ((4, 8, 12, 16), (1, 2, 1, 1), 16)
    face = Image.fromarray(np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8))
    x = model.tensor([face])
    rgb = np.asarray(face, dtype=np.float64)
    assert torch.equal(x[0], torch.from_numpy(((rgb[:, :, ::-1] / 255.0 - 0.5) / 0.5).transpose(2, 0, 1).copy()).float())
    # the same forward as the saved network, written out from its own modules
    net = IResNet((4, 8, 12, 16), (1, 2, 1, 1), 4, 16)
    net.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("model.")})
    expected = net.eval().output_layer(net.body(net.input_layer(x)))
    assert np.allclose(model.embed([face]), (expected / expected.norm(dim=1, keepdim=True)).detach().numpy(), atol=1e-6)
    with torch.device("meta"):
        full = IResNet().state_dict()
    assert shape_of(full) == {"stem": 64, "widths": (64, 128, 256, 512), "units": (3, 13, 30, 3), "dim": 512}
    assert len([k for k in full if k.endswith(".res_layer.1.weight")]) == 49          # IR-101: 49 units
    bad = tmp_path / "not_adaface.ckpt"
    torch.save({"state_dict": {"model.conv.weight": torch.zeros(1)}}, bad)
    with pytest.raises(vm.ModelUnavailable, match=r"not_adaface\.ckpt: not an AdaFace IR backbone state dict"):
        AdaFace(str(bad), "cpu")
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(vm.ModelUnavailable, match=r"junk\.ckpt: cannot read an AdaFace checkpoint"):
        AdaFace(str(tmp_path / "junk.ckpt"), "cpu")


def test_warp_affine_follows_opencv_conventions():
    from characonsist.evaluate.face_mix import BORDER_BGR, warp_affine

    src = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    same = warp_affine(src, np.array([[1.0, 0, 0], [0, 1.0, 0]]), (30, 20))
    assert np.array_equal(same[:-1, :-1], src[:-1, :-1])                 # the image itself, pixel centres on pixels
    shifted = warp_affine(src, np.array([[1.0, 0, 3], [0, 1.0, 2]]), (30, 20))
    assert np.array_equal(shifted[2:, 3:], src[:-2, :-3])                 # output (x, y) reads input (x - 3, y - 2)
    assert (shifted[0, 0] == BORDER_BGR).all() and (shifted[:2] == np.array(BORDER_BGR, np.uint8)).all()
    half = warp_affine(src, np.array([[1.0, 0, 0.5], [0, 1.0, 0]]), (30, 20))
    inner = (src[:, :-1].astype(int) * 16384 + src[:, 1:].astype(int) * 16384 + (1 << 14)) >> 15
    assert np.array_equal(half[:-1, 1:].astype(int), inner[:-1])           # half a pixel: the two neighbours' mean
    edge = (np.array(BORDER_BGR) * 16384 + src[:, 0].astype(int) * 16384 + (1 << 14)) >> 15
    assert np.array_equal(half[:-1, 0].astype(int), edge[:-1])             # outside neighbour: the border value
    with pytest.raises(ValueError, match="uint8"):
        warp_affine(src.astype(np.float32), np.eye(2, 3), (4, 4))


def test_partial_affine_recovers_a_similarity_and_drops_a_far_landmark():
    from characonsist.evaluate.face_mix import _cv_rng_subsets, face_template, partial_affine

    dst = face_template()
    angle, scale, shift = 0.3, 2.5, np.array([40.0, -7.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = (dst - shift) @ np.linalg.inv(rot).T                           # src mapped by (rot, shift) lands on dst
    m, inliers = partial_affine(src, dst)
    assert inliers.all() and np.allclose(m[:, :2], rot, atol=1e-4) and np.allclose(m[:, 2], shift, atol=1e-3)
    far = src.copy()
    far[3] += 40.0                                                        # one mouth corner far off
    m2, inliers2 = partial_affine(far, dst)
    assert inliers2.tolist() == [True, True, True, False, True]
    assert np.allclose(m2, m, atol=1e-3)                                  # the fit of the other four is the same
    subsets = _cv_rng_subsets(5, 13)
    assert len(subsets) == 13 and all(len(set(s)) == 2 and max(s) < 5 for s in subsets)
    assert subsets == _cv_rng_subsets(5, 13)                              # OpenCV's fixed seed: always the same


def test_ensemble_similarity_averages_the_models_both_have():
    from characonsist.evaluate.face_mix import ensemble_matrix, ensemble_similarity

    u = lambda *v: np.array([v], float) / np.linalg.norm(v)  # noqa: E731
    a = {"arcface": u(1, 0), "adaface": u(1, 1), "facenet": u(0, 1)}
    b = {"arcface": u(1, 0), "facenet": u(1, 0)}
    assert ensemble_similarity(a, b) == pytest.approx((1.0 + 0.0) / 2)     # adaface: only in a, left out
    assert ensemble_similarity({"adaface": u(1, 0)}, b) == 0.0             # nothing in common: 0
    assert ensemble_matrix([a, b], [b]).tolist() == [[pytest.approx(0.5)], [pytest.approx(1.0)]]


def test_face_mix_features_from_tiny_models(tiny):
    import torch

    from characonsist.evaluate.adaface import AdaFace
    from characonsist.evaluate.face_mix import FaceMixEncoder, FacexlibFaces
    from characonsist.evaluate.facenet import FaceNet

    faces = FacexlibFaces(tiny["retinaface"], "cpu", progress=False)
    assert faces.detector.threshold == 0.97 and faces.detector.nms_offset == 0 and faces.detector.top_k == (None, None)
    facenet = FaceNet(tiny["facenet"], "cpu", progress=False)
    enc = FaceMixEncoder(vm.FaceEncoder(tiny["arcface"], tiny["retinaface"], "cpu", progress=False),
                         AdaFace(tiny["adaface"], "cpu", progress=False), facenet, faces)
    images = [Image.fromarray(np.random.default_rng(k).integers(0, 256, (70, 90, 3), dtype=np.uint8)) for k in range(6)]
    feats, valid = enc.embed(images)
    assert valid and all(set(f) <= {"arcface", "adaface", "facenet"} and f for f in feats)
    k = next(i for i, f in enumerate(feats) if "facenet" in f)
    face = faces.aligned(images[valid[k]])
    assert face.shape == (112, 112, 3) and face.dtype == np.uint8
    x = torch.from_numpy(face.astype(np.float32) / 255).permute(2, 0, 1)[None]   # BGR / 255, as the benchmark feeds it
    ref = facenet.net(x).detach().numpy()
    assert np.allclose(feats[k]["facenet"], ref / np.linalg.norm(ref), atol=1e-6)
    with pytest.raises(ValueError, match="facexlib face crops"):
        FaceMixEncoder(None, enc.adaface, None, None)


def test_cids_face_mix_end_to_end_on_the_tiny_dataset(dataset, tiny, tmp_path, capsys):
    """A realistic human through ``eval --suite vistorybench`` with the default face mix, equal to ``cids_story``
    with the encoder built by hand; ``--face-encoder arcface`` scores ArcFace alone."""
    from characonsist.evaluate.adaface import AdaFace
    from characonsist.evaluate.face_mix import FaceMixEncoder, FacexlibFaces
    from characonsist.evaluate.facenet import FaceNet
    from characonsist.evaluate.scrfd import ScrfdArcFace

    root = dataset_root(dataset)
    data = json.loads((root / "01/story.json").read_text(encoding="utf-8-sig"))
    data["Characters"]["Ann"]["tag"] = "realistic_human"
    (root / "01/story.json").write_text(json.dumps(data), encoding="utf-8")
    _noise(root / "01/image/Ann/00.jpg", 7, (640, 480))                  # the tiny detector's boxes are 5% wide
    layout = tmp_path / "outputs/m/base/en/20260101_000000/01"
    shots = {k: _noise(layout / f"shot_{k:02d}.png", 10 + k, (640, 480)) for k in (1, 2, 4)}
    common = ["eval", "--suite", "vistorybench", "--dataset", str(dataset), str(layout.parent), "--vistory-metrics",
              "cids", "--grounding-dino", tiny["gdino"], "--cids-clip", tiny["clip"], "--arcface", tiny["arcface"],
              "--arcface-detector", tiny["scrfd"], "--face-detector", tiny["retinaface"], "--adaface",
              tiny["adaface"], "--facenet", tiny["facenet"], "--device", "cpu", "-q"]
    assert cli.main([*common, "--report-dir", str(tmp_path / "mix")]) == 0, capsys.readouterr().out
    mix = json.loads((tmp_path / "mix/vistorybench.json").read_text())["stories"]["cids"]["01"]
    story = read_story(root, "01")
    assert story.characters["Ann"].tag == "realistic_human"
    encoder = FaceMixEncoder(ScrfdArcFace(tiny["arcface"], tiny["scrfd"], "cpu", progress=False),
                             AdaFace(tiny["adaface"], "cpu", progress=False),
                             FaceNet(tiny["facenet"], "cpu", progress=False),
                             FacexlibFaces(tiny["retinaface"], "cpu", progress=False))
    models = vm.CidsModels(vm.GroundingDino(tiny["gdino"], "cpu"), vm.ClipEncoder(tiny["clip"], "cpu"), encoder)
    by_hand = vm.cids_story(story, shots, models)
    assert mix["metrics"] == pytest.approx(by_hand["metrics"], abs=1e-6)
    assert mix["characters"]["Ann"] == by_hand["characters"]["Ann"] and by_hand["characters"]["Ann"]["matched"] >= 1
    assert cli.main([*common, "--face-encoder", "arcface", "--report-dir", str(tmp_path / "arc")]) == 0
    arc = json.loads((tmp_path / "arc/vistorybench.json").read_text())["stories"]["cids"]["01"]
    alone = vm.cids_story(story, shots, vm.CidsModels(models.detector, models.clip, encoder.arcface))
    assert arc["characters"]["Ann"] == alone["characters"]["Ann"]
    # with crops large enough for facexlib's detector (the tiny GroundingDINO's boxes are small): all three models
    # count, and a character's cross is the mean over its crops of the models' averaged cosines to the reference
    class Centre:
        def detect(self, image):
            import torch

            return torch.tensor([[0.5, 0.5, 0.8, 0.8]]), torch.tensor([0.9])

    centred = vm.CidsModels(Centre(), models.clip, encoder)
    result = vm.cids_story(story, shots, centred)
    ref_crop, _ = vm.crop_boxes(Image.open(root / "01/image/Ann/00.jpg").convert("RGB"), Centre().detect(None)[0])
    ref = encoder.features(ref_crop[0])
    crops = [vm.crop_boxes(Image.open(shots[k]).convert("RGB"), Centre().detect(None)[0])[0][0] for k in (2, 4)]
    feats = [encoder.features(c) for c in crops]
    assert set(ref) == {"arcface", "adaface", "facenet"} and all(set(f) == set(ref) for f in feats)
    per_model = [[float((f[n] @ ref[n].T).item()) for n in ("arcface", "adaface", "facenet")] for f in feats]
    cross = np.mean([np.mean(p) for p in per_model])
    assert result["characters"]["Ann"]["cross"] == pytest.approx(round(cross, 4), abs=1e-9)
    arcface_only = np.mean([p[0] for p in per_model])
    assert abs(cross - arcface_only) > 1e-3                               # the mix is not ArcFace alone


def test_facexlib_order_of_equal_scores(tiny):
    """Saturated probabilities (1.0 in float32) tie: facexlib takes numpy's ``argsort()[::-1]`` order (the last
    prior first, for a plain run of ties), the port's ``detect.py`` order here keeps prior order."""
    import torch

    from characonsist.evaluate.retinaface import RetinaFaceDetector

    boxes = torch.tensor([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [0, 20, 10, 30.0]])
    scores = torch.tensor([1.0, 1.0, 1.0, 0.5])
    points = torch.arange(40, dtype=torch.float32).view(4, 10)
    port = RetinaFaceDetector(tiny["retinaface"], "cpu", threshold=0.97, progress=False)
    facexlib = RetinaFaceDetector(tiny["retinaface"], "cpu", threshold=0.97, progress=False, nms_offset=0.0,
                                  top_k=(None, None), facexlib_order=True)
    expected = np.argsort(scores[:3].numpy())[::-1]
    assert [f.x0 for f in facexlib._select(boxes, scores, points)] == [float(boxes[k, 0]) for k in expected]
    assert [f.x0 for f in port._select(boxes, scores, points)] == [0.0, 20.0, 40.0]


def test_face_mix_without_adaface_weights_says_what_to_pass(dataset, tiny, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    layout = tmp_path / "outputs/m/base/en/20260101_000000/01"
    _noise(layout / "shot_01.png", 1)
    base = ["eval", "--suite", "vistorybench", "--dataset", str(dataset), str(layout.parent), "--vistory-metrics",
            "cids", "--grounding-dino", tiny["gdino"], "--cids-clip", tiny["clip"], "--arcface", tiny["arcface"],
            "--face-detector", tiny["retinaface"], "--facenet", tiny["facenet"], "--device", "cpu", "-q"]
    assert cli.main(base) == 1           # ArcFace's default detector, SCRFD, is not in the cache either
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("cids: skipped"))
    assert "antelopev2/scrfd_10g_bnkps.onnx" in line and "--arcface-detector" in line and "retinaface" in line
    base += ["--arcface-detector", "retinaface"]
    assert cli.main(base) == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("cids: skipped"))
    assert "adaface/adaface_ir101_webface12m.ckpt" in line and "--adaface none" in line
    # left out of the mix: CIDS runs with ArcFace and FaceNet
    assert cli.main([*base, "--adaface", "none", "--report-dir", str(tmp_path / "r")]) == 0
    from characonsist.evaluate.adaface import AdaFace

    with pytest.raises(vm.ModelUnavailable, match=r"no such AdaFace checkpoint; pass 'adaface' \(downloads "):
        AdaFace(str(tmp_path / "missing.ckpt"), "cpu")
