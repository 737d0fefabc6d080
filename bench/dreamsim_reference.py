"""``evaluate/dreamsim.py`` against the official ``dreamsim`` package, full-size, random weights.

For each DreamSim type this writes random full-size checkpoints in the package's cache layout (DINO's torch.hub
file, the CLIP-as-DINO ``*_pretrain.pth.tar`` files, a peft LoRA adapter on every ``qkv`` with random non-zero
A and B, saved by peft itself), loads that folder with the package's own ``dreamsim(pretrained=True,
dreamsim_type=...)`` and with ``characonsist.evaluate.dreamsim.load_dreamsim``, and compares preprocessed pixels,
embeddings and distances on a few images. It also reports how far the LoRA moves the package's embeddings (so
the differences have a scale). Needs a venv with torch + torchvision + ``dreamsim`` (not the project's):

    PYTHONPATH=src /work/venv-ref/bin/python bench/dreamsim_reference.py --dino-repo /path/to/facebookresearch/dino \
        --dinov2-repo /path/to/facebookresearch/dinov2

``--dino-repo``: a checkout of facebookresearch/dino, installed as torch.hub's cached ``facebookresearch_dino_main``
so the package's ``torch.hub.load('facebookresearch/dino:main', ...)`` runs offline; without it, torch.hub.load
is replaced by the package's own copy of DINO's ViT (``feature_extraction/vision_transformer.py``) loading the
same checkpoint file. ``--dinov2-repo``: likewise for facebookresearch/dinov2 (``dinov2_vitb14`` needs it; it also
builds DINOv2's ViT for the random weights). Output: a table and ``--json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TYPES = ("ensemble", "dino_vitb16", "clip_vitb32", "open_clip_vitb32", "dinov2_vitb14")
LORA = {"ensemble": (16, 8.0), "single": (16, 32.0)}   # r, lora_alpha of configs/train_*_lora.yaml


def randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights with a ViT's usual scales: LN weights near 1, everything else small normal noise."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            norm = ("norm" in name or "pos_drop" in name) and p.ndim == 1 and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if norm or name.endswith(".gamma") else 0.02 * noise)


def write_backbones(kind: str, cache: Path, gen: torch.Generator) -> None:
    from dreamsim.config import dreamsim_args
    from dreamsim.feature_extraction.vision_transformer import DINOHead, vit_base

    for name in dreamsim_args["model_config"][kind]["model_type"].split(","):
        patch = int(name[-2:])
        vit = vit_base(patch_size=patch)
        if name.startswith("dinov2"):   # DINOv2's own ViT (its hub code, layer scale, 37x37 positions)
            from dinov2.hub.backbones import dinov2_vitb14

            vit = dinov2_vitb14(pretrained=False)
            randomize(vit, gen)
            (cache / "checkpoints").mkdir(parents=True, exist_ok=True)
            torch.save(vit.state_dict(), cache / "checkpoints" / "dinov2_vitb14_pretrain.pth")
            torch.save(vit.state_dict(), cache / "dinov2_vitb14_pretrain.pth")   # the package checks it is there
        elif name.startswith("dino"):
            randomize(vit, gen)
            (cache / "checkpoints").mkdir(parents=True, exist_ok=True)
            torch.save(vit.state_dict(), cache / "checkpoints" / "dino_vitbase16_pretrain.pth")
            head = DINOHead(768, 2048)   # read by the package (its projection head), unused by the 'cls' feature
            state = {f"module.head.{k}": v for k, v in head.state_dict().items() if not k.startswith("last_layer")}
            state["module.head.last_layer.weight"] = torch.randn(2048, 256, generator=gen)
            torch.save({"student": state}, cache / "dino_vitb16_pretrain.pth")
        else:
            vit.pos_drop = torch.nn.LayerNorm(768)
            randomize(vit, gen)
            state = vit.state_dict()
            state["proj"] = 0.05 * torch.randn(768, 512, generator=gen)
            torch.save({"state_dict": state}, cache / f"{name}_pretrain.pth.tar")


def write_adapter(kind: str, cache: Path, gen: torch.Generator, safetensors: bool) -> None:
    """A random LoRA adapter saved by peft for the package's PerceptualModel (the package's own key names)."""
    from dreamsim.config import dreamsim_args
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model

    r, alpha = LORA["ensemble" if kind == "ensemble" else "single"]
    base = PerceptualModel(**dreamsim_args["model_config"][kind], device="cpu", load_dir=str(cache),
                           normalize_embeds=True)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.3, bias="none",
                                            target_modules=["qkv"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    tag = "ensemble" if kind == "ensemble" else f"{kind}_single"
    model.save_pretrained(str(cache / f"{tag}_lora"), safe_serialization=safetensors)


def images():
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:200]
    gradient = np.stack([xx / 200 * 255, yy / 300 * 255, (xx + yy) % 256], -1).astype(np.uint8)
    blobs = np.zeros((512, 512, 3), np.uint8)
    blobs[100:300, 150:400] = (200, 40, 40)
    blobs[320:480, 60:200] = (30, 160, 220)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
            Image.fromarray(gradient), Image.fromarray(blobs),
            Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).convert("L")]


def compare(kind: str, root: Path, dino_repo: Path | None, dinov2_repo: Path | None, seed: int,
            safetensors: bool) -> dict:
    import dreamsim

    from characonsist.evaluate.dreamsim import load_dreamsim

    cache = root / kind
    cache.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    if kind == "dinov2_vitb14":
        shutil.copytree(dinov2_repo, cache / "facebookresearch_dinov2_main", ignore=shutil.ignore_patterns(".git"))
    elif ("dino" in kind or kind == "ensemble") and dino_repo:
        shutil.copytree(dino_repo, cache / "facebookresearch_dino_main", ignore=shutil.ignore_patterns(".git"))
    write_backbones(kind, cache, gen)
    write_adapter(kind, cache, gen, safetensors)

    t = time.perf_counter()
    official, preprocess = dreamsim.dreamsim(pretrained=True, device="cpu", cache_dir=str(cache), dreamsim_type=kind)
    t_official = time.perf_counter() - t
    t = time.perf_counter()
    native = load_dreamsim(kind, cache, device="cpu", download=False)
    t_native = time.perf_counter() - t

    ims = images()
    px_official = torch.cat([preprocess(im) for im in ims])
    px_native = native.preprocess(ims)
    with torch.no_grad():
        e_official = official.embed(px_official)
        e_native = native.embed(px_native)
        with official.disable_adapter():
            e_no_lora = official.embed(px_official)
        pairs = [(i, j) for i in range(len(ims)) for j in range(len(ims)) if i < j]
        a, b = [i for i, _ in pairs], [j for _, j in pairs]
        d_official = official(px_official[a], px_official[b])
        d_native = native.distance(px_native[a], px_native[b])
    return {"type": kind, "adapter_format": "safetensors" if safetensors else "bin",
            "embedding_dim": int(e_native.shape[1]),
            "pixels_max_abs_diff": float((px_official - px_native).abs().max()),
            "embedding_max_abs_diff": float((e_official - e_native).abs().max()),
            "distance_max_abs_diff": float((d_official - d_native).abs().max()),
            "lora_effect_on_embedding_max_abs": float((e_official - e_no_lora).abs().max()),
            "distances_official": [round(float(d), 6) for d in d_official],
            "load_seconds": {"official": round(t_official, 2), "native": round(t_native, 2)}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--dino-repo", type=Path, help="a checkout of facebookresearch/dino (torch.hub's cached repo)")
    p.add_argument("--dinov2-repo", type=Path, help="a checkout of facebookresearch/dinov2 (for dinov2_vitb14; "
                                                   "without it that type is left out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.dino_repo is None:
        from dreamsim.feature_extraction.vision_transformer import vit_base

        hub_load_original = torch.hub.load

        def hub_load(repo, name, **kw):   # DINO's hubconf: vit_base(patch 16), the checkpoint from torch.hub's folder
            if "dinov2" in repo:
                return hub_load_original(repo, name, **kw)
            model = vit_base(patch_size=16, num_classes=0)
            model.load_state_dict(torch.load(Path(torch.hub.get_dir()) / "checkpoints" /
                                             "dino_vitbase16_pretrain.pth", weights_only=True), strict=True)
            return model

        torch.hub.load = hub_load
    kinds = args.types.split(",")
    if "dinov2_vitb14" in kinds and args.dinov2_repo is None:
        print("dinov2_vitb14 left out: pass --dinov2-repo")
        kinds.remove("dinov2_vitb14")
    if args.dinov2_repo:
        import sys

        sys.path.insert(0, str(args.dinov2_repo))   # to build DINOv2's ViT for the random weights
    rows = []
    with tempfile.TemporaryDirectory(prefix="dreamsim_ref_") as tmp:
        for k, kind in enumerate(kinds):
            rows.append(compare(kind, Path(tmp), args.dino_repo, args.dinov2_repo, args.seed + k,
                                safetensors=kind != "ensemble"))
            r = rows[-1]
            print(f"{kind:18s} dim {r['embedding_dim']:5d}  pixels {r['pixels_max_abs_diff']:.1e}  embedding "
                  f"{r['embedding_max_abs_diff']:.2e}  distance {r['distance_max_abs_diff']:.2e}  (LoRA moves the "
                  f"embedding by up to {r['lora_effect_on_embedding_max_abs']:.2e}; adapter .{r['adapter_format']})",
                  flush=True)
    import dreamsim
    import peft

    out = {"dreamsim": getattr(dreamsim, "__version__", None) or _version("dreamsim"), "peft": peft.__version__,
           "torch": torch.__version__, "dino_hub": "repo" if args.dino_repo else "package copy", "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    raise SystemExit(main())
