"""CSD and the aesthetic predictor v2.5: this project's loaders and networks against ViStoryBench's own model code.

No weights can be downloaded here, so ViStoryBench's ``CSD_CLIP(name='vit_large')`` (``bench/style/csd/``) and
``AestheticPredictorV2p5Model`` (``bench/quality/aesthetic/aesthetic-predictor-v2-5/model.py``, SigLIP
so400m-patch14-384's config) are built at full size with random weights, as their code builds them (CSD: fp16
conversion, then float32 as ``load_csd``); their state dicts are saved in the released files' layouts (CSD: one
state dict with ``backbone.*``, ``last_layer_style``, ...; the aesthetic head: ``scoring_head.*``; the SigLIP tower
as a transformers folder) and loaded by ``characonsist.evaluate.vistory_metrics``. Both sides then embed / score
the same preprocessed pixels (this project's preprocessing: their torchvision transforms are not installed here).
Prints the max abs differences; fails above 1e-4. Not part of CI (full-size models, a minute on a CPU):

    git -C MIRROR archive HEAD | tar -x -C /tmp/vsb       # a checkout of ViStoryBench/vistorybench
    PYTHONPATH=src python bench/vistorybench_reference.py --repo /tmp/vsb
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 200 * 300 * 3).reshape(200, 300, 3).astype(np.uint8)
    return [Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)), Image.fromarray(ramp),
            Image.new("RGB", (512, 384), (180, 60, 90))]


def check_csd(repo: Path, folder: Path) -> float:
    from characonsist.evaluate.vistory_metrics import CsdModel

    sys.path.insert(0, str(repo))
    from vistorybench.bench.style.csd.csd_model import CSD_CLIP

    torch.manual_seed(0)
    theirs = CSD_CLIP(name="vit_large", only_global_token=True, device="cpu")
    theirs = theirs.to(dtype=torch.float32).eval()           # as their load_csd
    state = theirs.state_dict()
    torch.save(state, folder / "csd_vit-large.pth")
    ours = CsdModel(str(folder / "csd_vit-large.pth"), "cpu", progress=False)
    x = torch.cat([ours.pixels(p) for p in pictures()])
    with torch.inference_mode():
        ref = theirs(x)["style"][:, 0].numpy()
    got = ours.embed_pixels(x)
    diff = float(np.abs(ref - got).max())
    print(f"CSD ViT-L: {sum(p.numel() for p in theirs.parameters())} parameters, {len(state)} state-dict entries; "
          f"style embeddings {got.shape}, max abs difference {diff:.2e}")
    cos_ref, cos_got = ref @ ref.T, got @ got.T
    print(f"  pairwise cosines (theirs): {np.round(cos_ref[np.triu_indices(len(ref), 1)], 4).tolist()}; "
          f"max abs difference {np.abs(cos_ref - cos_got).max():.2e}")
    return diff


def check_aesthetic(repo: Path, folder: Path) -> float:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from characonsist.evaluate.vistory_metrics import AestheticPredictor

    path = repo / "vistorybench/bench/quality/aesthetic/aesthetic-predictor-v2-5/model.py"
    spec = importlib.util.spec_from_file_location("apv25_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                num_attention_heads=16, image_size=384, patch_size=14)   # so400m-patch14-384
    torch.manual_seed(0)
    theirs = module.AestheticPredictorV2p5Model(config).eval()
    with torch.no_grad():      # post_init leaves the head near zero; spread it so that scores differ
        for layer in theirs.layers.scoring_head:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, 1.0 / layer.in_features ** 0.5)
                layer.bias.normal_(0, 0.1)
    tower = SiglipVisionModel(config)
    missing, unexpected = tower.load_state_dict({k: v for k, v in theirs.state_dict().items()
                                                 if not k.startswith("layers.")}, strict=False)
    assert not missing and not unexpected, (missing[:3], unexpected[:3])
    tower.save_pretrained(folder / "siglip")
    torch.save(theirs.layers.state_dict(), folder / "aesthetic_predictor_v2_5.pth")
    ours = AestheticPredictor(str(folder / "aesthetic_predictor_v2_5.pth"), str(folder / "siglip"), "cpu",
                              progress=False)
    x = torch.cat([ours.pixels(p) for p in pictures()])
    with torch.inference_mode():
        ref = theirs(x).logits.flatten().numpy()
    got = np.array(ours.score_pixels(x))
    diff = float(np.abs(ref - got).max())
    print(f"aesthetic v2.5 (SigLIP so400m config): {sum(p.numel() for p in theirs.parameters())} parameters; "
          f"scores theirs {np.round(ref, 4).tolist()}, max abs difference {diff:.2e}")
    return diff


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True, help="a checkout of github.com/ViStoryBench/vistorybench")
    parser.add_argument("--only", choices=("csd", "aesthetic"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "csd"):
            worst = max(worst, check_csd(Path(args.repo), Path(tmp)))
        if args.only in (None, "aesthetic"):
            worst = max(worst, check_aesthetic(Path(args.repo), Path(tmp)))
    print("OK" if worst < 1e-4 else "FAILED")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
