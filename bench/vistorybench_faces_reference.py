"""ViStoryBench's face mix for realistic humans (AdaFace + FaceNet on facexlib's aligned faces, the per-model
average) against this project's ``face_mix`` / ``adaface`` (docs/EVAL.md, "ViStoryBench", "The face mix").

Their code, run as it is: ``CIDSEvaluator.get_char_feat(..., encoder_name="face_mix")``, ``_get_adaface_features``,
``_get_facenet_features`` and ``_compute_multimodel_similarity_matrix(method="average")`` from
``vistorybench/bench/content/cids_evaluator.py``; their ``InceptionResnetV1`` (``inception_resnet_v1.py``, loading
``<pretrain>/facenet/20180402-114759-vggface2.pt``); AdaFace's ``inference.load_pretrained_model('ir_101')`` and
``to_input`` (the AdaFace submodule, mk-minchul/AdaFace); facexlib 0.3.0's ``FaceRestoreHelper`` (its RetinaFace,
``detect_faces``, ``get_face_landmarks_5``, ``align_warp_face``) with OpenCV. Full-size networks with random weights
(batch-norm statistics measured on pictures, RetinaFace's heads rescaled so that some faces pass 0.97), saved in the
released files' layouts and loaded by both sides. ArcFace (insightface) is left out on both sides: it does not install
here (their code skips it when ``self.arcface`` is None).

Stubbed, because they do not install next to this torch: insightface and groundingdino (imported, unused here),
AdaFace's ``face_alignment`` (its import builds an MTCNN on ``cuda:0``; unused by ``load_pretrained_model`` /
``to_input``), and torchvision, which facexlib needs for three things: ``models.resnet50`` (this project's
``retinaface.ResNet``, torchvision's layout and key names), ``IntermediateLayerGetter`` (written out: the children in
order, the named outputs) and ``ops.nms`` (this project's ``retinaface.nms(offset=0)``, torchvision's rule). facexlib
is imported module by module (its package ``__init__`` pulls in trackers and matting models).

    git -C VSB_CHECKOUT ...  # vistorybench at 514cc31, with mk-minchul/AdaFace at c60eaa7 in bench/content/AdaFace
    pip install --no-deps --target /tmp/faces-ref facexlib==0.3.0 opencv-python-headless==4.10.0.84
    PYTHONPATH=src:/tmp/faces-ref python bench/vistorybench_faces_reference.py --repo VSB_CHECKOUT \
        --facexlib /tmp/faces-ref/facexlib
    # the alignment alone against the OpenCV their requirements pin (4.9.0.80, numpy < 2; no torch needed):
    PYTHONPATH=src:/tmp/cv49 python3 bench/vistorybench_faces_reference.py --repo VSB_CHECKOUT --alignment-only
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import types
from pathlib import Path

import numpy as np


def module(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def stub_modules(facexlib_dir: Path) -> None:
    import torch

    from characonsist.evaluate.retinaface import ResNet, nms

    class IntermediateLayerGetter(torch.nn.ModuleDict):
        def __init__(self, model, return_layers):
            layers, wanted = collections.OrderedDict(), dict(return_layers)
            for name, child in model.named_children():
                layers[name] = child
                wanted.pop(name, None)
                if not wanted:
                    break
            super().__init__(layers)
            self.return_layers = dict(return_layers)

        def forward(self, x):
            out = collections.OrderedDict()
            for name, child in self.items():
                x = child(x)
                if name in self.return_layers:
                    out[self.return_layers[name]] = x
            return out

    def tv_nms(boxes, scores, iou_threshold):
        return nms(boxes, scores, iou_threshold, offset=0.0)

    models = module("torchvision.models", resnet50=lambda pretrained=False: ResNet())
    module("torchvision.models._utils", IntermediateLayerGetter=IntermediateLayerGetter)
    ops = module("torchvision.ops", nms=tv_nms, box_convert=None)       # box_convert: CIDS crops, unused here
    functional = module("torchvision.transforms.functional", normalize=None)
    module("torchvision.transforms", functional=functional)
    module("torchvision", models=models, ops=ops)
    module("insightface", app=types.SimpleNamespace(FaceAnalysis=None))
    module("groundingdino")
    module("groundingdino.util")
    module("groundingdino.util.inference", load_model=None, load_image=None, predict=None, annotate=None)
    module("face_alignment", align=None)
    module("pandas")                                                    # the dataset loader's, unused here
    pkg = module("facexlib")
    pkg.__path__ = [str(facexlib_dir)]


HEAD_SCALE = {"class": 0.6, "offsets": 0.25}


def random_weights(tmp: Path) -> dict:
    """Full-size random checkpoints in the released layouts."""
    import torch

    from characonsist.evaluate.adaface import IResNet
    from characonsist.evaluate.facenet import InceptionResnetV1
    from characonsist.evaluate.tiny import save_tiny_retinaface

    files = {"retinaface": save_tiny_retinaface(tmp / "weights" / "detection_Resnet50_Final.pth", seed=3, width=64,
                                                layers=(3, 4, 6, 3), out_channels=256, size=160)}
    # calmer heads than the calibration's on these pictures: fewer saturated scores, boxes of picture size
    state = torch.load(files["retinaface"])
    for key in state:
        if ".conv1x1." in key:
            state[key] = state[key] * (HEAD_SCALE["class"] if "ClassHead" in key else HEAD_SCALE["offsets"])
    torch.save(state, files["retinaface"])
    torch.manual_seed(4)
    for kind, net, shape in (("adaface", IResNet(), (8, 3, 112, 112)), ("facenet", InceptionResnetV1(), (8, 3, 112, 112))):
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None
                if m.affine:
                    torch.nn.init.uniform_(m.weight, 0.5, 1.5)
                    torch.nn.init.normal_(m.bias, 0, 0.1)
        with torch.no_grad():
            net.train()(torch.rand(shape) * (2 if kind == "adaface" else 1) - (1 if kind == "adaface" else 0))
        net.eval()
        if kind == "adaface":
            state = {f"model.{k}": v for k, v in net.state_dict().items()}
            state["head.kernel"] = torch.randn(512, 10)
            path = tmp / "adaface" / "adaface_ir101_webface12m.ckpt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": state, "epoch": 1}, path)
        else:
            state = dict(net.state_dict())
            state["logits.weight"], state["logits.bias"] = torch.randn(8631, 512) * 0.01, torch.zeros(8631)
            path = tmp / "facenet" / "20180402-114759-vggface2.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, path)
        files[kind] = path
    return files


def pictures(seed: int = 0) -> list:
    """Crops as CIDS gets them: noise, smoothed noise and gradients, 60x48 to 420x300."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    out = []
    for k, (w, h) in enumerate([(60, 48), (96, 128), (160, 120), (203, 157), (256, 256), (300, 220), (420, 300),
                                (128, 96), (180, 240), (333, 250), (90, 90), (240, 180)]):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if k % 3 == 1:
            image = image.filter(ImageFilter.GaussianBlur(2))
        elif k % 3 == 2:
            ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * rng.uniform(0.3, 1, 3)
            image = Image.fromarray(np.clip(ramp + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8))
        out.append(image)
    return out


