"""``characonsist eval``: every metric on tiny random models saved and loaded like real ones, known answers,
the run-folder reader, the report files, the CLI end to end on a toy-model run, and ``--compare``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from characonsist import cli
from characonsist.evaluate import EvalConfig, ModelBank, ModelUnavailable, evaluate_run, read_run
from characonsist.evaluate import metrics as M
from characonsist.evaluate.models import ArcFaceOnnx, ClipModel, ClipSegSegmenter, Dinov2, Owlv2FaceDetector
from characonsist.evaluate.runfolder import RunError, method_mask
from characonsist.output import json_bytes, mask_visual, png_bytes

SIZE = 64


@pytest.fixture(scope="module")
def tiny(tiny_eval_models):
    return tiny_eval_models


@pytest.fixture(scope="module")
def bank(tiny):
    return ModelBank(config(tiny))


def config(tiny, **kw) -> EvalConfig:
    base = dict(clip=tiny["clip"], dinov2=tiny["dinov2"], segmenter=tiny["segmenter"],
                box_detector=tiny["face_detector"], face_detector=tiny["face_detector"], face_model=tiny["face_model"],
                dreamsim=None, device="cpu", face_threshold=0.0, box_threshold=0.0)
    return EvalConfig(**{**base, **kw})


def noise(seed: int, size: int = SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def save_png(path: Path, image: Image.Image, text: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image, text))


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json_bytes(data))


def write_run(folder: Path, groups: list[list[dict]], method: str = "characonsist") -> Path:
    """A run folder in the CLI's layout: each image dict has ``image`` and optionally ``mask``, ``background``."""
    entries = []
    for g, images in enumerate(groups):
        name = f"group_{g:03d}"
        items = []
        for k, spec in enumerate(images):
            stem = "identity" if k == 0 else f"frame_{k:02d}"
            path = f"{name}/{stem}.png"
            save_png(folder / path, spec["image"], {"prompt": spec.get("prompt", "a robot")})
            if spec.get("mask") is not None:
                save_png(folder / name / "masks" / f"{stem}_mask.png", mask_visual(spec["image"], spec["mask"]))
            bg = spec.get("background", "a park")
            items.append({"path": path, "prompt": spec.get("prompt", f"{bg} a robot standing"), "background": bg,
                          "character": "a robot", "action": "standing", "seed": 1, "height": SIZE, "width": SIZE,
                          "caption": spec.get("caption"), "finished": True})
        entries.append({"name": name, "status": "done", "identity": items[0], "frames": items[1:], "masks": []})
    write_json(folder / "manifest.json", {"format": "characonsist-manifest/1", "stories": [],
                                          "settings": {"method": method, "model": "test"}, "groups": entries})
    return folder


def pair_values(result: dict, key: str, group: int = 0) -> list:
    return [p[key] for p in result["groups"][group]["pairs"]]


# ------------------------------------------------------------------------------------------ models and metrics

def test_every_model_loads_from_its_saved_folder_and_scores_identical_images_one(tiny):
    image = noise(1)
    clip = ClipModel(tiny["clip"], "cpu")
    a, b = clip.embed_images([image, image.copy()])
    assert M.cosine(a, b) == pytest.approx(1.0, abs=1e-6)
    t = clip.embed_texts(["a robot in the park", "a robot in the park", "a girl on a beach"])
    assert M.cosine(t[0], t[1]) == pytest.approx(1.0, abs=1e-6) and M.cosine(t[0], t[2]) < 0.9999
    assert "CLIPModel" in clip.describe()["model"] and "normalize" in clip.describe()["preprocessing"]
    dino = Dinov2(tiny["dinov2"], "cpu")
    d = dino.embed_images([image, image, noise(2)])
    assert M.cosine(d[0], d[1]) == pytest.approx(1.0, abs=1e-6) and M.cosine(d[0], d[2]) < 0.9999
    masks = ClipSegSegmenter(tiny["clipseg"], "cpu").masks([image, noise(3, 48)], ["a robot", "a cat"])
    assert masks[0].shape == (SIZE, SIZE) and masks[1].shape == (48, 48) and masks[0].dtype == bool
    boxes = Owlv2FaceDetector(tiny["face_detector"], "cpu", threshold=0.0).detect([image, image])
    assert boxes[0] == boxes[1]
    arc = ArcFaceOnnx(tiny["arcface"], "cpu")
    assert arc.size == (112, 112)
    e = arc.embed([image, image, noise(4)])
    assert e.shape == (3, 16) and M.cosine(e[0], e[1]) == pytest.approx(1.0, abs=1e-6)


