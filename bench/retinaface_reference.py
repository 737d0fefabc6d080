"""RetinaFace: this project's network, loader, prior boxes, decoding and NMS against the PyTorch port itself.

The reference is biubug6/Pytorch_Retinaface (a checkout, ``--repo``): its ``RetinaFace(cfg, phase="test")`` for
both published configurations (``cfg_re50``, ``cfg_mnet``), built with random weights (no weights can be
downloaded here): batch-norm affine parameters and the heads' weights perturbed, batch-norm statistics measured on
a batch of random images, so that every output is non-trivial. Its state dict is saved as the checkpoint (the
ResNet-50 one with DataParallel's ``module.`` prefix, as the published file) and loaded with
``characonsist.evaluate.retinaface``. On a few pictures, the port's ``detect.py`` pipeline (BGR minus
(104, 117, 123), ``PriorBox``, ``decode``, ``decode_landm``, score threshold, top-k, ``py_cpu_nms``, keep-top-k) is
run with the reference's own functions and compared with ``RetinaFaceDetector``: head outputs, prior boxes, and
the detections after NMS (same count, max abs difference of boxes, scores, landmarks). torchvision's ``nms``
(facexlib's choice) is compared with ``nms(offset=0)`` too. Not part of CI (needs torchvision):

    PYTHONPATH=src /work/venv-ref/bin/python bench/retinaface_reference.py --repo PYTORCH_RETINAFACE_CHECKOUT

The port's ``data`` package imports OpenCV (for its training data loader) at import time; nothing used here calls
it, so an empty ``cv2`` module stands in when OpenCV is not installed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def pictures(root: Path) -> list[Image.Image]:
    """The repo's documentation images (drawn characters, UI screenshots; large ones halved), seeded noise, a ramp."""
    found = []
    for p in sorted((root / "docs" / "img").glob("*.png"))[:3]:
        im = Image.open(p).convert("RGB")
        while max(im.size) > 800:
            im = im.resize((im.width // 2, im.height // 2), Image.BILINEAR)
        found.append(im)
    rng = np.random.default_rng(0)
    found.append(Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)))
    found.append(Image.fromarray(np.linspace(0, 255, 203 * 157 * 3).reshape(203, 157, 3).astype(np.uint8)))
    return found


