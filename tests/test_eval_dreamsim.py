"""DreamSim in plain torch (``evaluate/dreamsim.py``): tiny random ViTs written in the official package's cache
layout and read by the real loader; known answers, the LoRA merge, the ensemble's concatenation, downloads and the
missing-file error, and the DreamSim column of ``evaluate_run``. The full-size comparison with the official package
is ``bench/dreamsim_reference.py`` (docs/EVAL.md)."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from characonsist.evaluate import EvalConfig, ModelUnavailable, evaluate_run, read_run
from characonsist.evaluate import dreamsim as D
from characonsist.evaluate import metrics as M
from characonsist.evaluate.models import DreamSim
from characonsist.evaluate.tiny import save_tiny_dreamsim

WIDTH, PROJ = 128, 24


def noise(seed: int, size: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return save_tiny_dreamsim(tmp_path_factory.mktemp("dreamsim") / "cache", "ensemble", seed=3)


@pytest.fixture(scope="module")
def model(cache):
    return D.load_dreamsim("ensemble", cache, download=False)


def test_identical_images_have_distance_zero_and_distances_are_symmetric_in_range(model):
    images = [noise(1), noise(2), noise(3, 80)]
    pixels = model.preprocess(images)
    same = model.distance(pixels, pixels)
    assert torch.allclose(same, torch.zeros(3), atol=1e-6)
    a, b = pixels[[0, 0, 1]], pixels[[1, 2, 2]]
    d_ab, d_ba = model.distance(a, b), model.distance(b, a)
    assert torch.allclose(d_ab, d_ba, atol=1e-6)
    assert bool((d_ab > 1e-4).all()) and bool((d_ab <= 2).all())


def test_a_permuted_set_gives_the_permuted_scores(cache):
    wrapper = DreamSim("ensemble", str(cache), device="cpu")
    images = [noise(10), noise(11), noise(12), noise(13)]
    perm = [2, 0, 3, 1]
    emb = wrapper.embed_images(images)
    emb_perm = wrapper.embed_images([images[k] for k in perm])
    np.testing.assert_allclose(emb_perm, emb[perm], atol=1e-6)
    pairs = [(0, 1), (1, 2), (2, 3)]
    d = M.pair_similarity(emb, pairs, distance=True)
    inverse = {k: i for i, k in enumerate(perm)}
    d_perm = M.pair_similarity(emb_perm, [(inverse[i], inverse[j]) for i, j in pairs], distance=True)
    np.testing.assert_allclose(d_perm, d, atol=1e-6)
    assert min(d) > 0 and "ensemble" in wrapper.describe()["model"]


def test_the_ensemble_embedding_is_the_centred_unit_concatenation_of_dino_clip_open_clip(model, cache, tmp_path):
    pixels = model.preprocess([noise(20), noise(21)])
    parts = [branch(pixels) for branch in model.branches]
    assert [p.shape[1] for p in parts] == [WIDTH, PROJ, PROJ]   # DINO's CLS token, CLIP's and OpenCLIP's projection
    assert [b.backbone.family for b in model.branches] == ["dino", "clip", "open_clip"]
    features = torch.cat(parts, dim=1)
    assert torch.equal(model.features(pixels), features)
    centred = features - features.mean(dim=1, keepdim=True)
    assert torch.allclose(model.embed(pixels), centred / centred.norm(dim=1, keepdim=True), atol=1e-6)
    # the DINO part equals the single-type dino_vitb16 model built from the same backbone and LoRA
    single = tmp_path / "single"
    (single / "checkpoints").mkdir(parents=True)
    shutil.copy(cache / D.BACKBONES["dino_vitb16"].file, single / D.BACKBONES["dino_vitb16"].file)
    config, weights = D.read_adapter(cache / "ensemble_lora")
    adapter = single / "dino_vitb16_single_lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    torch.save({k: v for k, v in weights.items() if ".extractor_list.0." in k}, adapter / "adapter_model.bin")
    dino = D.load_dreamsim("dino_vitb16", single, download=False)
    assert torch.allclose(dino.features(pixels), parts[0], atol=1e-6)


def test_the_merged_lora_equals_the_adapter_applied_at_run_time(cache, tmp_path):
    """LoRA in peft's form, ``qkv(x) + lora_alpha / r * x A^T B^T``, on the same backbones without an adapter."""
    base_dir = save_tiny_dreamsim(tmp_path / "zero", "ensemble", seed=3, lora_scale=0.0)
    base = D.load_dreamsim("ensemble", base_dir, download=False)
    merged = D.load_dreamsim("ensemble", cache, download=False)
    config, weights = D.read_adapter(cache / "ensemble_lora")
    scale = config["lora_alpha"] / config["r"]
    pixels = base.preprocess([noise(30), noise(31)])
    plain = base.features(pixels)
    handles = []
    for index, branch in enumerate(base.branches):
        for k, block in enumerate(branch.blocks):
            prefix = f"base_model.model.extractor_list.{index}.model.blocks.{k}.attn.qkv"
            a, b = weights[f"{prefix}.lora_A.weight"], weights[f"{prefix}.lora_B.weight"]
            handles.append(block.attn.qkv.register_forward_hook(
                lambda mod, inp, out, a=a, b=b: out + scale * (inp[0] @ a.T) @ b.T))
    live = base.features(pixels)
    for h in handles:
        h.remove()
    got = merged.features(pixels)
    assert torch.allclose(got, live, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3   # the adapter does change the features


def test_missing_files_offline_name_the_files_and_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable) as e:
        D.load_dreamsim("ensemble", tmp_path / "empty")
    msg = str(e.value)
    for part in ("ensemble_lora/adapter_config.json", "clip_vitb16_pretrain.pth.tar",
                 "checkpoints/dino_vitbase16_pretrain.pth", D.TYPES["ensemble"].url, D.DINO_URL, "Offline"):
        assert part in msg, part
    with pytest.raises(ModelUnavailable, match="not supported; use one of ensemble"):
        D.load_dreamsim("dinov3", tmp_path)