def test_missing_onnxruntime_names_the_extra(tiny, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelUnavailable, match=r"characonsist\[eval\]"):
        ArcFaceOnnx(tiny["arcface"], "cpu")


def test_pairs_and_masking_functions():
    assert M.pairs(4, "identity") == [(0, 1), (0, 2), (0, 3)]
    assert M.pairs(3, "all") == [(0, 1), (0, 2), (1, 2)]
    assert M.same_scene("A  Park", "a park") and not M.same_scene("a park", "a beach")
    image, mask = noise(5), np.zeros((SIZE, SIZE), bool)
    mask[10:30, 20:40] = True
    fg = np.asarray(M.mask_out(image, mask, "fg", (1, 2, 3)))
    bg = np.asarray(M.mask_out(image, mask, "bg", (1, 2, 3)))
    assert (fg[~mask] == (1, 2, 3)).all() and (fg[mask] == np.asarray(image)[mask]).all()
    assert (bg[mask] == (1, 2, 3)).all() and (bg[~mask] == np.asarray(image)[~mask]).all()
    assert M.pair_similarity([np.ones(3), None, np.ones(3)], [(0, 1), (0, 2)], distance=True) == [None, 0.0]


def face_image(tiny) -> Image.Image:
    """A noise image in which the tiny detector finds a box (so ID sim has something to compare)."""
    detector = Owlv2FaceDetector(tiny["face_detector"], "cpu", threshold=0.0)
    for seed in range(50):
        if detector.detect([noise(100 + seed)])[0] is not None:
            return noise(100 + seed)
    pytest.fail("the tiny detector found no box in 50 images")


def test_identical_images_score_one_on_every_metric(tmp_path, tiny, bank):
    image = face_image(tiny)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[16:48, 16:48] = True
    run = read_run(write_run(tmp_path, [[{"image": image, "mask": mask}] * 4]))
    result = evaluate_run(run, bank.config, bank)
    for key in ("clip_i", "clip_i_fg", "clip_i_bg", "dinov2", "id_sim"):
        assert result["metrics"][key]["status"] == "ok", (key, result["metrics"][key])
        assert result["overall"][key]["mean"] == pytest.approx(1.0, abs=1e-6), key
        assert result["overall"][key]["n"] == 3
    assert result["metrics"]["dreamsim"]["status"] == "skipped"
    assert {im["mask_source"] for im in result["groups"][0]["images"]} == {"method"}


def test_clip_t_is_the_cosine_of_each_image_with_its_own_text(tmp_path, tiny, bank):
    images, texts = [noise(10), noise(11), noise(12)], ["a robot in the park", "a girl on a beach", "a dog at night"]
    run = read_run(write_run(tmp_path, [[{"image": im, "prompt": t} for im, t in zip(images, texts, strict=True)]]))
    got = [im["clip_t"] for im in evaluate_run(run, bank.config, bank)["groups"][0]["images"]]
    clip = bank.get("clip")
    expected = np.sum(clip.embed_images(images) * clip.embed_texts(texts), axis=1)
    assert got == pytest.approx(expected.tolist(), abs=1e-6)
    swapped = read_run(write_run(tmp_path / "swapped", [[{"image": im, "prompt": t}
                                                          for im, t in zip(images, texts[::-1], strict=True)]]))
    cross = np.sum(clip.embed_images(images) * clip.embed_texts(texts[::-1]), axis=1)
    got = [im["clip_t"] for im in evaluate_run(swapped, bank.config, bank)["groups"][0]["images"]]
    assert got == pytest.approx(cross.tolist(), abs=1e-6) and not np.allclose(cross, expected)


