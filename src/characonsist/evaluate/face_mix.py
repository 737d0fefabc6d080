"""ViStoryBench's face encoder for realistic humans (its ``face_mix``; docs/EVAL.md, "ViStoryBench"): ArcFace,
AdaFace and FaceNet embeddings of one face per crop, compared model by model and averaged.

As ``CIDSEvaluator`` (``bench/content/cids_evaluator.py``, ``config.yaml``: ``use_multi_face_encoder: true``,
``ensemble_method: average``) with facexlib 0.3.0's ``FaceRestoreHelper(upscale_factor=1, face_size=112,
crop_ratio=(1, 1), det_model='retinaface_resnet50')``:

* **ArcFace** finds its own face in the crop with insightface's SCRFD (``scrfd.ScrfdArcFace``; this project's
  RetinaFace instead with ``vistory_metrics.FaceEncoder``) at the stepped thresholds 0.45, 0.35, 0.25, 0.15, aligns
  it with ``norm_crop`` and embeds it.
* **AdaFace and FaceNet** share facexlib's face: RetinaFace ResNet-50 on the crop at its own size (BGR minus (104,
  117, 123)), faces with probability > 0.97 (``get_face_landmarks_5`` calls ``detect_faces(img, 0.97)``), NMS at
  IoU 0.4 as torchvision's ``nms``, the best face first (equal scores, as a saturated float32 probability of 1.0,
  in facexlib's order: numpy's ``argsort()[::-1]``, then torchvision's stable sort); its 5 landmarks mapped onto facexlib's FFHQ template
  scaled to 112 px by a similarity (``cv2.estimateAffinePartial2D``, LMEDS), and the crop warped to 112x112
  (``cv2.warpAffine``, bilinear, constant border (135, 133, 132) in BGR). Both are OpenCV's own steps written out
  here (``partial_affine``, ``warp_affine``; no OpenCV needed). AdaFace gets the face as its ``to_input`` (BGR, (x / 255 - 0.5) /
  0.5); FaceNet gets the face **as the benchmark feeds it**: BGR channel order, x / 255, 112x112 (not facenet-
  pytorch's 160x160 RGB (x - 127.5) / 128).
* A crop has features when at least one model found a face. Two crops' similarity is the mean, over the models
  that have a feature for both, of the cosines (0.0 when they share none): ``_compute_ensemble_similarity``,
  ``method="average"``. The weights in their ``config.yaml`` are read only by ``method="weighted"``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

FACEXLIB_THRESHOLD = 0.97
FACE_SIZE = 112
BORDER_BGR = (135, 133, 132)
# facexlib's FFHQ 5-point template for 512 px faces (eyes, nose tip, mouth corners), scaled to the face size
FFHQ_TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                          [201.26117, 371.41043], [313.08905, 371.15118]])
MODELS = ("arcface", "adaface", "facenet")


def face_template(size: int = FACE_SIZE) -> np.ndarray:
    return FFHQ_TEMPLATE * (size / 512.0)


def _cv_rng_subsets(count: int, iterations: int, points: int = 2) -> list[list[int]]:
    """The index subsets OpenCV's LMeDS draws (``getSubset``) from its generator seeded with all ones (``RNG((uint64)
    -1)``: multiply-with-carry, state = low32 * 4164903690 + high32, ``uniform(0, n)`` = low32 % n), distinct
    indices within a subset."""
    state = (1 << 64) - 1
    out = []
    for _ in range(iterations):
        idx: list[int] = []
        while len(idx) < points:
            state = ((state & 0xFFFFFFFF) * 4164903690 + (state >> 32)) & ((1 << 64) - 1)
            k = (state & 0xFFFFFFFF) % count
            if k not in idx:
                idx.append(k)
        out.append(idx)
    return out


def _two_point_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """OpenCV's ``AffinePartial2DEstimatorCallback::runKernel``: the similarity through two point pairs."""
    (x1, y1), (x2, y2) = src
    (X1, Y1), (X2, Y2) = dst   # noqa: N806
    d = 1.0 / ((x1 - x2) * (x1 - x2) + (y1 - y2) * (y1 - y2))
    s0 = d * ((X1 - X2) * (x1 - x2) + (Y1 - Y2) * (y1 - y2))
    s1 = d * ((Y1 - Y2) * (x1 - x2) - (X1 - X2) * (y1 - y2))
    s2 = d * ((Y1 - Y2) * (x1 * y2 - x2 * y1) - (X1 * y2 - X2 * y1) * (y1 - y2) - (X1 * x2 - X2 * x1) * (x1 - x2))
    s3 = d * (-(X1 - X2) * (x1 * y2 - x2 * y1) - (Y1 * x2 - Y2 * x1) * (x1 - x2) - (Y1 * y2 - Y2 * y1) * (y1 - y2))
    return np.array([[s0, -s1, s2], [s1, s0, s3]])