def test_a_failed_download_is_reported_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    dead = "http://127.0.0.1:9/dreamsim_dino_vitb16_checkpoint.zip"
    monkeypatch.setitem(D.TYPES, "dino_vitb16", D.DreamSimType(("dino_vitb16",), "dino_vitb16_single_lora", dead))
    with pytest.raises(ModelUnavailable, match="Downloading http://127.0.0.1:9/dreamsim_dino_vitb16_checkpoint.zip "
                                               "failed") as e:
        D.load_dreamsim("dino_vitb16", tmp_path / "c", progress=False)
    assert "dino_vitb16_single_lora/adapter_config.json" in str(e.value)
    assert not any(p.is_file() for p in (tmp_path / "c").rglob("*"))


def test_missing_files_are_downloaded_and_files_already_there_kept(cache, tmp_path, monkeypatch):
    """The package's zip (everything but DINO's torch.hub file) and DINO's file, from file:// URLs."""
    served = tmp_path / "served"
    served.mkdir()
    archive = served / "ensemble.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(cache.rglob("*")):
            if path.is_file() and not path.relative_to(cache).as_posix().startswith("checkpoints/"):
                z.write(path, path.relative_to(cache).as_posix())
    dino = served / "dino_vitbase16_pretrain.pth"
    shutil.copy(cache / "checkpoints/dino_vitbase16_pretrain.pth", dino)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setitem(D.TYPES, "ensemble", D.DreamSimType(D.TYPES["ensemble"].backbones, "ensemble_lora",
                                                            archive.as_uri()))
    monkeypatch.setitem(D.EXTRA_URLS, "checkpoints/dino_vitbase16_pretrain.pth", dino.as_uri())
    target = tmp_path / "target"
    target.mkdir()
    kept = target / "open_clip_vitb16_pretrain.pth.tar"
    shutil.copy(cache / kept.name, kept)
    before = kept.stat().st_mtime_ns
    model = D.load_dreamsim("ensemble", target, progress=False)
    assert D.missing_files("ensemble", target) == [] and kept.stat().st_mtime_ns == before
    assert not list(target.glob("*.zip"))
    reference = D.load_dreamsim("ensemble", cache, download=False)
    pixels = model.preprocess([noise(40)])
    assert torch.equal(model.embed(pixels), reference.embed(pixels))