def test_permuted_frames_permute_the_scores_and_keep_the_means(tmp_path, tiny, bank):
    identity, frames = noise(20), [noise(21), noise(22), noise(23)]
    first = read_run(write_run(tmp_path / "a", [[{"image": identity}] + [{"image": f} for f in frames]]))
    order = [2, 0, 1]
    second = read_run(write_run(tmp_path / "b", [[{"image": identity}] + [{"image": frames[k]} for k in order]]))
    cfg = config(tiny, metrics=("clip_i", "dinov2", "id_sim"))
    a, b = evaluate_run(first, cfg, bank), evaluate_run(second, cfg, bank)
    for key in ("clip_i", "dinov2"):
        va, vb = pair_values(a, key), pair_values(b, key)
        assert vb == pytest.approx([va[k] for k in order], abs=1e-6)
        assert b["overall"][key]["mean"] == pytest.approx(a["overall"][key]["mean"], abs=1e-6)
        assert max(va) < 0.9999
    # a frame that is the identity scores 1, the others what they scored before
    third = read_run(write_run(tmp_path / "c", [[{"image": identity}, {"image": frames[0]}, {"image": identity}]]))
    c = evaluate_run(third, cfg, bank)
    assert pair_values(c, "clip_i") == pytest.approx([pair_values(a, "clip_i")[0], 1.0], abs=1e-6)
    # all pairs: any order of the whole group, identity included, gives the same mean
    cfg_all = config(tiny, metrics=("clip_i",), pairs="all")
    whole = [identity, *frames]
    d = evaluate_run(read_run(write_run(tmp_path / "d", [[{"image": im} for im in whole]])), cfg_all, bank)
    e = evaluate_run(read_run(write_run(tmp_path / "e", [[{"image": whole[k]} for k in (3, 1, 0, 2)]])), cfg_all, bank)
    assert d["overall"]["clip_i"]["n"] == 6
    assert e["overall"]["clip_i"]["mean"] == pytest.approx(d["overall"]["clip_i"]["mean"], abs=1e-6)


