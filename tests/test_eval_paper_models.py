"""The CharaConsist paper's own eval models: SAM foreground masks prompted with an OWLv2 box of the character,
and FaceNet (facenet-pytorch's VGGFace2 Inception-ResNet-v1) face embeddings, both the defaults of
``characonsist eval``. Tiny random models saved and loaded by the real loaders; known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from characonsist import cli
from characonsist.evaluate import EvalConfig, ModelBank, ModelUnavailable, evaluate_run, read_run
from characonsist.evaluate import facenet as FN
from characonsist.evaluate import metrics as M
from characonsist.evaluate import segment as S
from characonsist.evaluate.models import ClipModel, ClipSegSegmenter, Owlv2Detector, fill_colour
from characonsist.evaluate.tiny import save_tiny_facenet
from test_eval import config, noise, pair_values, write_run  # the eval tests' run writer and helpers


@pytest.fixture(scope="module")
def tiny(tiny_eval_models):
    return tiny_eval_models


@pytest.fixture(scope="module")
def sam(tiny):
    return S.load_segmenter(tiny["segmenter"], "cpu", 0.4, lambda: Owlv2Detector(tiny["face_detector"], "cpu"), 0.0)


def scored(tiny, seeds=range(40)) -> list[tuple[float, int]]:
    """(best OWLv2 score for "a robot", seed) of noise images, highest first."""
    detector = Owlv2Detector(tiny["face_detector"], "cpu")
    detector.best_boxes([noise(s) for s in seeds], ["a robot"] * len(seeds), 0.0)
    return sorted(zip(detector.last_scores, seeds, strict=True), reverse=True)


# ------------------------------------------------------------------------------------------ SAM

def test_sam_mask_is_the_best_of_three_for_the_character_box(tiny, sam):
    assert isinstance(sam, S.SamSegmenter) and S.segmenter_kind(tiny["segmenter"]) == "sam"
    images = [noise(1), noise(2)]
    masks, notes = sam.segment(images, ["a robot", "a cat"])
    assert notes == [None, None]
    boxes = sam.detector.best_boxes(images, ["a robot", "a cat"], 0.0)
    for image, box, mask in zip(images, boxes, masks, strict=True):
        assert mask.shape == (image.height, image.width) and mask.dtype == bool
        # by hand: SAM's three masks for this box, the one with the highest predicted IoU
        batch = sam.processor(images=[image], input_boxes=[[list(box[:4])]], return_tensors="pt")
        with torch.inference_mode():
            out = sam.model(pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"], multimask_output=True)
        three = sam.processor.post_process_masks(out.pred_masks, batch["original_sizes"], batch["reshaped_input_sizes"],
                                                 binarize=False)[0][0] > 0
        assert three.shape[0] == 3
        best = int(out.iou_scores[0, 0].argmax())
        assert (mask == three[best].numpy()).all()
        assert any(not (mask == three[k].numpy()).all() for k in range(3) if k != best)  # the choice matters
    # the box reaches SAM: another box, another mask
    other = sam._sam([images[0]], [(0.0, 0.0, 64.0, 64.0)])[0]
    assert not (other == masks[0]).all()
    assert "SamModel" in sam.describe() and "Owlv2ForObjectDetection" in sam.describe()
    assert "highest predicted IoU" in sam.describe() and "character text" in sam.describe()


def test_segmenter_option_picks_sam_or_clipseg(tiny, monkeypatch):
    assert S.segmenter_kind("sam") == "sam" and S.segmenter_kind("CLIPSeg") == "clipseg"
    assert S.ALIASES["sam"] == "facebook/sam-vit-huge" and EvalConfig().segmenter == "sam"
    seg = S.load_segmenter(tiny["clipseg"], "cpu", 0.4, lambda: pytest.fail("CLIPSeg needs no box"), 0.1)
    assert isinstance(seg, ClipSegSegmenter)
    monkeypatch.setitem(S.ALIASES, "clipseg", tiny["clipseg"])
    assert isinstance(S.load_segmenter("clipseg", "cpu", 0.4, lambda: None, 0.1), ClipSegSegmenter)
    with pytest.raises(ModelUnavailable, match=r"'clip' model; expected a SAM"):
        S.segmenter_kind(tiny["clip"])
    bank = ModelBank(config(tiny, box_detector=None))
    with pytest.raises(ModelUnavailable, match="no box detector"):
        bank.get("segmenter")


def test_clipseg_through_eval_and_a_missing_segmenter_skips_only_the_masked_metrics(tmp_path, tiny):
    run = read_run(write_run(tmp_path, [[{"image": noise(80)}, {"image": noise(81)}]]))
    cfg = config(tiny, metrics=("clip_t", "clip_i", "clip_i_fg"), segmenter=tiny["clipseg"])
    result = evaluate_run(run, cfg, ModelBank(cfg))
    assert result["metrics"]["clip_i_fg"]["preprocessing"].count("CLIPSegForImageSegmentation") == 1
    cfg = config(tiny, metrics=("clip_t", "clip_i", "clip_i_fg", "clip_i_bg"), segmenter=str(tmp_path / "nowhere"))
    result = evaluate_run(run, cfg, ModelBank(cfg))
    status = {k: m["status"] for k, m in result["metrics"].items()}
    assert status == {"clip_t": "ok", "clip_i": "ok", "clip_i_fg": "skipped", "clip_i_bg": "skipped"}
    assert "nowhere" in result["metrics"]["clip_i_fg"]["reason"]


def test_no_box_is_a_note_and_the_image_left_out(tmp_path, tiny):
    ranked = scored(tiny)
    (high, a), (_, b), (low, c) = ranked[0], ranked[1], ranked[-1]
    assert low < high
    threshold = (low + min(high, ranked[1][0])) / 2
    run = read_run(write_run(tmp_path, [[{"image": noise(a)}, {"image": noise(b)}, {"image": noise(c)}]]))
    cfg = config(tiny, metrics=("clip_i", "clip_i_fg", "clip_i_bg"), box_threshold=threshold)
    result = evaluate_run(run, cfg, ModelBank(cfg))
    images = result["groups"][0]["images"]
    assert [im["mask_source"] for im in images] == ["model", "model", None]
    fg = pair_values(result, "clip_i_fg")
    assert fg[0] is not None and fg[1] is None and None not in pair_values(result, "clip_i")
    assert result["overall"]["clip_i_fg"]["n"] == 1
    note = [n for n in result["notes"] if "frame_02.png: no box for 'a robot'" in n]
    assert len(note) == 1 and f"< {threshold}" in note[0] and "left out of CLIP-I-fg/bg" in note[0]
    assert "no box: no mask" in result["metrics"]["clip_i_fg"]["preprocessing"]


def test_sam_masks_remove_the_background_as_expected(tmp_path, tiny):
    """CLIP-I-fg/bg with SAM's masks equal the CLIP cosine of the images masked by hand with those masks."""
    images = [noise(50), noise(51), noise(50)]
    run = read_run(write_run(tmp_path, [[{"image": im} for im in images]]))
    cfg = config(tiny, metrics=("clip_i", "clip_i_fg", "clip_i_bg"))
    bank = ModelBank(cfg)
    result = evaluate_run(run, cfg, bank)
    masks, notes = bank.get("segmenter").segment(images, ["a robot"] * 3)
    assert notes == [None] * 3 and all(0 < m.sum() < m.size for m in masks)
    clip: ClipModel = bank.get("clip")
    for key, keep in (("clip_i_fg", "fg"), ("clip_i_bg", "bg")):
        emb = clip.embed_images([M.mask_out(im, m, keep, fill_colour()) for im, m in zip(images, masks, strict=True)])
        expected = [M.cosine(emb[0], emb[1]), M.cosine(emb[0], emb[2])]
        assert pair_values(result, key) == pytest.approx(expected, abs=1e-6)
        assert pair_values(result, key)[1] == pytest.approx(1.0, abs=1e-6)   # the identity itself
    assert pair_values(result, "clip_i_fg")[0] != pytest.approx(pair_values(result, "clip_i")[0], abs=1e-4)
    assert {im["mask_source"] for im in result["groups"][0]["images"]} == {"model"}
    assert "SamModel" in result["metrics"]["clip_i_fg"]["preprocessing"]