def check_alignment(cv2, n: int = 1000, seed: int = 1) -> bool:
    """``face_mix.partial_affine`` + ``warp_affine`` against ``cv2.estimateAffinePartial2D(LMEDS)`` +
    ``cv2.warpAffine`` on landmark sets: the template under a random similarity with small and large noise, and
    random points (where LMEDS drops outliers)."""
    from characonsist.evaluate.face_mix import FFHQ_TEMPLATE, face_template, partial_affine, warp_affine

    rng = np.random.default_rng(seed)
    ok = True
    for kind, noise in (("template + 3 px noise", 3), ("template + 25 px noise", 25), ("random points", None)):
        masks, worst, pixels, outliers = 0, 0.0, 0, 0
        for _ in range(n):
            scale, angle = rng.uniform(0.05, 1.0), rng.uniform(-0.6, 0.6)
            rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            if noise is None:
                pts = rng.uniform(0, 200, (5, 2)).astype(np.float32)
            else:
                pts = (FFHQ_TEMPLATE @ rot.T + rng.uniform(-50, 200, 2) + rng.normal(0, noise * scale, (5, 2)))
                pts = pts.astype(np.float32)
            theirs, inl = cv2.estimateAffinePartial2D(pts, face_template(), method=cv2.LMEDS)
            ours, mask = partial_affine(pts, face_template())
            masks += bool((inl.ravel().astype(bool) != mask).any())
            outliers += int((~mask).any())
            worst = max(worst, float(np.abs(theirs - ours).max()))
            img = cv2.GaussianBlur(rng.integers(0, 256, (220, 220, 3), dtype=np.uint8), (9, 9), 4)
            a = cv2.warpAffine(img, theirs, (112, 112), borderMode=cv2.BORDER_CONSTANT, borderValue=(135, 133, 132))
            pixels += bool((a != warp_affine(img, ours, (112, 112))).any())
        print(f"alignment, {kind}: {n} landmark sets ({outliers} with an LMEDS outlier); inlier masks differing "
              f"{masks}; matrix max abs difference {worst:.1e}; aligned 112x112 faces differing {pixels}")
        ok = ok and masks == 0 and worst < 1e-6 and pixels == 0
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True, help="vistorybench checkout with the AdaFace submodule's files")
    parser.add_argument("--facexlib", help="facexlib 0.3.0's package folder (…/facexlib)")
    parser.add_argument("--alignment-only", action="store_true",
                        help="only the OpenCV alignment check (needs numpy and cv2, e.g. OpenCV 4.9 with numpy 1.26)")
    args = parser.parse_args()
    import cv2

    if args.alignment_only:
        print(f"cv2 {cv2.__version__}, numpy {np.__version__}")
        ok = check_alignment(cv2)
        print("OK" if ok else "FAILED")
        return 0 if ok else 1
    if not args.facexlib:
        parser.error("--facexlib is required (facexlib 0.3.0's package folder)")
    import torch
    from transformers import CLIPModel, CLIPProcessor  # noqa: F401  (imported before the torchvision stub)

    from characonsist.evaluate.adaface import AdaFace
    from characonsist.evaluate.face_mix import FaceMixEncoder, FacexlibFaces, ensemble_matrix
    from characonsist.evaluate.facenet import FaceNet

    stub_modules(Path(args.facexlib))
    sys.path.insert(0, str(args.repo))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = random_weights(tmp)
        # the parsing model their FaceRestoreHelper loads (unused with use_parse=False), random, strict keys
        from facexlib.parsing.parsenet import ParseNet

        torch.save(ParseNet(in_size=512, out_size=512, parsing_ch=19).state_dict(),
                   tmp / "weights" / "parsing_parsenet.pth")
        from facexlib.utils.face_restoration_helper import FaceRestoreHelper
        from vistorybench.bench.content import cids_evaluator as ce
        from vistorybench.bench.content.inception_resnet_v1 import InceptionResnetV1 as TheirFaceNet

        ce.adaface_models["ir_101"] = str(files["adaface"])
        ev = ce.CIDSEvaluator.__new__(ce.CIDSEvaluator)
        ev.__dict__.update(
            device=torch.device("cpu"), arcface=None, arcface_provider=None, use_multi_face_encoder=True,
            ensemble_method="average", ensemble_weights={}, arcface_det_thresh_initial=0.45,
            arcface_det_thresh_min=0.1, arcface_det_thresh_step=0.1,
            adaface=ce.load_pretrained_model("ir_101"),
            facenet=TheirFaceNet(pretrained="vggface2", pretrained_path=str(tmp)).eval(),
            face_helper=FaceRestoreHelper(upscale_factor=1, face_size=112, crop_ratio=(1, 1),
                                          det_model="retinaface_resnet50", save_ext="jpg", use_parse=False,
                                          device=torch.device("cpu"), model_rootpath=str(tmp / "weights")))
        ours = FaceMixEncoder(None, AdaFace(str(files["adaface"]), "cpu", progress=False),
                              FaceNet(str(files["facenet"]), "cpu", progress=False),
                              FacexlibFaces(str(files["retinaface"]), "cpu", progress=False))
        n_params = {"adaface": sum(p.numel() for p in ev.adaface.parameters()),
                    "ours adaface": sum(p.numel() for p in ours.adaface.net.parameters())}
        print(f"cv2 {cv2.__version__}; AdaFace IR-101 parameters: theirs {n_params['adaface']:,}, ours "
              f"{n_params['ours adaface']:,}")
        images = pictures()
        worst = {"aligned face (px)": 0.0, "adaface": 0.0, "facenet": 0.0, "similarity": 0.0}
        theirs_feats, valid_theirs = ev.get_char_feat(images, encoder_name="face_mix", return_indices=True)
        ours_feats, valid_ours = ours.embed(images)
        faces = 0
        for k, image in enumerate(images):
            ev.face_helper.clean_all()
            ev.face_helper.read_image(cv2.cvtColor(np.array(image), cv2.COLOR_RGB2BGR))
            found = ev.face_helper.get_face_landmarks_5(only_center_face=False)
            ev.face_helper.align_warp_face()
            mine = ours.faces.aligned(image)
            if (found > 0) != (mine is not None):
                print(f"picture {k}: face found by theirs {found > 0}, ours {mine is not None}")
                return 1
            if mine is not None:
                faces += 1
                theirs_face = ev.face_helper.cropped_faces[0]
                worst["aligned face (px)"] = max(worst["aligned face (px)"],
                                                 float(np.abs(theirs_face.astype(int) - mine.astype(int)).max()))
        print(f"{len(images)} pictures, {faces} with a face above 0.97; valid: theirs {valid_theirs}, ours {valid_ours}")
        if valid_theirs != valid_ours:
            return 1
        for t, o in zip(theirs_feats or [], ours_feats or [], strict=True):
            if set(t.keys()) != set(o):
                print(f"models differ: {set(t.keys())} vs {set(o)}")
                return 1
            for name in o:
                diff = float(np.abs(t[name].numpy().astype(np.float64) - o[name]).max())
                worst[name] = max(worst[name], diff)
        if theirs_feats:
            sim_theirs = ev._compute_multimodel_similarity_matrix(theirs_feats, theirs_feats, method="average").numpy()
            sim_ours = ensemble_matrix(ours_feats, ours_feats)
            worst["similarity"] = float(np.abs(sim_theirs - sim_ours).max())
            off = sim_ours[~np.eye(len(sim_ours), dtype=bool)]
            print(f"ensemble similarities between the pictures: {off.min():.3f} .. {off.max():.3f}")
        for name, value in worst.items():
            print(f"max abs difference, {name}: {value:.2e}")
        ok = worst["aligned face (px)"] == 0 and max(worst["adaface"], worst["facenet"], worst["similarity"]) < 1e-5
        ok = check_alignment(cv2) and ok
        print("OK" if ok else "FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
