"""RetinaFace, ID sim's default face detector (``characonsist.evaluate.retinaface``): the PyTorch port's network,
prior boxes, decoding and NMS, written here; tiny random checkpoints saved as the port saves them and loaded by the
real loader; brute-force and known-answer checks; ``eval`` end to end with RetinaFace picked by default."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from characonsist import cli
from characonsist.evaluate import EvalConfig, ModelBank, ModelUnavailable, evaluate_run, read_run
from characonsist.evaluate import facenet as FN
from characonsist.evaluate import retinaface as R
from characonsist.evaluate import segment as S
from characonsist.evaluate.models import Owlv2Detector, Owlv2FaceDetector
from characonsist.evaluate.tiny import save_tiny_facenet, save_tiny_retinaface
from test_eval import config, noise, pair_values, write_run


@pytest.fixture(scope="module")
def tiny(tiny_eval_models):
    return tiny_eval_models


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    """The published MobileNet-0.25 network at full size, random weights, saved without a ``module.`` prefix."""
    return save_tiny_retinaface(tmp_path_factory.mktemp("retinaface") / "mobilenet0.25_Final.pth", seed=1,
                                backbone="mobilenet0.25", prefix="")


def use_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch" / "hub" / "checkpoints"


# ------------------------------------------------------------------------------------------ network and loading

def test_network_has_the_ports_layout():
    """27,293,600 / 426,608 parameters and 456 / 300 state-dict entries: the port's RetinaFace(cfg_re50 / cfg_mnet)
    as built by biubug6/Pytorch_Retinaface with torchvision (bench/retinaface_reference.py prints both)."""
    for backbone, params, entries, shapes in (
            ("resnet50", 27_293_600, 456, {"body.conv1.weight": (64, 3, 7, 7), "body.layer4.2.conv3.weight": (2048, 512, 1, 1),
                                           "body.layer2.0.downsample.0.weight": (512, 256, 1, 1),
                                           "fpn.output3.0.weight": (256, 2048, 1, 1), "ssh2.conv3X3.0.weight": (128, 256, 3, 3),
                                           "ssh3.conv7x7_3.1.running_var": (64,), "ClassHead.2.conv1x1.weight": (4, 256, 1, 1),
                                           "BboxHead.0.conv1x1.bias": (8,), "LandmarkHead.1.conv1x1.weight": (20, 256, 1, 1)}),
            ("mobilenet0.25", 426_608, 300, {"body.stage1.0.0.weight": (8, 3, 3, 3), "body.stage1.1.0.weight": (8, 1, 3, 3),
                                             "body.stage3.1.3.weight": (256, 256, 1, 1), "fpn.merge1.0.weight": (64, 64, 3, 3),
                                             "ssh1.conv5X5_1.0.weight": (16, 64, 3, 3), "LandmarkHead.2.conv1x1.weight": (20, 64, 1, 1)})):
        net = R.RetinaFace(backbone)
        state = net.state_dict()
        assert sum(p.numel() for p in net.parameters()) == params and len(state) == entries
        for key, shape in shapes.items():
            assert tuple(state[key].shape) == shape, key
        assert R.shape_of(state)["backbone"] == backbone


def test_checkpoint_round_trip_and_the_module_prefix(tiny, mobilenet, tmp_path):
    """The saved network and the loaded one give the same head outputs; ``module.`` prefix and a ``state_dict``
    wrapper are accepted; the narrow variant is named as such."""
    image = noise(3, 72)
    raw = torch.load(tiny["retinaface"], weights_only=True)
    assert all(k.startswith("module.") for k in raw)
    plain = {k.removeprefix("module."): v for k, v in raw.items()}
    assert R.shape_of(plain) == {"backbone": "resnet50", "out_channels": 16, "width": 8, "layers": (1, 1, 1, 1),
                                 "anchors": 2}
    reference = R.RetinaFace("resnet50", 16, width=8, layers=(1, 1, 1, 1))
    reference.load_state_dict(plain)
    torch.save({"state_dict": plain}, tmp_path / "wrapped.pth")
    for source in (tiny["retinaface"], str(tmp_path / "wrapped.pth")):
        detector = R.RetinaFaceDetector(source, "cpu")
        loc, scores, landmarks, priors = detector.raw([image])
        with torch.inference_mode():
            want = reference.eval()(detector.tensor([image]))
        assert torch.equal(loc, want[0]) and torch.equal(landmarks, want[2])
        assert torch.allclose(scores, want[1].softmax(-1)[..., 1])
        assert "variant: width 8, blocks (1, 1, 1, 1), 16 channels" in detector.label
    full = R.RetinaFaceDetector(str(mobilenet), "cpu")
    assert full.net.backbone == "mobilenet0.25" and "variant" not in full.label
    assert "RetinaFace mobilenet0.25" in full.describe() and "> 0.8" in full.describe()


def test_bad_files_say_what_is_wrong(tiny, tmp_path):
    state = torch.load(tiny["retinaface"], weights_only=True)
    del state["module.ssh2.conv5X5_2.1.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ModelUnavailable, match=r"missing\.pth: .*missing ssh2\.conv5X5_2\.1\.weight"):
        R.RetinaFaceDetector(str(tmp_path / "missing.pth"), "cpu")
    torch.save({"fpn.output1.0.weight": torch.zeros(4, 2, 1, 1)}, tmp_path / "partial.pth")
    with pytest.raises(ModelUnavailable, match=r"partial\.pth: not a RetinaFace state dict"):
        R.RetinaFaceDetector(str(tmp_path / "partial.pth"), "cpu")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ModelUnavailable, match=r"list\.pth: holds a list"):
        R.RetinaFaceDetector(str(tmp_path / "list.pth"), "cpu")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelUnavailable, match=r"junk\.pth: cannot read a RetinaFace checkpoint"):
        R.RetinaFaceDetector(str(tmp_path / "junk.pth"), "cpu")
    with pytest.raises(ModelUnavailable, match="no such RetinaFace checkpoint.*'retinaface-mobilenet'"):
        R.RetinaFaceDetector(str(tmp_path / "nowhere.pth"), "cpu")


def test_default_weights_are_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    folder = use_cache(tmp_path, monkeypatch)
    calls = []

    def offline(url, dst, progress=True, **kw):
        calls.append((url, dst, progress))
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    target = folder / "detection_Resnet50_Final.pth"
    with pytest.raises(ModelUnavailable, match="cannot download the RetinaFace weights") as error:
        R.RetinaFaceDetector("retinaface", "cpu")
    assert R.RESNET50_URL in str(error.value) and str(target) in str(error.value)
    assert "--face-detector /path/to/detection_Resnet50_Final.pth" in str(error.value)
    assert calls == [(R.RESNET50_URL, str(target), True)] and not target.exists()

    def download(url, dst, progress=True, **kw):
        calls.append((url, dst, progress))
        save_tiny_retinaface(dst, seed=2, **({"backbone": "mobilenet0.25"} if "mobilenet" in url else {}))

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    assert R.RetinaFaceDetector("retinaface", "cpu").file == target and len(calls) == 2
    assert R.RetinaFaceDetector("RetinaFace-ResNet50", "cpu", progress=False).file == target and len(calls) == 2
    small = R.RetinaFaceDetector("retinaface-mobilenet", "cpu", progress=False)
    assert small.file == folder / "detection_mobilenet0.25_Final.pth" and small.net.backbone == "mobilenet0.25"
    assert calls[-1] == (R.MOBILENET_URL, str(small.file), False)
    assert R.is_retinaface_source("retinaface") and R.is_retinaface_source("x/Resnet50_Final.pth")
    assert not R.is_retinaface_source("google/owlv2-base-patch16-ensemble")


# ------------------------------------------------------------------------------------------ anchors, boxes, NMS

def test_prior_boxes_count_and_layout():
    h, w = 64, 96
    priors = R.prior_boxes(h, w)
    # levels of 8x12, 4x6 and 2x3 cells, 2 min sizes each
    assert priors.shape == (2 * (8 * 12 + 4 * 6 + 2 * 3), 4)
    expected = []
    for sizes, step in zip(R.MIN_SIZES, R.STEPS, strict=True):
        for y, x, s in itertools.product(range(-(-h // step)), range(-(-w // step)), sizes):
            expected.append(((x + 0.5) * step / w, (y + 0.5) * step / h, s / w, s / h))
    assert torch.allclose(priors, torch.tensor(expected), atol=1e-7)
    assert priors[0].tolist() == pytest.approx([4 / 96, 4 / 64, 16 / 96, 16 / 64])
    assert priors[1].tolist() == pytest.approx([4 / 96, 4 / 64, 32 / 96, 32 / 64])
    assert priors[2].tolist() == pytest.approx([12 / 96, 4 / 64, 16 / 96, 16 / 64])   # next cell to the right
    assert priors[-1].tolist() == pytest.approx([80 / 96, 48 / 64, 512 / 96, 512 / 64])
    # sizes that steps do not divide: ceil(H / step) cells, the same count the network's strided maps give
    net = R.RetinaFace("resnet50", 16, width=8, layers=(1, 1, 1, 1)).eval()
    for size in ((65, 97), (33, 40), (100, 31)):
        with torch.inference_mode():
            loc, logits, landmarks = net(torch.zeros(1, 3, *size))
        count = sum(2 * -(-size[0] // s) * -(-size[1] // s) for s in R.STEPS)
        assert loc.shape[1] == logits.shape[1] == landmarks.shape[1] == R.prior_boxes(*size).shape[0] == count


def test_decode_inverts_encode_and_zero_offsets_give_the_prior():
    gen = torch.Generator().manual_seed(0)
    priors = R.prior_boxes(80, 120)
    n = priors.shape[0]
    centre = torch.rand(n, 2, generator=gen)
    size = 0.02 + 0.5 * torch.rand(n, 2, generator=gen)
    boxes = torch.cat([centre - size / 2, centre + size / 2], 1)
    assert torch.allclose(R.decode_boxes(R.encode_boxes(boxes, priors), priors), boxes, atol=1e-5)
    points = torch.rand(n, 10, generator=gen)
    assert torch.allclose(R.decode_landmarks(R.encode_landmarks(points, priors), priors), points, atol=1e-5)
    loc = torch.randn(n, 4, generator=gen)
    assert torch.allclose(R.encode_boxes(R.decode_boxes(loc, priors), priors), loc, atol=1e-3)
    corners = torch.cat([priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2], 1)
    assert torch.allclose(R.decode_boxes(torch.zeros(n, 4), priors), corners)
    assert torch.allclose(R.decode_landmarks(torch.zeros(n, 10), priors), priors[:, :2].repeat(1, 5))
    # by hand: dx = 1 moves the centre by variance 0.1 x the prior's width; dw = 1 scales it by exp(0.2)
    one = R.decode_boxes(torch.tensor([[1.0, 0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.5, 0.2, 0.1]]))[0]
    wide = 0.2 * np.exp(0.2)
    assert one.tolist() == pytest.approx([0.52 - wide / 2, 0.45, 0.52 + wide / 2, 0.55], abs=1e-6)


def brute_force_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, offset: float) -> list[int]:
    """By the definition: go through the boxes best first; keep one unless it overlaps a kept box by IoU > t."""
    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + offset)
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + offset)
        area = lambda r: (r[2] - r[0] + offset) * (r[3] - r[1] + offset)  # noqa: E731
        return iw * ih / (area(a) + area(b) - iw * ih)

    kept: list[int] = []
    for k in sorted(range(len(scores)), key=lambda k: -scores[k]):
        if all(iou(boxes[k].tolist(), boxes[j].tolist()) <= threshold for j in kept):
            kept.append(k)
    return kept


def test_nms_equals_the_brute_force_definition():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(1, 60))
        xy = rng.uniform(0, 100, (n, 2))
        wh = rng.uniform(2, 40, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        scores = rng.permutation(n).astype(np.float32) / n      # distinct scores: one right answer
        for threshold, offset in ((0.4, 1.0), (0.4, 0.0), (0.1, 1.0), (0.7, 0.0)):
            got = R.nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold, offset).tolist()
            assert got == brute_force_nms(boxes.astype(np.float64), scores, threshold, offset), (trial, threshold)
    # by hand: two 10x10 boxes overlapping by half, IoU 50/150 = 1/3 (offset 0) or 55/165 = 1/3 (offset 1)
    pair = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0]])
    assert R.nms(pair, torch.tensor([0.9, 0.8]), 0.4, 0.0).tolist() == [0, 1]
    assert R.nms(pair, torch.tensor([0.8, 0.9]), 0.3, 0.0).tolist() == [1]
    assert R.nms(pair[:0], torch.zeros(0), 0.4).tolist() == []


# ------------------------------------------------------------------------------------------ detection

def test_preprocessing_is_the_ports_bgr_minus_mean(tiny):
    detector = R.RetinaFaceDetector(tiny["retinaface"], "cpu")
    red = Image.new("RGB", (8, 6), (255, 0, 0))
    x = detector.tensor([red, red.convert("RGBA")])
    assert x.shape == (2, 3, 6, 8)
    assert [float(x[0, c, 0, 0]) for c in range(3)] == [-104.0, -117.0, 255 - 123.0]   # B, G, R
    assert torch.equal(x[0], x[1])


def test_detect_gives_the_best_face_clipped_with_its_landmarks(tiny):
    detector = R.RetinaFaceDetector(tiny["retinaface"], "cpu", threshold=0.0)
    images = [noise(s) for s in range(6)] + [noise(9, 48)]
    faces = detector.faces(images)
    best = detector.detect(images)
    tops = list(detector.last_scores)
    for image, found, face, top in zip(images, faces, best, tops, strict=True):
        assert found and face is not None
        assert [f.score for f in found] == sorted((f.score for f in found), reverse=True)
        assert face.score == found[0].score == pytest.approx(top)
        assert face[:4] == pytest.approx((max(0, found[0].x0), max(0, found[0].y0), min(image.width, found[0].x1),
                                          min(image.height, found[0].y1)))
        assert len(face.landmarks) == 5 and face.landmarks == found[0].landmarks
    # one image alone gives what it gave in the batch (batching by size changes nothing)
    assert detector.detect([images[2]])[0][:5] == pytest.approx(best[2][:5], abs=1e-4)
    # by hand for one image: threshold (0 here), sort, NMS, decoded with the image size
    single = detector.faces([images[0]])[0]
    loc, scores, landmarks, priors = detector.raw([images[0]])
    boxes = R.decode_boxes(loc[0], priors) * torch.tensor([64.0, 64.0, 64.0, 64.0])
    keep = R.nms(boxes, scores[0], R.NMS_THRESHOLD)
    assert [f.score for f in single] == scores[0][keep].tolist()
    assert [list(f[:4]) for f in single] == boxes[keep].tolist()
    points = R.decode_landmarks(landmarks[0], priors)[keep[0]] * 64
    assert np.ravel(single[0].landmarks).tolist() == points.tolist()
    # a threshold above every score: no face
    detector.threshold = max(tops) + 1e-4
    assert detector.detect(images) == [None] * len(images)


def test_no_face_leaves_the_pairs_out_with_the_usual_reason(tmp_path, tiny):
    detector = R.RetinaFaceDetector(tiny["retinaface"], "cpu")
    seeds = range(20)
    detector.faces([noise(s) for s in seeds])
    ranked = sorted(zip(detector.last_scores, seeds, strict=True), reverse=True)
    (high, a), (second, b), (low, c) = ranked[0], ranked[1], ranked[-1]
    assert low < second
    threshold = (low + second) / 2
    run = read_run(write_run(tmp_path / "one", [[{"image": noise(a)}, {"image": noise(b)}, {"image": noise(c)}]]))
    cfg = config(tiny, metrics=("id_sim",), face_detector=tiny["retinaface"], face_threshold=threshold)
    result = evaluate_run(run, cfg, ModelBank(cfg))
    images = result["groups"][0]["images"]
    assert images[2]["face"] is None and "face_landmarks" not in images[2]
    assert images[0]["face"][4] == pytest.approx(high, abs=1e-4) and len(images[0]["face_landmarks"]) == 5
    values = pair_values(result, "id_sim")
    assert values[0] is not None and values[1] is None and result["overall"]["id_sim"]["n"] == 1
    assert "RetinaFace resnet50" in result["metrics"]["id_sim"]["model"]
    cfg = config(tiny, metrics=("id_sim",), face_detector=tiny["retinaface"], face_threshold=1.0)
    result = evaluate_run(run, cfg, ModelBank(cfg))
    assert result["metrics"]["id_sim"]["status"] == "n/a"
    assert result["metrics"]["id_sim"]["reason"] == "no pair of images where both have a detected face"


def test_face_threshold_none_means_each_detectors_own(tiny):
    bank = ModelBank(config(tiny, face_detector=tiny["retinaface"], face_threshold=None))
    assert bank.get("face_detector").threshold == R.THRESHOLD == 0.8
    bank = ModelBank(config(tiny, face_threshold=None))
    owl = bank.get("face_detector")
    assert isinstance(owl, Owlv2FaceDetector) and owl.threshold == 0.3
    assert bank.get("box_detector") is owl          # one OWLv2 when faces and boxes use the same model
    bank = ModelBank(config(tiny, face_detector=tiny["retinaface"], box_detector=tiny["retinaface"]))
    with pytest.raises(ModelUnavailable, match="OWLv2 detector"):
        bank.get("box_detector")                     # RetinaFace cannot give SAM a character box
    assert EvalConfig().face_detector == "retinaface" and EvalConfig().face_threshold is None


# ------------------------------------------------------------------------------------------ defaults end to end

def test_eval_picks_retinaface_by_default(tmp_path, tiny, monkeypatch):
    monkeypatch.setitem(S.ALIASES, "sam", tiny["segmenter"])
    folder = use_cache(tmp_path, monkeypatch)            # what `retinaface` and `facenet` load, offline
    save_tiny_facenet(folder / FN.FACENET_FILE)
    save_tiny_retinaface(folder / "detection_Resnet50_Final.pth")
    run = write_run(tmp_path / "run", [[{"image": noise(70)}, {"image": noise(71)}, {"image": noise(70)}]])
    args = ["eval", str(run), "--clip", tiny["clip"], "--dinov2", "none", "--dreamsim", "none",
            "--box-detector", tiny["face_detector"], "--box-threshold", "0", "--metrics", "clip_i,clip_i_fg,id_sim",
            "--device", "cpu", "--quiet"]
    assert cli.main(args) == 0
    result = json.loads((run / "eval" / "eval.json").read_text())
    assert result["config"]["face_detector"] == "retinaface" and result["config"]["face_threshold"] is None
    ids = result["metrics"]["id_sim"]
    assert ids["status"] == "ok", ids
    assert "detector: RetinaFace resnet50" in ids["model"] and "detection_Resnet50_Final.pth" in ids["model"]
    assert "BGR minus mean (104, 117, 123)" in ids["model"] and "FaceNet InceptionResnetV1" in ids["model"]
    assert pair_values(result, "id_sim")[1] == pytest.approx(1.0, abs=1e-6)
    faces = [im["face"] for im in result["groups"][0]["images"]]
    assert faces[0] == faces[2] and all(f[4] > 0.8 for f in faces)
    assert isinstance(ModelBank(EvalConfig(box_detector=tiny["face_detector"])).get("box_detector"), Owlv2Detector)
    assert "SamModel" in result["metrics"]["clip_i_fg"]["preprocessing"]


def test_quiet_reaches_the_detector_download(tiny, tmp_path, monkeypatch):
    folder = use_cache(tmp_path, monkeypatch)
    bars = []

    def download(url, dst, progress=True, **kw):
        bars.append(progress)
        save_tiny_retinaface(dst, seed=3)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    for progress in (False, True):
        (folder / "detection_Resnet50_Final.pth").unlink(missing_ok=True)
        ModelBank(config(tiny, face_detector="retinaface"), progress=progress).get("face_detector")
    assert bars == [False, True]