# ------------------------------------------------------------------------------------------ FaceNet

def test_facenet_network_has_facenet_pytorchs_layout():
    """The published network: widths, repeats (5, 10, 5), 512-d; 23,482,624 parameters and 714 state-dict entries
    as facenet-pytorch 2.6.0's InceptionResnetV1(classify=False) (bench/facenet_reference.py prints both)."""
    net = FN.InceptionResnetV1()
    state = net.state_dict()
    assert FN.shape_of(state) == {"divisor": 1, "depths": (5, 10, 5), "dim": 512}
    assert sum(p.numel() for p in net.parameters()) == 23_482_624 and len(state) == 714
    for key, shape in (("conv2d_1a.conv.weight", (32, 3, 3, 3)), ("repeat_1.4.branch2.2.bn.running_var", (32,)),
                       ("mixed_6a.branch1.2.conv.weight", (256, 192, 3, 3)), ("repeat_2.9.conv2d.bias", (896,)),
                       ("mixed_7a.branch2.0.conv.weight", (256, 896, 1, 1)), ("block8.conv2d.weight", (1792, 384, 1, 1)),
                       ("last_linear.weight", (512, 1792)), ("last_bn.running_mean", (512,))):
        assert tuple(state[key].shape) == shape, key


def test_facenet_embeds_faces_from_a_saved_checkpoint(tiny, tmp_path):
    face = FN.FaceNet(tiny["face_model"], "cpu")
    a, b = noise(60), noise(61)
    box = (8.0, 6.0, 50.0, 58.0)
    emb = face.embed([face.crop(a, box), face.crop(a.copy(), box), face.crop(b, box)])
    assert emb.shape == (3, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1.0)
    assert M.cosine(emb[0], emb[1]) == pytest.approx(1.0, abs=1e-6) and M.cosine(emb[0], emb[2]) < 0.9999
    assert face.crop(a, box).size == (160, 160)
    assert "(x - 127.5) / 128" in face.describe() and "variant" in face.label
    # facenet-pytorch's standardisation: 255 -> 127.5 / 128, 0 -> -127.5 / 128
    white = face.tensor([noise(0).point(lambda _: 255)])
    assert white.shape == (1, 3, 160, 160) and torch.all(white == 127.5 / 128)
    # the published file carries the classifier (logits.*): ignored
    state = torch.load(tiny["face_model"], weights_only=True)
    state["logits.weight"], state["logits.bias"] = torch.randn(10, 32), torch.zeros(10)
    torch.save(state, tmp_path / "with_logits.pt")
    again = FN.FaceNet(str(tmp_path / "with_logits.pt"), "cpu")
    assert np.allclose(again.embed([face.crop(a, box)]), emb[:1], atol=1e-6)


