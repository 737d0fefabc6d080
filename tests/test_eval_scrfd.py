"""insightface's SCRFD as ViStoryBench's ArcFace runs it (``evaluate/scrfd.py``; docs/EVAL.md, "The face mix"):
OpenCV's resize, the letterbox, the decoding, order and NMS, the threshold stepping, the loader on a tiny
SCRFD-shaped ONNX model exported to disk, and ArcFace's share of the face mix built on it. The comparison with
insightface's own code is ``bench/scrfd_reference.py`` (results in bench/results/scrfd-reference-2026-12-06/)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")

from characonsist.evaluate import scrfd  # noqa: E402
from characonsist.evaluate import vistory_metrics as vm  # noqa: E402
from characonsist.evaluate.unavailable import ModelUnavailable  # noqa: E402

# a 5x7 picture and cv2.resize's output (opencv-python-headless 4.9.0.80, the version ViStoryBench pins)
PICTURE = [[139, 74, 229, 241, 169, 65, 6], [160, 149, 106, 38, 175, 188, 205], [175, 229, 98, 249, 10, 148, 95],
           [86, 147, 198, 66, 39, 106, 213], [171, 45, 167, 57, 69, 81, 55]]
OPENCV_4x3 = [[128, 186, 171, 85], [195, 117, 40, 115], [119, 163, 59, 101]]
OPENCV_7x12 = [[139, 74, 229, 241, 169, 65, 6], [142, 83, 214, 216, 170, 80, 31], [150, 114, 162, 131, 172, 132, 114],
               [159, 146, 111, 46, 175, 183, 196], [166, 179, 103, 117, 113, 173, 164],
               [172, 212, 100, 205, 44, 156, 118], [156, 212, 119, 211, 16, 139, 119],
               [119, 178, 161, 135, 28, 122, 169], [89, 143, 197, 66, 40, 105, 206], [125, 100, 184, 62, 53, 94, 140],
               [160, 58, 171, 58, 65, 84, 75], [171, 45, 167, 57, 69, 81, 55]]
OPENCV_11x9_ROW4 = [175, 200, 217, 134, 153, 249, 97, 48, 135, 119, 95]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from characonsist.evaluate.tiny import save_tiny_arcface, save_tiny_scrfd

    folder = tmp_path_factory.mktemp("scrfd")
    return {"many": str(save_tiny_scrfd(folder / "many" / "scrfd_10g_bnkps.onnx")),
            "few": str(save_tiny_scrfd(folder / "few.onnx", seed=3, score_bias=-4.0)),
            "batched": str(save_tiny_scrfd(folder / "batched.onnx", batched=True)),
            "static": str(save_tiny_scrfd(folder / "static.onnx", size=320)),
            "arcface": str(save_tiny_arcface(folder / "arcface.onnx"))}


def _picture(seed: int, size=(200, 150)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------------ resize

def test_cv_resize_matches_recorded_opencv_output():
    img = np.array(PICTURE, np.uint8)[..., None]
    assert scrfd.cv_resize(img, (4, 3))[..., 0].tolist() == OPENCV_4x3
    assert scrfd.cv_resize(img, (7, 12))[..., 0].tolist() == OPENCV_7x12
    assert scrfd.cv_resize(img, (11, 9))[4, :, 0].tolist() == OPENCV_11x9_ROW4


def test_cv_resize_edges_halving_and_copies():
    ramp = np.array([[0, 200]], np.uint8)[..., None]
    # quarter-pixel taps, the left edge clamped to the first pixel, the right to the last
    assert scrfd.cv_resize(ramp, (4, 1))[0, :, 0].tolist() == [0, 50, 150, 200]
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    half = scrfd.cv_resize(img, (4, 3))                         # both sides exactly halved: INTER_AREA's mean
    blocks = img.astype(int).reshape(3, 2, 4, 2, 3).sum((1, 3))
    assert np.array_equal(half, (blocks + 2) >> 2)
    assert np.array_equal(scrfd.cv_resize(img, (8, 6)), img)
    flat = np.full((13, 9, 3), 255, np.uint8)
    assert (scrfd.cv_resize(flat, (31, 5)) == 255).all() and (scrfd.cv_resize(flat, (4, 40)) == 255).all()
    with pytest.raises(ValueError, match="uint8"):
        scrfd.cv_resize(img.astype(np.float32), (4, 3))


def test_letterbox_keeps_the_aspect_at_the_top_left():
    tall = np.full((300, 100, 3), 77, np.uint8)
    canvas, scale = scrfd.letterbox(tall)
    assert canvas.shape == (640, 640, 3) and scale == 640 / 300
    assert (canvas[:, :213] == 77).all() and (canvas[:, 213:] == 0).all()       # int(640 / 3) = 213 columns
    wide = np.full((100, 300, 3), 9, np.uint8)
    canvas, scale = scrfd.letterbox(wide)
    assert scale == 213 / 100 and (canvas[:213] == 9).all() and (canvas[213:] == 0).all()
    assert scrfd.letterbox(np.zeros((1, 1000, 3), np.uint8)) is None             # a side would be 0 px
    b = scrfd.blob(canvas)
    assert b.shape == (1, 3, 640, 640) and b.dtype == np.float32
    assert b[0, 0, 0, 0] == np.float32((9 - 127.5) / 128) and b[0, 0, -1, -1] == np.float32(-127.5 / 128)


# --------------------------------------------------------------------------------------------------- norm_crop

# insightface 0.7.3's face_align.estimate_norm on two float32 landmark sets (scikit-image 0.24, numpy 1.26)
CLUSTER = [[309.83298, 283.67459], [310.83853, 285.71497], [309.37259, 285.50467], [310.5593, 285.76532],
           [310.03333, 285.55695]]
FACE = [[101.5, 120.25], [160.75, 118.5], [131.0, 150.125], [108.25, 181.0], [155.5, 180.75]]
ESTIMATE_NORM = {"cluster": [[10.963277570075482, 7.73036844829831, -5549.021520620049],
                             [-7.73036844829831, 10.963277570075482, -657.9015263156969]],
                 "face": [[0.6363811795185736, -0.006244794175374621, -26.65682218515235],
                          [0.006244794175374621, 0.6363811795185736, -24.456510767633816]]}


def test_norm_crop_matrix_is_scikit_images_float32_estimate():
    from characonsist.evaluate.face_mix import similarity_transform

    for name, points in (("cluster", CLUSTER), ("face", FACE)):
        lmk = np.array(points, np.float32)
        assert scrfd.norm_crop_matrix(lmk).tolist() == ESTIMATE_NORM[name]
        # the same similarity in float64 lands elsewhere by more than rounding when the points are close together
        exact = similarity_transform(lmk.astype(np.float64), vm.ARCFACE_DST)
        assert np.allclose(exact, ESTIMATE_NORM[name], rtol=0, atol=1e-2)
    assert np.abs(similarity_transform(np.array(CLUSTER), vm.ARCFACE_DST) - ESTIMATE_NORM["cluster"]).max() > 1e-5
    # a bright spot on the nose landmark lands on the template's nose, black around (the border is black too)
    canvas = np.zeros((300, 400, 3), np.uint8)
    canvas[147:154, 128:135] = 255
    face = np.asarray(scrfd.norm_crop(Image.fromarray(canvas), np.array(FACE, np.float32)))
    assert face.shape == (112, 112, 3) and face[0, 0].tolist() == [0, 0, 0]
    ys, xs = np.nonzero(face[..., 0] > 128)
    assert abs(xs.mean() - vm.ARCFACE_DST[2, 0]) < 1.5 and abs(ys.mean() - vm.ARCFACE_DST[2, 1]) < 1.5


# ---------------------------------------------------------------------------------------------------- decoding

def _outputs(size: int = 64, batched: bool = False) -> list[np.ndarray]:
    """Zero scores everywhere, unit distances: a network's outputs for a size x size input."""
    out = []
    for width in (1, 4, 10):
        for stride in scrfd.STRIDES:
            n = (size // stride) ** 2 * 2
            arr = np.zeros((n, width), np.float32) if width == 1 else np.ones((n, width), np.float32)
            out.append(arr[None] if batched else arr)
    return out


def test_decoding_of_one_anchor_by_hand():
    outs = _outputs()
    row, col, anchor = 2, 3, 1                                   # stride 8, 8x8 cells, anchor 1 of cell (2, 3)
    k = (row * 8 + col) * 2 + anchor
    outs[0][k] = 0.8
    outs[3][k] = [1, 2, 3, 4]
    outs[6][k] = np.arange(10) / 2
    det, kps = scrfd.select(outs, 0.5, 0.45, (128, 128), (64, 64))
    cx, cy = col * 8, row * 8
    assert det.dtype == np.float32 and det.tolist() == [[(cx - 8) / 0.5, (cy - 16) / 0.5, (cx + 24) / 0.5,
                                                         (cy + 32) / 0.5, np.float32(0.8)]]
    expected = [[(cx + 8 * a) / 0.5, (cy + 8 * b) / 0.5] for a, b in np.arange(10).reshape(5, 2) / 2]
    assert kps.shape == (1, 5, 2) and kps[0].tolist() == expected
    batched = [o[None] for o in outs]
    det_b, kps_b = scrfd.select(batched, 0.5, 0.45, (128, 128), (64, 64))
    assert np.array_equal(det, det_b) and np.array_equal(kps, kps_b)
    assert scrfd.select(outs, 0.5, 0.81, (128, 128), (64, 64))[0].shape == (0, 5)     # below the threshold
    # the score is compared in float32, as numpy compares a float32 array with a Python float
    outs[0][k] = np.float32(0.45)
    assert len(scrfd.select(outs, 0.5, 0.45, (128, 128), (64, 64))[0]) == 1


def test_anchor_centres_row_major_two_per_cell():
    c = scrfd.anchor_centres(2, 3, 16)
    assert c.tolist() == [[0, 0], [0, 0], [16, 0], [16, 0], [32, 0], [32, 0],
                          [0, 16], [0, 16], [16, 16], [16, 16], [32, 16], [32, 16]]


def test_nms_counts_the_plus_one_pixel():
    a = [0, 0, 9, 9, 0.9]
    # overlap with +1 areas: 60 / 140 = 0.43 > 0.4, dropped (without the +1 it would be 45 / 117 = 0.38, kept)
    assert scrfd.nms(np.array([a, [4, 0, 13, 9, 0.8]], np.float32)) == [0]
    assert scrfd.nms(np.array([a, [6, 0, 15, 9, 0.8]], np.float32)) == [0, 1]      # 40 / 160 = 0.25, kept
    assert scrfd.nms(np.array([[4, 0, 13, 9, 0.5], a], np.float32)) == [1]          # highest score first


def test_order_of_equal_scores_is_numpys_argsort():
    outs = _outputs()
    far = [5, 40, 90]                                            # anchors far apart: no suppression
    for k in far:
        outs[0][k] = 0.7
    det, _ = scrfd.select(outs, 1.0, 0.5, (64, 64), (64, 64))
    centres = scrfd.anchor_centres(8, 8, 8)
    # two sorts, as SCRFD.detect: the candidates by ``argsort()[::-1]``, then NMS's own ``argsort()[::-1]`` of them
    scores = np.array([0.7, 0.7, 0.7], np.float32)
    first = scores.argsort()[::-1]
    order = first[scores[first].argsort()[::-1]]
    assert det[:, 0].tolist() == [float(centres[far[i], 0] - 8) for i in order]


def test_max_num_keeps_large_central_faces():
    outs = _outputs()
    for k, score in ((0, 0.9), (2 * (3 * 8 + 3), 0.6)):        # a corner box and a central one
        outs[0][k] = score
    outs[3][2 * (3 * 8 + 3)] = [2, 2, 2, 2]                     # the central one also larger
    det, kps = scrfd.select(outs, 1.0, 0.5, (64, 64), (64, 64), max_num=1)
    assert len(det) == 1 and det[0, 4] == np.float32(0.6) and kps.shape == (1, 5, 2)
    assert scrfd.select(outs, 1.0, 0.5, (64, 64), (64, 64))[0][0, 4] == np.float32(0.9)


# ------------------------------------------------------------------------------------------- the model on disk

def test_tiny_model_loads_through_the_loader(models):
    det = scrfd.Scrfd(models["many"], "cpu", progress=False)
    assert det.det_size == (640, 640) and len(det.output_names) == 9 and "scrfd_10g_bnkps.onnx" in det.label
    boxes, kps = det.detect(_picture(1), 0.45)
    assert len(boxes) > 1 and kps.shape == (len(boxes), 5, 2)
    assert (np.diff(boxes[:, 4]) <= 0).all()                                    # best first
    assert boxes[:, :4].max() < 300 and boxes[:, 4].min() >= np.float32(0.45)
    # the batched export gives the same faces as insightface reads it (first item of each output)
    batched = scrfd.Scrfd(models["batched"], "cpu", progress=False)
    b_boxes, b_kps = batched.detect(_picture(1), 0.45)
    assert np.array_equal(boxes, b_boxes) and np.array_equal(kps, b_kps)
    static = scrfd.Scrfd(models["static"], "cpu", progress=False)
    assert static.det_size == (320, 320) and "320x320" in static.describe()


def test_loader_errors_name_the_file_and_what_to_pass(models, tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(ModelUnavailable, match=r"no such SCRFD face detector .*--arcface-detector.*retinaface"):
        scrfd.Scrfd(str(tmp_path / "missing.onnx"), "cpu")
    with pytest.raises(ModelUnavailable, match=r"arcface.onnx: not an SCRFD model .* 1 outputs"):
        scrfd.Scrfd(models["arcface"], "cpu")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(ModelUnavailable, match=r"junk.onnx: not a loadable ONNX model"):
        scrfd.Scrfd(str(junk), "cpu")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailable, match=r"cannot download .*scrfd_10g_bnkps.onnx.*--arcface-detector"):
        scrfd.Scrfd(scrfd.SCRFD_FILE, "cpu")


def test_threshold_stepping_takes_the_first_threshold_with_a_face(models):
    det = scrfd.Scrfd(models["few"], "cpu", progress=False)
    found = {}
    for seed in range(8):
        image = _picture(seed, (160 + 20 * seed, 120))
        face = det.first_face(image, vm.face_thresholds())
        per_threshold = [det.detect(image, t) for t in vm.face_thresholds()]
        first = next((k for k, (b, _) in enumerate(per_threshold) if len(b)), None)
        if first is None:
            assert face is None
            continue
        boxes, kps = per_threshold[first]
        assert face.threshold == vm.face_thresholds()[first] and face.score == float(boxes[0, 4])
        assert np.array_equal(face.landmarks, kps[0]) and face.box == tuple(float(v) for v in boxes[0, :4])
        found[first] = found.get(first, 0) + 1
    assert len(found) >= 2 and 0 not in found               # the tiny model's best scores are 0.2-0.3 here
    assert det.first_face(Image.new("RGB", (1000, 1)), vm.face_thresholds()) is None


def test_scrfd_arcface_embeds_the_first_face_aligned(models):
    from characonsist.evaluate.models import ArcFaceOnnx

    enc = scrfd.ScrfdArcFace(models["arcface"], models["many"], "cpu", progress=False)
    images = [_picture(s) for s in range(3)] + [Image.new("RGB", (1000, 1))]
    feats, valid = enc.embed(images)
    assert valid == [0, 1, 2] and feats.shape == (3, 16)
    face = enc.detector.first_face(images[1], vm.face_thresholds())
    expected = ArcFaceOnnx(models["arcface"], "cpu").embed([scrfd.norm_crop(images[1], face.landmarks)])
    assert np.allclose(feats[1], expected[0], atol=1e-6)
    assert "det_thresh [0.45, 0.35, 0.25, 0.15]" in enc.describe() and "norm_crop" in enc.describe()
    assert enc.embed([Image.new("RGB", (1000, 1))]) == (None, [])


def test_face_mix_with_scrfd_arcface(models):
    from characonsist.evaluate.face_mix import FaceMixEncoder

    enc = FaceMixEncoder(scrfd.ScrfdArcFace(models["arcface"], models["many"], "cpu", progress=False))
    feats, valid = enc.embed([_picture(4), _picture(5)])
    assert valid == [0, 1] and all(set(f) == {"arcface"} for f in feats)
    assert "SCRFD scrfd_10g_bnkps.onnx" in enc.describe()