def test_a_mask_that_removes_the_background_changes_clip_i_as_expected(tmp_path, tiny, bank):
    character = np.asarray(noise(30, 24))
    mask = np.zeros((SIZE, SIZE), bool)
    mask[20:44, 20:44] = True
    pictures = []
    for seed in (31, 32):  # the same character pasted on two different backgrounds
        pixels = np.asarray(noise(seed)).copy()
        pixels[20:44, 20:44] = character
        pictures.append(Image.fromarray(pixels))
    cfg = config(tiny, metrics=("clip_i", "clip_i_fg", "clip_i_bg"))
    run = read_run(write_run(tmp_path / "fg", [[{"image": p, "mask": mask} for p in pictures]]))
    result = evaluate_run(run, cfg, bank)
    assert result["overall"]["clip_i"]["mean"] < 0.9999
    assert result["overall"]["clip_i_fg"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert result["overall"]["clip_i_bg"]["mean"] < 0.9999   # same background text, different backgrounds
    # two characters on one background: the background score is 1, the foreground one is not
    same_bg = []
    for seed in (33, 34):
        pixels = np.asarray(noise(35)).copy()
        pixels[20:44, 20:44] = np.asarray(noise(seed, 24))
        same_bg.append(Image.fromarray(pixels))
    run = read_run(write_run(tmp_path / "bg", [[{"image": p, "mask": mask} for p in same_bg]]))
    result = evaluate_run(run, cfg, bank)
    assert result["overall"]["clip_i_bg"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert result["overall"]["clip_i_fg"]["mean"] < 0.9999
    # another scene (background text): no background score
    run = read_run(write_run(tmp_path / "scene", [[{"image": same_bg[0], "mask": mask},
                                                   {"image": same_bg[1], "mask": mask, "background": "a beach"}]]))
    result = evaluate_run(run, cfg, bank)
    assert result["overall"]["clip_i_bg"]["mean"] is None and result["metrics"]["clip_i_bg"]["status"] == "n/a"
    assert "fixed-scene" in result["metrics"]["clip_i_bg"]["reason"]


def test_masks_come_from_the_run_else_the_segmenter(tmp_path, tiny, bank):
    mask = np.zeros((SIZE, SIZE), bool)
    mask[8:40, 8:40] = True
    folder = write_run(tmp_path, [[{"image": noise(40), "mask": mask}, {"image": noise(41)}]])
    run = read_run(folder)
    assert (method_mask(run, run.groups[0].images[0], (SIZE, SIZE)) == mask).all()
    assert method_mask(run, run.groups[0].images[1], (SIZE, SIZE)) is None
    result = evaluate_run(run, config(tiny, metrics=("clip_i_fg",)), bank)
    assert [im["mask_source"] for im in result["groups"][0]["images"]] == ["model", "model"]
    assert any("segmenter" in n for n in result["notes"])
    result = evaluate_run(run, config(tiny, metrics=("clip_i_fg",), masks="method"), bank)
    assert [im["mask_source"] for im in result["groups"][0]["images"]] == ["method", None]
    assert result["overall"]["clip_i_fg"]["mean"] is None


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(RunError, match="manifest.json"):
        read_run(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(RunError, match="not a characonsist manifest"):
        read_run(tmp_path)


# ------------------------------------------------------------------------------------------ CLI end to end

@pytest.mark.slow
def test_eval_end_to_end_on_a_toy_model_run(tmp_path, tiny, capsys):
    story = tmp_path / "story.txt"
    story.write_text("a sunny beach#a robot#big in the middle\na sunny beach#a robot#small on the left\n"
                     "a green forest#a robot#small on the right\n")
    run = tmp_path / "run"
    assert cli.main(["generate", str(story), "--model", "toy", "--out", str(run), "--steps", "2", "--save-masks",
                     "--quiet"]) == 0
    models = ["--clip", tiny["clip"], "--dinov2", tiny["dinov2"], "--segmenter", tiny["segmenter"],
              "--box-detector", tiny["face_detector"], "--box-threshold", "0", "--face-detector", tiny["face_detector"],
              "--face-model", tiny["face_model"], "--dreamsim-cache", tiny["dreamsim_cache"], "--device", "cpu", "--quiet"]
    assert cli.main(["eval", str(run), *models]) == 0
    out = capsys.readouterr().out
    assert "overall (mean of groups)" in out and "CLIP-T" in out and "DreamSim" in out and "skipped" not in out
    report = run / "eval"
    result = json.loads((report / "eval.json").read_text())
    assert result["run"]["method"] == "characonsist" and len(result["groups"][0]["images"]) == 3
    assert result["overall"]["clip_i"]["n"] == 2 and result["overall"]["clip_i_bg"]["n"] == 1  # one fixed-scene pair
    for key in ("clip_t", "clip_i", "dinov2", "dreamsim"):
        assert result["metrics"][key]["status"] == "ok" and result["metrics"][key]["model"]
    assert (report / "groups.csv").read_text().splitlines()[-1].split(",")[1] == "overall"
    assert len((report / "pairs.csv").read_text().splitlines()) == 3
    page = (report / "eval.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "http" not in page and "<script" not in page
    # rerun: its own files are replaced; a folder with someone else's eval.html is refused
    assert cli.main(["eval", str(run), *models]) == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "eval.html").write_text("mine")
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--report-dir", str(foreign), *models]) == 2
    assert "did not write" in capsys.readouterr().err and (foreign / "eval.html").read_text() == "mine"
    # compare: runs side by side with the paper's reference rows
    assert cli.main(["eval", "--compare", str(run), str(run), "--benchmark", "characonsist-fixed-bg",
                     "--report-dir", str(tmp_path / "cmp"), *models]) == 0
    out = capsys.readouterr().out
    assert "[paper] CharaConsist (FLUX.1-dev)" in out and "0.910" in out and sum(line.startswith("characonsist (run) ") for line in out.splitlines()) == 2
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["references"][2]["values"]["clip_t"] == 0.281
    assert cli.main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    off = ["--clip", "none", "--dinov2", "none", "--face-detector", "none", "--dreamsim", "none", "--quiet"]
    assert cli.main(["eval", str(run), "--report-dir", str(tmp_path / "off"), *off]) == 1
    assert "no metric could be computed" in capsys.readouterr().err


def test_eval_without_a_network_says_so_at_once_and_names_the_way_out(tmp_path, monkeypatch, capsys):
    """No network (the hub endpoint a closed local port): one line at once that the hub cannot be reached, the
    process switched to the cache only, and the usual 'no metric' error after it; no waiting on retries."""
    import socket
    import time

    from huggingface_hub import constants

    with socket.socket() as probe:   # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    run = write_run(tmp_path / "run", [[{"image": noise(1)}, {"image": noise(2)}]])
    start = time.perf_counter()
    code = cli.main(["eval", str(run), "--metrics", "clip_t,clip_i,dinov2", "--device", "cpu", "--quiet"])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 1 and f"the Hugging Face hub (http://127.0.0.1:{port}) cannot be reached" in err
    assert "HF_HUB_OFFLINE=1" in err and "--clip" in err and "--dinov2" in err
    assert err.index("cannot be reached") < err.index("no metric could be computed")
    assert constants.HF_HUB_OFFLINE is True and elapsed < 60


def test_eval_with_local_models_never_probes_the_hub(tmp_path, tiny, monkeypatch, capsys):
    from characonsist.evaluate import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: pytest.fail("probed the hub"))
    monkeypatch.setattr(hub, "offline_set", lambda: False)
    models = {k: tiny[k] for k in ("clip", "dinov2")}
    assert hub.offline_notice({**models, "segmenter": "none"}) is None