def randomise(net: torch.nn.Module, seed: int, images: list[Image.Image]) -> None:
    """Random BN affine parameters and BN statistics of the pictures (each at its size, preprocessed as the port);
    then each head's 1x1 convolution rescaled to outputs of a detector's magnitude on them (offsets of std 0.5
    (boxes) and 1 (landmarks); face/background logits of std 1.5 with biases +1/-1, so that some anchors score
    above 0.8 and none saturates to exactly 1.0, whose ties NMS would break in an arbitrary order)."""
    torch.manual_seed(seed)
    inputs = [torch.from_numpy((np.float32(np.asarray(im)[:, :, ::-1]) - (104, 117, 123)).astype(np.float32)
                               .transpose(2, 0, 1).copy())[None] for im in images]
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(1 + 0.2 * torch.randn_like(module.weight))
                module.bias.copy_(0.2 * torch.randn_like(module.bias))
                module.momentum = None      # the cumulative average over the pictures
        net.train()
        for x in inputs:
            net(x)
        net.eval()
        seen: dict = {}
        hooks = [m.conv1x1.register_forward_hook(lambda m, i, o: seen.setdefault(m, []).append(o.flatten(1)))
                 for heads in (net.ClassHead, net.BboxHead, net.LandmarkHead) for m in heads]
        for x in inputs:
            net(x)
        for h in hooks:
            h.remove()
        for heads, std in ((net.ClassHead, 1.5), (net.BboxHead, 0.5), (net.LandmarkHead, 1.0)):
            for head in heads:
                conv = head.conv1x1
                out = torch.cat(seen[conv], 1) - conv.bias[:, None]
                conv.weight.mul_(std / out.std())
                conv.bias.copy_(torch.tensor([1.0, -1.0]).repeat(conv.out_channels // 2) if heads is net.ClassHead
                                else 0.1 * torch.randn_like(conv.bias))


def reference_detect(ref, modules, cfg, image: Image.Image, threshold: float, nms_threshold: float, top_k: int,
                     keep_top_k: int):
    """detect.py's steps with the reference's functions; returns the raw outputs, priors and (dets, landmarks)."""
    prior_box, decode, decode_landm, py_cpu_nms = modules
    img = np.float32(np.asarray(image)[:, :, ::-1])    # what cv2.imread gives: BGR
    h, w, _ = img.shape
    scale = torch.Tensor([w, h, w, h])
    img -= (104, 117, 123)
    x = torch.from_numpy(img.transpose(2, 0, 1).copy()).unsqueeze(0)
    with torch.no_grad():
        loc, conf, landms = ref(x)
    priors = prior_box(cfg, image_size=(h, w)).forward()
    boxes = (decode(loc.squeeze(0), priors, cfg["variance"]) * scale).numpy()
    scores = conf.squeeze(0).numpy()[:, 1]
    scale1 = torch.Tensor([w, h] * 5)
    points = (decode_landm(landms.squeeze(0), priors, cfg["variance"]) * scale1).numpy()
    inds = np.where(scores > threshold)[0]
    boxes, points, scores = boxes[inds], points[inds], scores[inds]
    order = scores.argsort()[::-1][:top_k]
    boxes, points, scores = boxes[order], points[order], scores[order]
    dets = np.hstack((boxes, scores[:, None])).astype(np.float32, copy=False)
    keep = py_cpu_nms(dets, nms_threshold)
    return (loc, conf, landms), priors, dets[keep][:keep_top_k], points[keep][:keep_top_k], (boxes, scores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True, help="a checkout of biubug6/Pytorch_Retinaface")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-3, help="fail above this max abs difference (pixels)")
    args = parser.parse_args(argv)
    try:
        import cv2  # noqa: F401
    except ImportError:
        sys.modules["cv2"] = types.ModuleType("cv2")
    sys.path.insert(0, str(Path(args.repo).resolve()))
    from layers.functions.prior_box import PriorBox
    from models.retinaface import RetinaFace as Reference
    from torchvision.ops import nms as tv_nms
    from utils.box_utils import decode, decode_landm
    from utils.nms.py_cpu_nms import py_cpu_nms

    from characonsist.evaluate import retinaface as R
    from data import cfg_mnet, cfg_re50

    root = Path(__file__).resolve().parent.parent
    images = pictures(root)
    print("pictures:", ", ".join(f"{im.width}x{im.height}" for im in images))
    worst = 0.0
    failed = False
    for cfg, prefix in ((cfg_re50, "module."), (cfg_mnet, "")):
        cfg = {**cfg, "pretrain": False}
        torch.manual_seed(args.seed)
        ref = Reference(cfg=cfg, phase="test")
        randomise(ref, args.seed, images)
        state = {prefix + k: v for k, v in ref.state_dict().items()}
        ours_net = R.RetinaFace(R.shape_of(ref.state_dict())["backbone"])
        ref_params, our_params = (sum(p.numel() for p in m.parameters()) for m in (ref, ours_net))
        same_keys = set(ref.state_dict()) == set(ours_net.state_dict())
        print(f"\n{cfg['name']}: port {ref_params} parameters, {len(ref.state_dict())} state-dict entries; ours "
              f"{our_params} parameters, same keys: {same_keys}")
        failed |= not same_keys or ref_params != our_params
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / f"{cfg['name']}_Final.pth"
            torch.save(state, file)
            for threshold in (0.02, 0.5, 0.8):
                ours = R.RetinaFaceDetector(str(file), "cpu", threshold=threshold, progress=False)
                d = {"loc": 0.0, "score": 0.0, "landmark offsets": 0.0, "priors": 0.0, "boxes": 0.0, "scores": 0.0,
                     "landmarks": 0.0, "tv nms": 0.0}
                counts, candidates, ties, same_nms, best_same = [], [], 0, True, 0
                for image in images:
                    (loc, conf, landms), priors, dets, points, (cand_boxes, cand_scores) = reference_detect(
                        ref, (PriorBox, decode, decode_landm, py_cpu_nms), cfg, image, threshold, 0.4, R.TOP_K,
                        R.KEEP_TOP_K)
                    o_loc, o_score, o_landms, o_priors = ours.raw([image])
                    d["loc"] = max(d["loc"], float((o_loc[0] - loc[0]).abs().max()))
                    d["score"] = max(d["score"], float((o_score[0] - conf[0, :, 1]).abs().max()))
                    d["landmark offsets"] = max(d["landmark offsets"], float((o_landms[0] - landms[0]).abs().max()))
                    d["priors"] = max(d["priors"], float((o_priors - priors).abs().max()))
                    faces = ours.faces([image])[0]
                    counts.append((len(faces), len(dets)))
                    if faces and len(dets):
                        best_same += bool(np.abs(np.array(faces[0][:5]) - dets[0, :5]).max() < 1e-3)
                    else:
                        best_same += not faces and not len(dets)
                    candidates.append(len(cand_scores))
                    tied = len(cand_scores) - len(np.unique(cand_scores))
                    ties += tied
                    if len(cand_scores):
                        # torchvision's nms (facexlib) against ours without the +1
                        b, s = torch.from_numpy(cand_boxes.copy()), torch.from_numpy(cand_scores.copy())
                        tv, mine = tv_nms(b, s, 0.4), R.nms(b, s, 0.4, offset=0.0)
                        d["tv nms"] = max(d["tv nms"], 0.0 if torch.equal(tv, mine) else float("inf"))
                        # the port's NMS on its candidates, ours given them in the port's order (its argsort
                        # breaks ties between equal scores in its own way; ours keeps the given order)
                        cand = np.hstack((cand_boxes, cand_scores[:, None])).astype(np.float32)
                        theirs = [int(k) for k in py_cpu_nms(cand, 0.4)]
                        order = cand[:, 4].argsort()[::-1]
                        ours_kept = order[R.nms(torch.from_numpy(cand[order, :4].copy()),
                                                torch.from_numpy(cand[order, 4].copy()), 0.4).numpy()].tolist()
                        same_nms &= ours_kept == theirs
                    if tied:   # the detections may legitimately differ: checked through the NMS above
                        continue
                    if len(faces) != len(dets):
                        failed = True
                        continue
                    if faces:
                        got = np.array([[*f[:5], *np.ravel(f.landmarks)] for f in faces], dtype=np.float64)
                        d["boxes"] = max(d["boxes"], float(np.abs(got[:, :4] - dets[:, :4]).max()))
                        d["scores"] = max(d["scores"], float(np.abs(got[:, 4] - dets[:, 4]).max()))
                        d["landmarks"] = max(d["landmarks"], float(np.abs(got[:, 5:] - points).max()))
                print(f"  threshold {threshold}: candidates {candidates} ({ties} tied scores), faces after NMS (ours, port) "
                      f"{counts}, best face the same in {best_same} of {len(images)} pictures")
                print("    max abs diff: " + ", ".join(f"{k} {v:.2e}" for k, v in d.items())
                      + f"; port's NMS kept the same boxes as ours in its candidate order: {same_nms}")
                worst = max(worst, d["boxes"], d["landmarks"], d["priors"])
                failed |= not same_nms or d["tv nms"] != 0.0
    print(f"\nworst box/landmark/prior difference: {worst:.2e} px; counts (images without tied "
          f"scores) and NMS choices {'DIFFER' if failed else 'equal'}")
    return 1 if failed or worst > args.tolerance else 0


if __name__ == "__main__":
    sys.exit(main())