def _errors(m: np.ndarray, src32: np.ndarray, dst32: np.ndarray) -> np.ndarray:
    """``Affine2DEstimatorCallback::computeError``: squared residuals in float32, the model cast to float32."""
    f = m.astype(np.float32)
    a = f[0, 0] * src32[:, 0] + f[0, 1] * src32[:, 1] + f[0, 2] - dst32[:, 0]
    b = f[1, 0] * src32[:, 0] + f[1, 1] * src32[:, 1] + f[1, 2] - dst32[:, 1]
    return a * a + b * b


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, shift) taking ``src`` points closest to ``dst`` in least squares
    (Umeyama 1991, as skimage's ``SimilarityTransform.estimate`` that insightface's ``estimate_norm`` uses)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    fix = np.eye(2)
    if np.linalg.det(cov) < 0:
        fix[1, 1] = -1
    rot = u @ fix @ vt
    scale = (sig * np.diag(fix)).sum() / s0.var(0).sum()
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - m[:, :2] @ mu_s
    return m


def partial_affine(src, dst) -> tuple[np.ndarray, np.ndarray]:
    """``cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)`` (OpenCV 4.9, facexlib's call): the points as
    float32; 13 two-point similarities from OpenCV's fixed random subsets (``RANSACUpdateNumIters(0.99, 0.45, 2)``),
    the one with the least median squared error; inliers: squared error <= (2.5 * 1.4826 * (1 + 5 / (n - 2)) *
    sqrt(median))^2; then the least-squares similarity on the inliers (what OpenCV's Levenberg-Marquardt refinement
    converges to on this linear problem). Returns the 2x3 matrix and the inlier mask."""
    src32, dst32 = np.asarray(src, np.float32).reshape(-1, 2), np.asarray(dst, np.float32).reshape(-1, 2)
    n = len(src32)
    if n < 2 or len(dst32) != n:
        raise ValueError(f"partial_affine needs two or more point pairs, got {len(src32)} and {len(dst32)}")
    src64, dst64 = src32.astype(np.float64), dst32.astype(np.float64)
    if n == 2:
        return _two_point_similarity(src64, dst64), np.ones(2, bool)
    iterations = max(int(np.rint(np.log(0.01) / np.log(1.0 - (1.0 - 0.45) ** 2))), 3)
    best, best_median = None, np.inf
    for idx in _cv_rng_subsets(n, iterations):
        with np.errstate(divide="ignore", invalid="ignore"):
            m = _two_point_similarity(src64[idx], dst64[idx])
            err = _errors(m, src32, dst32)
        median = float(np.sort(err)[n // 2]) if np.isfinite(err).all() else np.nan
        if median < best_median:
            best, best_median = m, median
    if best is None:
        raise ValueError("partial_affine: no finite similarity through the points (coincident landmarks)")
    sigma = max(2.5 * 1.4826 * (1 + 5.0 / (n - 2)) * np.sqrt(best_median), 0.001)
    inliers = _errors(best, src32, dst32) <= np.float32(sigma * sigma)
    if inliers.sum() < 2:
        return best, inliers
    return similarity_transform(src64[inliers], dst64[inliers]), inliers


def warp_affine(src: np.ndarray, m: np.ndarray, size: tuple[int, int], border=BORDER_BGR) -> np.ndarray:
    """``cv2.warpAffine(src, m, size, flags=INTER_LINEAR, borderMode=BORDER_CONSTANT, borderValue=border)`` for a
    uint8 HxWxC image, with OpenCV's arithmetic: the inverse map in 1/1024 px fixed point, rounded to 1/32 px,
    bilinear weights in 1/32768, the sum rounded; a pixel whose four neighbours all lie outside gets ``border``,
    a partly outside one mixes in ``border`` for its outside neighbours."""
    src = np.asarray(src)
    if src.dtype != np.uint8 or src.ndim != 3:
        raise ValueError(f"warp_affine takes an HxWxC uint8 image, not {src.dtype} {src.shape}")
    h_in, w_in, channels = src.shape
    m = np.asarray(m, np.float64).reshape(2, 3)
    d = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    d = 1.0 / d if d != 0 else 0.0
    a11, a22, a12, a21 = m[1, 1] * d, m[0, 0] * d, -m[0, 1] * d, -m[1, 0] * d
    b1 = -a11 * m[0, 2] - a12 * m[1, 2]
    b2 = -a21 * m[0, 2] - a22 * m[1, 2]
    width, height = size
    ab_scale, shift, round_delta = 1024, 5, 16           # AB_BITS 10, INTER_BITS 5, AB_SCALE / INTER_TAB_SIZE / 2
    xs, ys = np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)
    adelta = np.rint(a11 * xs * ab_scale).astype(np.int64)
    bdelta = np.rint(a21 * xs * ab_scale).astype(np.int64)
    x0 = np.rint((a12 * ys + b1) * ab_scale).astype(np.int64) + round_delta
    y0 = np.rint((a22 * ys + b2) * ab_scale).astype(np.int64) + round_delta
    big_x = (x0[:, None] + adelta[None, :]) >> shift
    big_y = (y0[:, None] + bdelta[None, :]) >> shift
    sx, sy = big_x >> shift, big_y >> shift
    fx, fy = big_x & 31, big_y & 31
    weights = [(32 - fy) * (32 - fx), (32 - fy) * fx, fy * (32 - fx), fy * fx]     # x 32 = 1/32768 units
    cval = np.asarray(border, np.int64)[:channels]
    padded = np.empty((h_in + 2, w_in + 2, channels), np.int64)
    padded[:] = cval
    padded[1:-1, 1:-1] = src
    acc = np.zeros((height, width, channels), np.int64)
    for (dx, dy), w in zip(((0, 0), (1, 0), (0, 1), (1, 1)), weights, strict=True):
        px, py = sx + dx, sy + dy
        inside = (px >= 0) & (px < w_in) & (py >= 0) & (py < h_in)
        vals = padded[np.where(inside, py + 1, 0), np.where(inside, px + 1, 0)]     # (0, 0) of the pad: border
        acc += vals * (w * 32)[..., None]
    out = np.clip((acc + (1 << 14)) >> 15, 0, 255)
    outside = (sx >= w_in) | (sx + 1 < 0) | (sy >= h_in) | (sy + 1 < 0)
    out[outside] = cval
    return out.astype(np.uint8)


class FacexlibFaces:
    """facexlib's ``FaceRestoreHelper`` steps for one crop: detect (RetinaFace, > 0.97), align, warp to 112x112."""

    def __init__(self, detector: str = "retinaface", device: str = "auto", progress: bool = True):
        from .retinaface import NMS_THRESHOLD, RetinaFaceDetector

        self.detector = RetinaFaceDetector(detector, device, threshold=FACEXLIB_THRESHOLD, nms_threshold=NMS_THRESHOLD,
                                           progress=progress, nms_offset=0.0, top_k=(None, None),
                                           facexlib_order=True)

    def describe(self) -> str:
        return (f"facexlib FaceRestoreHelper steps: {self.detector.label}, the crop at its own size, face probability "
                f"> {FACEXLIB_THRESHOLD}, NMS IoU 0.4 (torchvision's), best face; 5 landmarks onto the FFHQ template "
                f"x {FACE_SIZE}/512 (least-squares similarity), warped {FACE_SIZE}x{FACE_SIZE} bilinear, border "
                f"{BORDER_BGR} (BGR)")

    def aligned(self, image) -> np.ndarray | None:
        """The best face of a PIL image as facexlib's ``cropped_faces[0]`` (112x112x3 uint8, **BGR**), or None."""
        found = self.detector.faces([image.convert("RGB")])[0]
        if not found:
            return None
        m, _ = partial_affine(np.asarray(found[0].landmarks, np.float32), face_template())
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        return warp_affine(bgr, m, (FACE_SIZE, FACE_SIZE))


def _unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(1, -1)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class FaceMixEncoder:
    """CIDS's ``face_mix`` encoder: per image a dict {model: (1, d) unit feature} of the models that found a face.
    ``arcface`` is a ``scrfd.ScrfdArcFace`` or ``vistory_metrics.FaceEncoder`` (or None), ``adaface`` an ``adaface.AdaFace``, ``facenet`` a
    ``facenet.FaceNet``, ``faces`` the ``FacexlibFaces`` AdaFace and FaceNet share; any of them may be None (left
    out of the mix, as their code does when a model fails to load)."""

    def __init__(self, arcface=None, adaface=None, facenet=None, faces: FacexlibFaces | None = None):
        if (adaface is not None or facenet is not None) and faces is None:
            raise ValueError("AdaFace and FaceNet need the facexlib face crops (faces=FacexlibFaces(...))")
        if arcface is None and adaface is None and facenet is None:
            raise ValueError("the face mix needs at least one of ArcFace, AdaFace, FaceNet")
        self.arcface, self.adaface, self.facenet, self.faces = arcface, adaface, facenet, faces

    def describe(self) -> str:
        parts = []
        if self.arcface is not None:
            parts.append(f"ArcFace: {self.arcface.describe()}")
        if self.faces is not None:
            parts.append(f"AdaFace/FaceNet faces: {self.faces.describe()}")
        if self.adaface is not None:
            parts.append(self.adaface.describe())
        if self.facenet is not None:
            parts.append(f"{self.facenet.label}: the aligned 112x112 face, BGR, x / 255; unit length")
        used = [n for n in MODELS if getattr(self, n) is not None]
        return (f"face mix of {', '.join(used)}: per pair the mean over the models with a face in both of the "
                f"cosines (0 when none). " + "; ".join(parts))

    def facenet_tensor(self, face_bgr: np.ndarray):
        """The benchmark's FaceNet input: the aligned face as it is (BGR), / 255, NCHW float32."""
        import torch

        return torch.from_numpy(face_bgr.astype(np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)

    def features(self, image) -> dict[str, np.ndarray]:
        import torch

        out: dict[str, np.ndarray] = {}
        if self.arcface is not None:
            feats, _ = self.arcface.embed([image])
            if feats is not None:
                out["arcface"] = _unit(feats[0])
        if self.faces is not None and (self.adaface is not None or self.facenet is not None):
            face = self.faces.aligned(image)
            if face is not None:
                if self.adaface is not None:
                    out["adaface"] = _unit(self.adaface.embed([Image.fromarray(face[:, :, ::-1].copy())])[0])
                if self.facenet is not None:
                    with torch.inference_mode():
                        f = self.facenet.net(self.facenet_tensor(face).to(self.facenet.device))
                    out["facenet"] = _unit(f.float().cpu().numpy()[0])
        return out

    def embed(self, images) -> tuple[list[dict[str, np.ndarray]] | None, list[int]]:
        feats, valid = [], []
        for k, image in enumerate(images):
            f = self.features(image)
            if f:
                feats.append(f)
                valid.append(k)
        return (feats, valid) if feats else (None, [])


def ensemble_similarity(a: dict, b: dict) -> float:
    """The mean over the models both have of their cosine (``_compute_ensemble_similarity``, ``average``)."""
    common = [n for n in MODELS if n in a and n in b]
    if not common:
        return 0.0
    return float(sum(float((a[n] @ b[n].T).item()) for n in common) / len(common))


def ensemble_matrix(rows: list[dict], cols: list[dict]) -> np.ndarray:
    return np.array([[ensemble_similarity(r, c) for c in cols] for r in rows], dtype=np.float64).reshape(
        len(rows), len(cols))
