"""insightface 0.7.3's SCRFD (the ArcFace detector of ViStoryBench's face mix) against this project's
``characonsist.evaluate.scrfd`` (docs/EVAL.md, "The face mix (realistic humans)").

Their code, run as it is: ``model_zoo/scrfd.py`` (``SCRFD``: ``prepare``, ``detect``, ``forward``, ``nms``) and
``utils/face_align.py`` (``norm_crop``) of the insightface 0.7.3 release, loaded by file path (the package does not
install here; these two modules only need numpy, onnx, onnxruntime, OpenCV and scikit-image), on tiny random
SCRFD-shaped ONNX models (``tiny.save_tiny_scrfd``: 9 outputs, strides 8/16/32, two anchors), both sides reading
the same file. Per picture and threshold: their ``detect(bgr, max_num=0)`` (as ``FaceAnalysis.get``) against
``Scrfd.detect``; ``max_num=3``; ViStoryBench's stepping (``_get_arcface_features``: det_thresh 0.45, then - 0.1
while >= 0.1, ``faces[0]``) with ``norm_crop`` against ``Scrfd.first_face`` + ``scrfd.norm_crop``; and
``estimate_norm`` / ``norm_crop`` alone on 3,000 landmark sets. Their pins are numpy < 2 and OpenCV 4.9.0.80: the
second command below runs under them (the models exported by the first, which runs with torch, numpy 2 and OpenCV
4.10).

    git -C INSIGHTFACE archive 668e8d47 python-package/insightface | tar -x -C /tmp/insightface-0.7.3  # v0.7.3
    PYTHONPATH=src:/tmp/faces-ref python bench/scrfd_reference.py --models /tmp/scrfd-models \
        --insightface /tmp/insightface-0.7.3/python-package/insightface       # OpenCV 4.10 next to numpy 2
    # the same under their pins (OpenCV 4.9.0.80, numpy 1.26, onnxruntime 1.22.0; scikit-image 0.24), no torch:
    # pip install --no-deps --target /tmp/np1 scikit-image==0.24.0 scipy==1.13.1 lazy_loader==0.4 packaging \
    #     pillow onnxruntime==1.22.0 onnx==1.16.2 protobuf==4.25.3 flatbuffers coloredlogs humanfriendly sympy mpmath
    PYTHONPATH=src:/tmp/faces-cv49:/tmp/np1 python3 bench/scrfd_reference.py --numpy1 --models /tmp/scrfd-models \
        --insightface /tmp/insightface-0.7.3/python-package/insightface      # models written by the first command
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np

# their requirements pin numpy < 2; under numpy 2 their estimate_norm takes scikit-image's 1.0 / (a float32
# variance) in float32 (NEP 50's scalar rule), which this project computes as numpy < 2 does
NUMPY2 = not np.__version__.startswith("1.")
NUMPY2_NOTE = (" (for information: under numpy 2 their scikit-image computes the scale's 1 / variance in float32, not "
               "as under their numpy < 2; the exact check is the numpy 1.26 run)")


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pictures(rng, sizes) -> list[np.ndarray]:
    """RGB uint8 pictures: noise, blurred noise (box filter), ramps with noise, one of each in turn."""
    out = []
    for k, (w, h) in enumerate(sizes):
        kind = k % 3
        if kind == 0:
            img = rng.integers(0, 256, (h, w, 3))
        elif kind == 1:
            img = rng.integers(0, 256, (h + 6, w + 6, 3)).astype(np.float64)
            img = sum(img[dy:dy + h, dx:dx + w] for dy in range(7) for dx in range(7)) / 49
        else:
            y, x = np.mgrid[:h, :w]
            img = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 256], -1)
            img = img + rng.normal(0, 20, img.shape)
        out.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return out


def check_resize(cv2, n: int = 400, seed: int = 0) -> bool:
    """``cv_resize`` and ``letterbox`` against ``cv2.resize`` (default bilinear) as ``SCRFD.detect`` calls it."""
    from characonsist.evaluate.scrfd import cv_resize, letterbox

    rng = np.random.default_rng(seed)
    sizes = [(int(rng.integers(8, 1500)), int(rng.integers(8, 1500))) for _ in range(n)]
    sizes += [(1280, 720), (720, 1280), (1280, 1280), (640, 480), (480, 640), (640, 640), (1024, 1024), (17, 640),
              (3000, 7), (320, 320), (2, 2), (1, 1)]
    bad_resize = bad_box = 0
    for img in pictures(rng, sizes):
        h, w = img.shape[:2]
        # SCRFD.detect's resize into 640x640
        im_ratio = float(h) / w
        new_w, new_h = (int(640 / im_ratio), 640) if im_ratio > 1.0 else (640, int(640 * im_ratio))
        if new_w == 0 or new_h == 0:
            continue
        theirs = cv2.resize(img, (new_w, new_h))
        bad_resize += bool((theirs != cv_resize(img, (new_w, new_h))).any())
        canvas = np.zeros((640, 640, 3), np.uint8)
        canvas[:new_h, :new_w] = theirs
        mine, scale = letterbox(img)
        bad_box += bool((canvas != mine).any()) or scale != float(new_h) / h
        # and a random other target size
        tw, th = int(rng.integers(1, 900)), int(rng.integers(1, 900))
        bad_resize += bool((cv2.resize(img, (tw, th)) != cv_resize(img, (tw, th))).any())
    print(f"cv2.resize: {2 * len(sizes)} resizes ({len(sizes)} into 640 px on the long side, as SCRFD, and as many "
          f"to random sizes 1..900 px); pictures differing {bad_resize}; letterboxed canvases or scales differing "
          f"{bad_box}")
    return bad_resize == 0 and bad_box == 0


def check_norm_crop(insightface: Path, n: int = 3000, seed: int = 0) -> bool:
    """``norm_crop_matrix`` / ``norm_crop`` against their ``face_align.estimate_norm`` / ``norm_crop`` on float32
    landmark sets: the template moved, turned and scaled with 3 and 25 px of noise, tight clusters (a few pixels
    across, as a random detector gives) and random points."""
    from PIL import Image

    from characonsist.evaluate.scrfd import norm_crop, norm_crop_matrix
    from characonsist.evaluate.vistory_metrics import ARCFACE_DST

    align_mod = load(insightface / "utils" / "face_align.py", "insightface_face_align")
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    pil = Image.fromarray(img)
    worst, pixels, kinds = 0.0, 0, {"template + 3 px": 0, "template + 25 px": 0, "clusters": 0, "random": 0}
    for k in range(n):
        kind = list(kinds)[k % 4]
        if kind.startswith("template"):
            angle, scale = rng.uniform(-0.6, 0.6), rng.uniform(0.5, 3.0)
            rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
            pts = ARCFACE_DST @ rot.T + rng.uniform(0, 250, 2) + rng.normal(0, 3 if "3 px" in kind else 25, (5, 2))
        elif kind == "clusters":
            pts = rng.uniform(20, 380, 2) + rng.normal(0, 1.5, (5, 2))
        else:
            pts = rng.uniform(0, 400, (5, 2))
        lmk = pts.astype(np.float32)
        theirs = align_mod.estimate_norm(lmk)
        mine = norm_crop_matrix(lmk)
        worst = max(worst, float(np.abs(theirs - mine).max()))
        if k % 10 == 0:
            warped = align_mod.norm_crop(img, lmk)
            if (warped != np.asarray(norm_crop(pil, lmk))).any():
                pixels += 1
        kinds[kind] += 1
    print(f"norm_crop: {n} float32 landmark sets ({kinds}); estimate_norm matrices max abs difference {worst:.1e}; "
          f"aligned 112x112 faces differing {pixels} of {(n + 9) // 10}{NUMPY2_NOTE if NUMPY2 else ''}")
    return NUMPY2 or (worst == 0 and pixels == 0)


def check_detector(cv2, insightface: Path, models_dir: Path | None = None, seed: int = 0) -> bool:
    from PIL import Image

    from characonsist.evaluate.scrfd import Scrfd, blob, norm_crop
    from characonsist.evaluate.vistory_metrics import face_thresholds

    scrfd_mod = load(insightface / "model_zoo" / "scrfd.py", "insightface_scrfd")
    align_mod = load(insightface / "utils" / "face_align.py", "insightface_face_align")
    rng = np.random.default_rng(seed)
    sizes = [(int(rng.integers(24, 1400)), int(rng.integers(24, 1400))) for _ in range(16)]
    sizes += [(1280, 720), (640, 640), (300, 900), (60, 40)]
    images = pictures(rng, sizes)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        models = {"many faces": dict(score_bias=-1.5), "few faces": dict(seed=3, score_bias=-4.0), "some faces": dict(seed=3, score_bias=-3.3),
                  "batched outputs": dict(batched=True, seed=1, score_bias=-1.5), "ties (scores in steps of 1/8)": dict(seed=2, score_bias=-2.0, score_levels=8)}
        for label, kw in models.items():
            file = Path(models_dir or tmp) / f"{label.split()[0]}.onnx"
            if not file.is_file():
                from characonsist.evaluate.tiny import save_tiny_scrfd

                save_tiny_scrfd(file, **kw)
            theirs = scrfd_mod.SCRFD(model_file=str(file))
            ours = Scrfd(str(file), "cpu", progress=False)
            counts = diff = kdiff = 0.0
            mismatch = blobs = aligned_px = 0
            steps: dict = {}
            for img in images:
                bgr = np.ascontiguousarray(img[:, :, ::-1])
                pil = Image.fromarray(img)
                for t in (*face_thresholds(), 0.6):
                    theirs.prepare(-1, input_size=(640, 640), det_thresh=t, nms_thresh=0.4)
                    for max_num in (0, 3):
                        det, kps = theirs.detect(bgr, max_num=max_num, metric="default")
                        mine, mkps = ours.detect(pil, t, max_num=max_num)
                        counts += len(det)
                        if det.shape != mine.shape:
                            mismatch += 1
                            continue
                        if len(det):
                            diff = max(diff, float(np.abs(det - mine).max()))
                            kdiff = max(kdiff, float(np.abs(kps - mkps).max()))
                # their blob against ours, on their canvas (the detect's own lines)
                im_ratio = float(img.shape[0]) / img.shape[1]
                nw, nh = (int(640 / im_ratio), 640) if im_ratio > 1 else (640, int(640 * im_ratio))
                det_img = np.zeros((640, 640, 3), np.uint8)
                det_img[:nh, :nw] = cv2.resize(bgr, (nw, nh))
                b = cv2.dnn.blobFromImage(det_img, 1.0 / 128, (640, 640), (127.5, 127.5, 127.5), swapRB=True)
                blobs += bool((b != blob(np.ascontiguousarray(det_img[:, :, ::-1]))).any())
                # ViStoryBench's stepping, then norm_crop
                curr, face_theirs = 0.45, None
                while curr >= 0.1:
                    theirs.prepare(-1, input_size=(640, 640), det_thresh=curr)
                    det, kps = theirs.detect(bgr, max_num=0, metric="default")
                    if len(det):
                        face_theirs = (curr, det[0], kps[0])
                        break
                    curr -= 0.1
                face_ours = ours.first_face(pil, face_thresholds())
                if (face_theirs is None) != (face_ours is None):
                    mismatch += 1
                    continue
                key = "none" if face_ours is None else f"{face_ours.threshold:.2f}"
                steps[key] = steps.get(key, 0) + 1
                if face_ours is not None:
                    if face_theirs[0] != face_ours.threshold or not np.array_equal(face_theirs[2], face_ours.landmarks):
                        mismatch += 1
                    warped = align_mod.norm_crop(bgr, face_theirs[2])
                    aligned_px += bool((warped[:, :, ::-1] != np.asarray(norm_crop(pil, face_ours.landmarks))).any())
            print(f"{label}: {len(images)} pictures x {len(face_thresholds()) + 1} thresholds x max_num 0/3: "
                  f"{int(counts)} faces from theirs; shape mismatches {mismatch}; boxes and scores max abs "
                  f"difference {diff:.1e}; keypoints {kdiff:.1e}; input blobs differing {blobs}; first face found at "
                  f"det_thresh {dict(sorted(steps.items()))}; norm_crop faces differing {aligned_px}"
                  f"{NUMPY2_NOTE if NUMPY2 else ''}")
            ok = ok and mismatch == 0 and diff == 0 and kdiff == 0 and blobs == 0 and (NUMPY2 or aligned_px == 0)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--insightface", type=Path, help="insightface 0.7.3's package folder (…/insightface)")
    parser.add_argument("--resize-only", action="store_true", help="only cv2.resize (needs numpy and cv2)")
    parser.add_argument("--models", type=Path, help="folder of the tiny SCRFD models: written there when missing "
                                                    "(needs torch), read when present (a numpy 1 run without torch)")
    parser.add_argument("--numpy1", action="store_true",
                        help="a run under their numpy < 2 without torch: the package __init__ skipped; the tiny "
                             "models read from --models DIR (written there by a run with torch)")
    args = parser.parse_args()
    import cv2

    if args.resize_only or args.numpy1:
        # scrfd.py's resize needs numpy alone: skip the package __init__ (torch, transformers, tqdm)
        import types

        import characonsist

        package = types.ModuleType("characonsist.evaluate")
        package.__path__ = [str(Path(characonsist.__file__).parent / "evaluate")]
        sys.modules["characonsist.evaluate"] = package

    print(f"cv2 {cv2.__version__}, numpy {np.__version__}")
    ok = check_resize(cv2)
    if not args.resize_only:
        if args.insightface is None:
            parser.error("--insightface is required (insightface 0.7.3's package folder), or --resize-only")
        import onnxruntime
        import skimage

        print(f"scikit-image {skimage.__version__}, onnxruntime {onnxruntime.__version__}; insightface "
              f"{args.insightface}")
        ok = check_norm_crop(args.insightface) and ok
        ok = check_detector(cv2, args.insightface, args.models) and ok
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