def test_a_broken_adapter_names_its_file(cache, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    config, weights = D.read_adapter(broken / "ensemble_lora")
    key = next(k for k in weights if k.endswith("lora_B.weight"))
    del weights[key]
    (broken / "ensemble_lora" / "adapter_model.safetensors").unlink()
    torch.save(weights, broken / "ensemble_lora" / "adapter_model.bin")
    with pytest.raises(ModelUnavailable, match="ensemble_lora.*lacks its B matrix"):
        D.load_dreamsim("ensemble", broken, download=False)


def test_evaluate_run_computes_the_dreamsim_column(cache, tmp_path):
    from test_eval import write_run

    same, other = noise(50, 64), noise(51, 64)
    run = read_run(write_run(tmp_path / "run", [[{"image": same}, {"image": same}, {"image": other}]]))
    config = EvalConfig(clip=None, dinov2=None, segmenter=None, face_detector=None, dreamsim="ensemble",
                        dreamsim_cache=str(cache), device="cpu", metrics=("dreamsim",))
    result = evaluate_run(run, config)
    info = result["metrics"]["dreamsim"]
    assert info["status"] == "ok" and "DreamSim ensemble" in info["model"] and "bicubic" in info["preprocessing"]
    values = [p["dreamsim"] for p in result["groups"][0]["pairs"]]
    assert values[0] == pytest.approx(0.0, abs=1e-6) and values[1] > 1e-4
    assert result["overall"]["dreamsim"]["n"] == 2


@pytest.mark.parametrize("kind", sorted(set(D.TYPES) - {"ensemble"}))
def test_every_single_type_loads_from_its_layout_and_scores_known_answers(kind, tmp_path):
    model = D.load_dreamsim(kind, save_tiny_dreamsim(tmp_path, kind, seed=5), download=False)
    (branch,) = model.branches
    assert branch.backbone is D.BACKBONES[kind]
    assert model.embed(model.preprocess([noise(1)])).shape[1] == (WIDTH if kind.startswith("dino") else PROJ)
    pixels = model.preprocess([noise(1), noise(2)])
    assert float(model.distance(pixels[:1], pixels[:1])[0]) == pytest.approx(0.0, abs=1e-6)
    assert 0 < float(model.distance(pixels[:1], pixels[1:])[0]) <= 2
    assert isinstance(branch.blocks[0].ls1, D.LayerScale) == (kind == "dinov2_vitb14")


def test_dinov2_positions_are_resized_to_the_224_grid_keeping_the_class_token():
    side, grid, width = 37, 16, 8                          # DINOv2 ViT-B/14: 518 / 14 = 37 -> 224 / 14 = 16
    cls, patch = torch.randn(1, 1, width), torch.randn(1, 1, width)
    out = D.dinov2_positions(torch.cat([cls, patch.expand(1, side * side, width)], dim=1), grid)
    assert out.shape == (1, grid * grid + 1, width) and torch.equal(out[:, :1], cls)
    assert torch.allclose(out[:, 1:], patch.expand(1, grid * grid, width), atol=1e-5)   # bicubic keeps a constant
    ramp = torch.arange(side, dtype=torch.float32).view(1, side, 1, 1).expand(1, side, side, width)
    resized = D.dinov2_positions(torch.cat([cls, ramp.reshape(1, -1, width)], dim=1), grid)[0, 1:, 0]
    rows = resized.view(grid, grid)[:, 0]
    assert bool((rows[1:] > rows[:-1]).all()) and torch.allclose(resized.view(grid, grid), rows[:, None].expand(grid, grid))
