"""FaceNet: this project's network, loader and preprocessing against the real facenet-pytorch package.

No weights can be downloaded here, so facenet-pytorch's ``InceptionResnetV1(pretrained=None, classify=False)``
gets random weights and batch-norm statistics (a calibration batch in train mode), plus a random 8631-class
``logits`` layer like the published VGGFace2 file; its state dict is saved as the checkpoint file and loaded with
``characonsist.evaluate.facenet``. Face crops: facenet-pytorch's ``extract_face`` + ``fixed_image_standardization``
on one side, ``FaceNet.crop`` + ``FaceNet.embed`` on the other, on a few pictures and boxes, margins 0 and 20.
Prints the max abs difference of the preprocessed crops and of the embeddings. Not part of CI (it needs
facenet-pytorch, which pins an old torch/torchvision; install it --no-deps into a side venv):

    PYTHONPATH=src /work/venv-ref/bin/python bench/facenet_reference.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def pictures(root: Path) -> list[Image.Image]:
    """A few pictures: the repo's documentation images (drawn characters) and seeded noise."""
    found = [Image.open(p).convert("RGB") for p in sorted((root / "docs" / "img").glob("*.png"))[:3]]
    rng = np.random.default_rng(0)
    found.append(Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)))
    ramp = np.linspace(0, 255, 200 * 200 * 3).reshape(200, 200, 3).astype(np.uint8)
    found.append(Image.fromarray(ramp))
    return found


def boxes(image: Image.Image) -> list[tuple[float, float, float, float]]:
    w, h = image.size
    return [(0.1 * w, 0.15 * h, 0.55 * w, 0.7 * h), (0.4 * w + 0.3, 0.2 * h + 0.7, 0.9 * w, 0.65 * h),
            (0.0, 0.0, float(w), float(h)), (0.3 * w, 0.3 * h, 0.42 * w, 0.5 * h)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from facenet_pytorch import InceptionResnetV1 as Reference
    from facenet_pytorch.models.mtcnn import fixed_image_standardization
    from facenet_pytorch.models.utils.detect_face import extract_face

    from characonsist.evaluate.facenet import FaceNet, InceptionResnetV1

    torch.manual_seed(args.seed)
    ref = Reference(pretrained=None, classify=False)
    for module in ref.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    with torch.no_grad():
        ref.train()(torch.randn(16, 3, 160, 160))
    ref.eval()
    state = ref.state_dict()
    state["logits.weight"] = torch.randn(8631, 512) * 0.01
    state["logits.bias"] = torch.zeros(8631)
    ours_params = sum(p.numel() for p in InceptionResnetV1().parameters())
    ref_params = sum(p.numel() for p in ref.parameters())
    print(f"facenet-pytorch InceptionResnetV1: {ref_params} parameters, {len(ref.state_dict())} state-dict entries; "
          f"ours: {ours_params} parameters")

    root = Path(__file__).resolve().parent.parent
    diffs_in, diffs_out, count, cosines = [], [], 0, []
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "20180402-114759-vggface2.pt"
        torch.save(state, file)
        for margin in (0, 20):
            ours = FaceNet(str(file), "cpu", margin=margin)
            for image in pictures(root):
                for box in boxes(image):
                    face = extract_face(image, np.asarray(box), image_size=160, margin=margin)
                    ref_in = fixed_image_standardization(face)[None]
                    our_in = ours.tensor([ours.crop(image, box)])
                    with torch.inference_mode():
                        ref_out = ref(ref_in).numpy().astype(np.float64)
                    our_out = ours.embed([ours.crop(image, box)])
                    diffs_in.append(float((ref_in - our_in).abs().max()))
                    diffs_out.append(float(np.abs(ref_out - our_out).max()))
                    cosines.append(float((ref_out * our_out).sum()))
                    count += 1
    print(f"{count} crops ({len(pictures(root))} pictures x 4 boxes x margins 0, 20), 512-d embeddings")
    print(f"max abs difference of the preprocessed crops: {max(diffs_in):.3g}")
    print(f"max abs difference of the embeddings: {max(diffs_out):.3g}  (min cosine {min(cosines):.9f})")
    return 0 if max(diffs_out) < 1e-5 and max(diffs_in) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
