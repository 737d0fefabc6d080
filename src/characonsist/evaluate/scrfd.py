"""SCRFD, the face detector of insightface 0.7.3's ``FaceAnalysis(name="antelopev2")``, as ViStoryBench's ArcFace
runs it (docs/EVAL.md, "The face mix (realistic humans)").

Its ``SCRFD.detect`` on a BGR crop, with ``prepare(det_size=(640, 640))``:

* **Letterbox**: the crop resized keeping its aspect into the 640x640 input (the long side to 640, the other
  ``int()`` of the scaled length), with ``cv2.resize``'s default bilinear arithmetic (``cv_resize``), pasted at the
  top left of a black canvas; ``det_scale`` = new height / old height.
* **Input**: ``cv2.dnn.blobFromImage(swapRB=True)``: RGB, (x - 127.5) / 128, NCHW float32.
* **Decoding**, per stride 8, 16, 32 (a 9-output model: scores, boxes, 5 keypoints per stride, two anchors per
  cell): anchor centres (x, y) * stride in row-major order, each repeated for the two anchors; scores >= the
  threshold; box = centre -/+ (left, top, right, bottom) * stride, keypoint = centre + (dx, dy) * stride; all
  divided by ``det_scale``; float32 throughout.
* **Order and NMS**: the candidates sorted by numpy's ``argsort()[::-1]`` on the scores; greedy NMS at IoU 0.4 with
  ``+ 1`` in the widths and heights (``ovr <= 0.4`` kept); ``max_num`` (0 in ``FaceAnalysis.get``) keeps the
  largest, most central boxes.

ViStoryBench's ``_get_arcface_features`` sets ``det_thresh`` to 0.45, 0.35, 0.25, 0.15 in turn and takes
``faces[0]`` of the first threshold that finds a face; its 5 points go to ``norm_crop`` (``norm_crop_matrix``:
scikit-image's float32 arithmetic) and glintr100 (``ScrfdArcFace``). The network does not depend on the threshold, so it runs once per crop here and only the
decoding is repeated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .checkpoints import resolve_checkpoint
from .face_mix import warp_affine
from .models import ArcFaceOnnx, onnx_session
from .unavailable import ModelUnavailable
from .vistory_metrics import ARCFACE_DST, face_thresholds

SCRFD_FILE = "ViStoryBench/VistoryBench_pretrain:insightface/models/antelopev2/scrfd_10g_bnkps.onnx"
DET_SIZE = (640, 640)                 # (width, height): FaceAnalysis.prepare's default det_size
INPUT_MEAN, INPUT_STD = 127.5, 128.0
NMS_THRESHOLD = 0.4
STRIDES = (8, 16, 32)
NUM_ANCHORS = 2
COEF = 2048                           # OpenCV's INTER_RESIZE_COEF_SCALE (11 bits)


# ------------------------------------------------------------------------------------------ cv2.resize, bilinear

def _taps(n_in: int, n_out: int, clamp_weights: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and fixed-point weights of OpenCV's bilinear ``resize`` along one axis: ``f = float32((d +
    0.5) * scale - 0.5)`` with ``scale = 1 / (n_out / n_in)`` in double, ``s = floor(f)``, weights ``rint((1 - f) *
    2048)`` and ``rint(f * 2048)`` in float32. Columns (``clamp_weights``) past an edge take that edge pixel with
    weight 2048; rows keep their weights and clamp the row index."""
    scale = 1.0 / (n_out / n_in)
    f = ((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        low, high = s < 0, s >= n_in - 1
        f[low | high] = 0
        s[low] = 0
        s[high] = n_in - 1
    w0 = np.rint((np.float32(1) - f) * np.float32(COEF)).astype(np.int64)
    w1 = np.rint(f * np.float32(COEF)).astype(np.int64)
    return np.clip(s, 0, n_in - 1), np.clip(s + 1, 0, n_in - 1), w0, w1


def cv_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``cv2.resize(image, size)`` (default ``INTER_LINEAR``) of an HxWxC uint8 image with OpenCV 4.9's 8-bit
    arithmetic: a horizontal pass in integers (weights in 1/2048), then per output byte ``((((r0 >> 4) * b0) >>
    16) + (((r1 >> 4) * b1) >> 16) + 2) >> 2``; the same size is a copy, an exact halving of both sides is
    ``INTER_AREA``'s 2x2 mean (``(a + b + c + d + 2) >> 2``), as OpenCV switches to it. ``size`` is (width,
    height)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"cv_resize takes an HxWxC uint8 image, not {image.dtype} {image.shape}")
    h_in, w_in = image.shape[:2]
    w_out, h_out = int(size[0]), int(size[1])
    if w_out <= 0 or h_out <= 0:
        raise ValueError(f"cv_resize: the target size must be positive, got {w_out}x{h_out}")
    if (w_out, h_out) == (w_in, h_in):
        return image.copy()
    src = image.astype(np.int64)
    if 1.0 / (w_out / w_in) == 2.0 and 1.0 / (h_out / h_in) == 2.0:
        blocks = src[0::2, 0::2] + src[0::2, 1::2] + src[1::2, 0::2] + src[1::2, 1::2]
        return ((blocks + 2) >> 2).astype(np.uint8)
    x0, x1, a0, a1 = _taps(w_in, w_out, clamp_weights=True)
    rows = src[:, x0] * a0[None, :, None] + src[:, x1] * a1[None, :, None]       # int, up to 255 * 2048
    y0, y1, b0, b1 = _taps(h_in, h_out, clamp_weights=False)
    r0, r1 = rows[y0] >> 4, rows[y1] >> 4
    out = (((r0 * b0[:, None, None]) >> 16) + ((r1 * b1[:, None, None]) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def letterbox(image: np.ndarray, det_size: tuple[int, int] = DET_SIZE) -> tuple[np.ndarray, float] | None:
    """The detector's input canvas (``det_size`` = (width, height), the image resized keeping its aspect at the top
    left, black elsewhere) and ``det_scale``, as ``SCRFD.detect``; None when a side would shrink to 0 pixels (their
    ``cv2.resize`` stops with an error there; here the crop has no face)."""
    height, width = image.shape[:2]
    im_ratio = float(height) / width
    model_ratio = float(det_size[1]) / det_size[0]
    if im_ratio > model_ratio:
        new_height = det_size[1]
        new_width = int(new_height / im_ratio)
    else:
        new_width = det_size[0]
        new_height = int(new_width * im_ratio)
    if new_width <= 0 or new_height <= 0:
        return None
    det_scale = float(new_height) / height
    canvas = np.zeros((det_size[1], det_size[0], image.shape[2]), dtype=np.uint8)
    canvas[:new_height, :new_width] = cv_resize(image, (new_width, new_height))
    return canvas, det_scale


def blob(canvas_rgb: np.ndarray) -> np.ndarray:
    """``blobFromImage(canvas_bgr, 1 / 128, mean 127.5, swapRB=True)`` of the canvas (given here in RGB)."""
    x = (canvas_rgb.astype(np.float32) - np.float32(INPUT_MEAN)) * np.float32(1.0 / INPUT_STD)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


# ------------------------------------------------------------------------------------------------------ decoding

def anchor_centres(height: int, width: int, stride: int, num_anchors: int = NUM_ANCHORS) -> np.ndarray:
    """(height * width * num_anchors, 2) float32 (x, y) * stride, row by row, each cell repeated per anchor."""
    centres = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32)
    centres = (centres * stride).reshape(-1, 2)
    if num_anchors > 1:
        centres = np.stack([centres] * num_anchors, axis=1).reshape(-1, 2)
    return centres


def decode(outputs: list[np.ndarray], input_hw: tuple[int, int], threshold: float, strides=STRIDES,
           num_anchors: int = NUM_ANCHORS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores (n, 1), boxes (n, 4) and keypoints (n, 5, 2) in input pixels of the anchors whose score is >=
    ``threshold``, stride by stride (``SCRFD.forward``). ``outputs``: the network's 9 arrays (scores, boxes,
    keypoints per stride, with or without a leading batch axis of 1)."""
    fmc = len(strides)
    scores_list, boxes_list, kps_list = [], [], []
    for idx, stride in enumerate(strides):
        scores, box_d, kps_d = (np.asarray(outputs[idx + fmc * j]) for j in range(3))
        if scores.ndim == 3:
            scores, box_d, kps_d = scores[0], box_d[0], kps_d[0]
        box_d, kps_d = box_d * stride, kps_d * stride
        centres = anchor_centres(input_hw[0] // stride, input_hw[1] // stride, stride, num_anchors)
        pos = np.where(scores >= threshold)[0]
        boxes = np.stack([centres[:, 0] - box_d[:, 0], centres[:, 1] - box_d[:, 1],
                          centres[:, 0] + box_d[:, 2], centres[:, 1] + box_d[:, 3]], axis=-1)
        points = np.stack([centres[:, k % 2] + kps_d[:, k] for k in range(kps_d.shape[1])], axis=-1)
        scores_list.append(scores[pos])
        boxes_list.append(boxes[pos])
        kps_list.append(points.reshape(points.shape[0], -1, 2)[pos])
    return np.vstack(scores_list), np.vstack(boxes_list), np.vstack(kps_list)


def nms(dets: np.ndarray, threshold: float = NMS_THRESHOLD) -> list[int]:
    """Greedy NMS over (x0, y0, x1, y1, score) rows: widths and heights ``+ 1``, a box is dropped when its overlap
    with a kept one is > ``threshold``; the order is numpy's ``argsort()[::-1]`` of the scores."""
    x1, y1, x2, y2, scores = (dets[:, k] for k in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(overlap <= threshold)[0] + 1]
    return keep


def select(outputs: list[np.ndarray], det_scale: float, threshold: float, image_hw: tuple[int, int],
           input_hw: tuple[int, int] = (DET_SIZE[1], DET_SIZE[0]), max_num: int = 0,
           nms_threshold: float = NMS_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """``SCRFD.detect`` after the network: (faces, 5) float32 rows (x0, y0, x1, y1, score) in image pixels and
    (faces, 5, 2) keypoints, ordered as insightface returns them (``faces[0]`` first)."""
    scores, boxes, kps = decode(outputs, input_hw, threshold)
    order = scores.ravel().argsort()[::-1]
    pre_det = np.hstack((boxes / det_scale, scores)).astype(np.float32, copy=False)[order, :]
    kps = (kps / det_scale)[order]
    keep = nms(pre_det, nms_threshold)
    det, kps = pre_det[keep, :], kps[keep]
    if max_num > 0 and det.shape[0] > max_num:
        area = (det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1])
        cy, cx = image_hw[0] // 2, image_hw[1] // 2
        offsets = np.vstack([(det[:, 0] + det[:, 2]) / 2 - cx, (det[:, 1] + det[:, 3]) / 2 - cy])
        values = area - np.sum(np.power(offsets, 2.0), 0) * 2.0
        best = np.argsort(values)[::-1][:max_num]
        det, kps = det[best, :], kps[best]
    return det, kps


# -------------------------------------------------------------------------------------------------- norm_crop

def norm_crop_matrix(landmarks) -> np.ndarray:
    """insightface's ``estimate_norm``: the 2x3 similarity taking the 5 landmarks onto ArcFace's 112x112 template,
    computed as scikit-image's ``SimilarityTransform.estimate`` computes it (Umeyama 1991, eqs. 38-43) from
    float32 points (SCRFD's keypoints and insightface's float32 template): means, centred points, the covariance
    and its SVD in float32, the rotation, scale and shift in float64; the scale's ``1.0 / variance`` in float64, as
    numpy < 2 (ViStoryBench's pin) promotes a Python float over a float32 scalar."""
    src = np.asarray(landmarks, np.float32).reshape(-1, 2)
    dst = ARCFACE_DST.astype(np.float32)
    n = src.shape[0]
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n
    signs = np.ones(2, dtype=np.float64)
    if np.linalg.det(cov) < 0:
        signs[1] = -1
    out = np.eye(3, dtype=np.float64)
    u, sv, vt = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    if rank == 0:
        return np.full((2, 3), np.nan)
    if rank == 1 and np.linalg.det(u) * np.linalg.det(vt) > 0:
        out[:2, :2] = u @ vt
    elif rank == 1:
        out[:2, :2] = u @ np.diag([signs[0], -1.0]) @ vt
    else:
        out[:2, :2] = u @ np.diag(signs) @ vt
    scale = 1.0 / float(src_c.var(axis=0).sum()) * (sv @ signs)
    out[:2, 2] = dst_mean - scale * (out[:2, :2] @ src_mean.T)
    out[:2, :2] *= scale
    return out[:2]


def norm_crop(image, landmarks, size: int = 112):
    """insightface's ``norm_crop``: ``cv2.warpAffine(img, estimate_norm(landmarks), (112, 112), borderValue=0)``
    (bilinear, black outside) with OpenCV's warp arithmetic (``face_mix.warp_affine``); a PIL image in and out."""
    if size != 112:
        raise ValueError(f"norm_crop: ArcFace's template is for 112 px faces, not {size}")
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    return Image.fromarray(warp_affine(rgb, norm_crop_matrix(landmarks), (size, size), border=(0, 0, 0)))


# ------------------------------------------------------------------------------------------------------- the model

@dataclass
class ScrfdFace:
    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray          # (5, 2) float32: eyes, nose tip, mouth corners in image pixels
    threshold: float               # the det_thresh that found it


class Scrfd:
    """An SCRFD ONNX model (antelopev2's ``scrfd_10g_bnkps.onnx``: 9 outputs, strides 8/16/32, two anchors, 5
    keypoints) run by onnxruntime on the 640x640 letterboxed crop. ``source``: a local .onnx file, an http(s) URL
    or ``owner/repo:file`` on the hub (default: the benchmark's copy)."""

    def __init__(self, source: str = SCRFD_FILE, device: str = "auto", progress: bool = True):
        try:
            self.file = resolve_checkpoint(str(source), aliases={}, what="SCRFD face detector (antelopev2 "
                                           "scrfd_10g_bnkps.onnx)", flag="--arcface-detector",
                                           expected="scrfd_10g_bnkps.onnx", progress=progress)
        except ModelUnavailable as e:
            raise ModelUnavailable(f"{e} (--arcface-detector: a local scrfd_10g_bnkps.onnx, or retinaface for this "
                                   "project's RetinaFace)") from None
        self.session = onnx_session(self.file, device, "SCRFD face detector")
        inp = self.session.get_inputs()[0]
        outputs = self.session.get_outputs()
        if len(inp.shape) != 4 or len(outputs) != 3 * len(STRIDES):
            raise ModelUnavailable(f"{self.file}: not an SCRFD model with keypoints (expected one NCHW input and "
                                   f"9 outputs: scores, boxes, keypoints per stride 8/16/32; found input "
                                   f"{inp.shape}, {len(outputs)} outputs)")
        static = [d for d in inp.shape[2:4] if isinstance(d, int)]
        # a fixed input size wins over det_size, as SCRFD.prepare keeps it
        self.det_size = (int(inp.shape[3]), int(inp.shape[2])) if len(static) == 2 else DET_SIZE
        self.input_name = inp.name
        self.output_names = [o.name for o in outputs]
        self.label = f"SCRFD {self.file.name}"

    def describe(self) -> str:
        w, h = self.det_size
        return (f"{self.label} (onnxruntime): the crop resized keeping its aspect into {w}x{h} (OpenCV's bilinear "
                f"arithmetic), black elsewhere, RGB (x - {INPUT_MEAN}) / {INPUT_STD}; strides 8/16/32, two anchors; "
                f"NMS IoU {NMS_THRESHOLD} (+1 areas); first face")

    def run(self, rgb: np.ndarray) -> tuple[list[np.ndarray], float] | None:
        """The network's outputs on an HxWx3 uint8 RGB image and its ``det_scale`` (None for a degenerate crop)."""
        boxed = letterbox(rgb, self.det_size)
        if boxed is None:
            return None
        canvas, det_scale = boxed
        outs = self.session.run(self.output_names, {self.input_name: blob(canvas)})
        for k, out in enumerate(outs):
            stride, width = STRIDES[k % len(STRIDES)], (1, 4, 10)[k // len(STRIDES)]
            anchors = (self.det_size[1] // stride) * (self.det_size[0] // stride) * NUM_ANCHORS
            if np.asarray(out).shape[-2:] != (anchors, width):
                raise ModelUnavailable(f"{self.file}: output {k} ({self.output_names[k]}) has shape "
                                       f"{np.asarray(out).shape}, not ({anchors}, {width}) (stride {stride}, "
                                       f"{NUM_ANCHORS} anchors per cell, {self.det_size} input): not an SCRFD model "
                                       "of antelopev2's layout")
        return outs, det_scale

    def detect(self, image, threshold: float, max_num: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``SCRFD.detect`` at ``threshold`` on a PIL image: (faces, 5) rows and (faces, 5, 2) keypoints."""
        rgb = np.asarray(image.convert("RGB"))
        ran = self.run(rgb)
        if ran is None:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        outs, det_scale = ran
        return select(outs, det_scale, threshold, rgb.shape[:2], (self.det_size[1], self.det_size[0]), max_num)

    def first_face(self, image, thresholds) -> ScrfdFace | None:
        """``faces[0]`` of the first threshold in ``thresholds`` that finds a face (ViStoryBench's stepping), or
        None; the network runs once."""
        rgb = np.asarray(image.convert("RGB"))
        ran = self.run(rgb)
        if ran is None:
            return None
        outs, det_scale = ran
        for t in thresholds:
            det, kps = select(outs, det_scale, t, rgb.shape[:2], (self.det_size[1], self.det_size[0]))
            if len(det):
                return ScrfdFace(tuple(float(v) for v in det[0, :4]), float(det[0, 4]), kps[0], t)
        return None


class ScrfdArcFace:
    """ViStoryBench's ArcFace share (``_get_arcface_features``): SCRFD's first face at det_thresh 0.45, 0.35, 0.25,
    0.15 in turn, ``norm_crop`` with its 5 points (112x112, black border) and glintr100. Same interface as
    ``vistory_metrics.FaceEncoder`` (``describe``, ``embed``)."""

    def __init__(self, arcface: str, detector: str = SCRFD_FILE, device: str = "auto", progress: bool = True):
        self.embedder = ArcFaceOnnx(str(resolve_checkpoint(str(arcface), aliases={}, what="ArcFace ONNX (antelopev2 "
                                                           "glintr100.onnx)", flag="--arcface",
                                                           expected="glintr100.onnx", progress=progress)), device)
        self.detector = Scrfd(detector, device, progress)

    def describe(self) -> str:
        return (f"faces: {self.detector.describe()}, det_thresh {[round(t, 2) for t in face_thresholds()]} tried in "
                f"turn; norm_crop: 5-point similarity onto ArcFace's 112x112 template; {self.embedder.label}, "
                "(x - 127.5) / 127.5, unit length")

    def embed(self, images) -> tuple[np.ndarray | None, list[int]]:
        faces, valid = [], []
        for k, image in enumerate(images):
            face = self.detector.first_face(image, face_thresholds())
            if face is not None:
                faces.append(norm_crop(image, face.landmarks))
                valid.append(k)
        if not faces:
            return None, []
        return self.embedder.embed(faces), valid