def test_facenet_bad_files_say_what_is_wrong(tiny, tmp_path):
    state = torch.load(tiny["face_model"], weights_only=True)
    del state["last_bn.weight"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(ModelUnavailable, match=r"missing\.pt: .*missing last_bn\.weight"):
        FN.FaceNet(str(tmp_path / "missing.pt"), "cpu")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ModelUnavailable, match=r"list\.pt: holds a list"):
        FN.FaceNet(str(tmp_path / "list.pt"), "cpu")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelUnavailable, match=r"junk\.pt: cannot read a FaceNet checkpoint"):
        FN.FaceNet(str(tmp_path / "junk.pt"), "cpu")
    with pytest.raises(ModelUnavailable, match="no such FaceNet checkpoint"):
        FN.FaceNet(str(tmp_path / "nowhere.pt"), "cpu")


def test_facenet_default_is_downloaded_once_into_the_cache(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    calls = []

    def offline(url, dst, progress=True, **kw):
        calls.append((url, dst, progress))
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    target = tmp_path / "torch" / "hub" / "checkpoints" / FN.FACENET_FILE
    with pytest.raises(ModelUnavailable, match="cannot download the FaceNet weights") as error:
        FN.FaceNet("facenet", "cpu")
    assert FN.FACENET_URL in str(error.value) and str(target) in str(error.value)
    assert calls == [(FN.FACENET_URL, str(target), True)] and not target.exists()

    def download(url, dst, progress=True, **kw):
        calls.append((url, dst, progress))
        save_tiny_facenet(dst, seed=3)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    first = FN.FaceNet("facenet", "cpu")
    assert first.file == target and len(calls) == 2
    FN.FaceNet("facenet-vggface2", "cpu")     # cached: no second download
    assert len(calls) == 2
    # facenet-pytorch's own cache (TORCH_HOME/checkpoints) is used when the file is there
    target.unlink()
    legacy = tmp_path / "torch" / "checkpoints" / FN.FACENET_FILE
    save_tiny_facenet(legacy, seed=3)
    assert FN.FaceNet("facenet", "cpu").file == legacy and len(calls) == 2
    assert FN.is_facenet_source("facenet") and FN.is_facenet_source("x/y.pt") and not FN.is_facenet_source("a.onnx")


# ------------------------------------------------------------------------------------------ defaults end to end

def test_eval_picks_sam_and_facenet_by_default(tmp_path, tiny, monkeypatch):
    monkeypatch.setitem(S.ALIASES, "sam", tiny["segmenter"])          # what `sam` loads, offline
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))          # what `facenet` loads, offline
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    save_tiny_facenet(tmp_path / "torch" / "hub" / "checkpoints" / FN.FACENET_FILE)
    run = write_run(tmp_path / "run", [[{"image": noise(70)}, {"image": noise(71)}, {"image": noise(70)}]])
    args = ["eval", str(run), "--clip", tiny["clip"], "--dinov2", "none", "--dreamsim", "none",
            "--face-detector", tiny["face_detector"], "--box-detector", tiny["face_detector"], "--face-threshold", "0",
            "--box-threshold", "0", "--device", "cpu", "--quiet"]
    assert cli.main(args) == 0
    result = json.loads((run / "eval" / "eval.json").read_text())
    assert result["config"]["segmenter"] == "sam" and result["config"]["face_model"] == "facenet"
    for key in ("clip_i_fg", "clip_i_bg"):
        assert result["metrics"][key]["status"] == "ok"
        assert result["metrics"][key]["mask_sources"] == ["model"]
        assert f"SamModel {tiny['segmenter']}" in result["metrics"][key]["preprocessing"]
    ids = result["metrics"]["id_sim"]
    assert ids["status"] == "ok" and "FaceNet InceptionResnetV1" in ids["model"] and FN.FACENET_FILE in ids["model"]
    assert "(x - 127.5) / 128" in ids["preprocessing"]
    assert pair_values(result, "id_sim")[1] == pytest.approx(1.0, abs=1e-6)
    page = (run / "eval" / "eval.html").read_text()
    assert "SamModel" in page and "FaceNet InceptionResnetV1" in page


def test_quiet_reaches_the_face_model_download(tiny, tmp_path, monkeypatch):
    """``eval --quiet``: the bank loads FaceNet without a download bar (``ModelBank(progress=False)``)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    bars = []

    def download(url, dst, progress=True, **kw):
        bars.append(progress)
        save_tiny_facenet(dst, seed=3)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    for progress in (False, True):
        (tmp_path / "torch" / "hub" / "checkpoints" / FN.FACENET_FILE).unlink(missing_ok=True)
        ModelBank(config(tiny, face_model="facenet"), progress=progress).get("face_model")
    assert bars == [False, True]
