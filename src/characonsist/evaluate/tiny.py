"""Tiny random models for every metric, built from configs and saved like the real ones (tests, offline demos).

``save_tiny_models(folder)`` writes ``clip/``, ``dinov2/``, ``sam/``, ``clipseg/``, ``owlv2/`` (transformers
folders with their processors, loadable by ``from_pretrained``), ``facenet.pt`` (a narrow, shallow
Inception-ResNet-v1 state dict with facenet-pytorch's key names), ``retinaface.pth`` (a narrow, shallow RetinaFace
ResNet of the PyTorch port's layout, ``save_tiny_retinaface``), ``arcface.onnx`` (an ArcFace-shaped ONNX graph:
NCHW 112x112 RGB in, a 16-d embedding out) and ``dreamsim/`` (the DreamSim package's cache layout with tiny ViTs
and a random LoRA adapter, ``save_tiny_dreamsim``). Their scores mean nothing; they exercise the real loading and
scoring code. Keys of the returned dict: ``segmenter`` is SAM, ``retinaface`` the face detector and ``face_model`` FaceNet (the
defaults), ``clipseg``, ``face_detector`` (OWLv2, also SAM's box detector) and ``arcface`` the alternatives,
``dreamsim_cache`` the DreamSim folder.
"""

from __future__ import annotations

import argparse
import io
import json
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..tokenizers import make_clip_tokenizer
from .models import CLIP_MEAN

WORDS = ("a an the of in on at photo human face robot cat dog girl boy park beach city forest street sunny green "
         "grey starry night big small left right middle red blue").split()


def _tokenizer(max_length: int):

    return make_clip_tokenizer(WORDS, model_max_length=max_length)


def _text_config(tok, max_length: int, hidden: int = 32) -> dict:
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=max_length, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def _vision_config(hidden: int = 32) -> dict:
    return dict(hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                patch_size=8)


def save_tiny_models(folder: str | Path, seed: int = 0) -> dict[str, str]:
    """Build, save and return the paths of the tiny models (a few seconds on a CPU)."""
    import torch
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        Dinov2Config,
        Dinov2Model,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
        SamConfig,
        SamImageProcessor,
        SamModel,
        SamProcessor,
        ViTImageProcessor,
    )


    folder = Path(folder)
    torch.manual_seed(seed)
    clip_std = (0.26862954, 0.26130258, 0.27577711)
    tok = _tokenizer(77)
    paths = {}

    clip = CLIPModel(CLIPConfig(text_config=_text_config(tok, 77), vision_config=_vision_config(), projection_dim=16))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tok)
    paths["clip"] = _save(clip, processor, folder / "clip")

    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                    image_size=32, patch_size=8))
    processor = BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    paths["dinov2"] = _save(dino, processor, folder / "dinov2")

    seg = CLIPSegForImageSegmentation(CLIPSegConfig(
        text_config=_text_config(tok, 77), vision_config=_vision_config(), projection_dim=16, extract_layers=[0, 1],
        reduce_dim=16, decoder_num_attention_heads=2, decoder_intermediate_size=32))
    processor = CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32},
                                                                   image_mean=list(CLIP_MEAN), image_std=list(clip_std)),
                                 tokenizer=tok)
    paths["clipseg"] = _save(seg, processor, folder / "clipseg")

    sam = SamModel(SamConfig(
        vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                           patch_size=8, window_size=4, global_attn_indexes=[1], num_pos_feats=8, mlp_dim=32,
                           initializer_range=0.02),  # the default 1e-10 makes image embeddings ~0
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=16)))
    processor = SamProcessor(SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                               mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16}))
    paths["segmenter"] = _save(sam, processor, folder / "sam")

    owl_tok = _tokenizer(16)
    owl = Owlv2ForObjectDetection(Owlv2Config(text_config=_text_config(owl_tok, 16), vision_config=_vision_config(48),
                                              projection_dim=32))
    with torch.no_grad():  # boxes = the grid's prior boxes (a random box head predicts mostly degenerate ones)
        owl.box_head.dense2.weight.zero_()
        owl.box_head.dense2.bias.zero_()
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}), tokenizer=owl_tok)
    paths["face_detector"] = _save(owl, processor, folder / "owlv2")

    paths["face_model"] = str(save_tiny_facenet(folder / "facenet.pt", seed))
    paths["retinaface"] = str(save_tiny_retinaface(folder / "retinaface.pth", seed))
    paths["arcface"] = str(save_tiny_arcface(folder / "arcface.onnx", seed))
    paths["dreamsim_cache"] = str(save_tiny_dreamsim(folder / "dreamsim", "ensemble", seed))
    return paths


def save_tiny_facenet(path: str | Path, seed: int = 0, divisor: int = 8, depths=(1, 1, 1), dim: int = 32) -> Path:
    """A random ``InceptionResnetV1`` (widths / ``divisor``, ``depths`` blocks, ``dim``-d) saved as a state dict in
    facenet-pytorch's layout. Its batch-norm statistics are those of a batch of random faces (so that activations keep
    their scale through the net and different faces get different embeddings)."""
    import torch

    from .facenet import CROP, InceptionResnetV1

    torch.manual_seed(seed)
    net = InceptionResnetV1(divisor=divisor, depths=tuple(depths), dim=dim)
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the calibration batch
    with torch.no_grad():
        net.train()(torch.randn(8, 3, CROP, CROP))
    net.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def save_tiny_retinaface(path: str | Path, seed: int = 0, backbone: str = "resnet50", width: int = 8,
                         layers=(1, 1, 1, 1), out_channels: int | None = 16, prefix: str = "module.", size: int = 64) -> Path:
    """A random ``RetinaFace`` saved as the PyTorch port saves it (``prefix`` on every key, as DataParallel wrote
    ``Resnet50_Final.pth``). ``backbone="mobilenet0.25"`` is the published MobileNet network at full size
    (``width``, ``layers`` and ``out_channels`` are for the ResNet). Batch-norm statistics are those of random ``size`` x ``size`` images
    (preprocessed as the detector does); the heads are rescaled so that box and landmark offsets have std 0.5 and
    the face probability spreads over (0, 1), a few anchors of each image above 0.8: different images get
    different best faces and scores, as a trained detector's would."""
    import torch

    from .retinaface import MEAN_BGR, RetinaFace

    torch.manual_seed(seed)
    net = RetinaFace(backbone, out_channels if backbone == "resnet50" else None, width=width, layers=tuple(layers))
    batch = torch.rand(8, 3, size, size) * 255 - torch.tensor(MEAN_BGR).view(1, 3, 1, 1)
    seen: dict = {}
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = None  # cumulative average over the calibration batch
        net.train()(batch)
        net.eval()
        heads = [(head.conv1x1, std) for heads, std in ((net.ClassHead, 1.5), (net.BboxHead, 0.5),
                                                        (net.LandmarkHead, 0.5)) for head in heads]
        hooks = [conv.register_forward_hook(lambda m, i, o: seen.update({m: o - m.bias.view(1, -1, 1, 1)}))
                 for conv, _ in heads]
        net(batch)
        for hook in hooks:
            hook.remove()
        for conv, std in heads:
            conv.weight.mul_(std / seen[conv].std())
            conv.bias.zero_()
            if conv.out_channels == 2 * net.anchors:   # face/background logits: mostly background
                conv.bias.copy_(torch.tensor([1.0, -1.0]).repeat(net.anchors))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({prefix + k: v for k, v in net.state_dict().items()}, path)
    return path


def save_tiny_adaface(path: str | Path, seed: int = 0, widths=(4, 8, 12, 16), units=(1, 2, 1, 1), stem: int = 4,
                      dim: int = 16) -> Path:
    """A random AdaFace ``IResNet`` saved as AdaFace's released Lightning checkpoints are: ``{'state_dict':
    {'model.<key>': ..., 'head.kernel': ...}, 'hyper_parameters': <an argparse.Namespace>}`` (an object of a class
    that torch's weights-only loader does not know, as Lightning writes). Batch-norm statistics from random faces."""
    import torch

    from .adaface import SIZE, IResNet

    torch.manual_seed(seed)
    net = IResNet(tuple(widths), tuple(units), stem, dim)
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    with torch.no_grad():
        net.train()(torch.rand(8, 3, SIZE, SIZE) * 2 - 1)
    net.eval()
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    state["head.kernel"] = torch.randn(dim, 5)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "hyper_parameters": argparse.Namespace(arch="ir_101", head="adaface"),
                "epoch": 1}, path)
    return path


def _save(model, processor, path: Path) -> str:
    model.eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def save_tiny_arcface(path: str | Path, seed: int = 0, dim: int = 16) -> Path:
    """An ONNX graph shaped like ArcFace: input ``input.1`` (N, 3, 112, 112) -> conv 8x8/8 -> ReLU -> global mean
    -> linear -> (N, ``dim``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv = rng.normal(0, 0.2, (8, 3, 8, 8)).astype(np.float32)
    linear = rng.normal(0, 0.5, (8, dim)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input.1", "conv_w"], ["c"], kernel_shape=[8, 8], strides=[8, 8]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"], axis=1),
             helper.make_node("MatMul", ["f", "fc_w"], ["embedding"])]
    graph = helper.make_graph(nodes, "tiny_arcface",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])],
                              [numpy_helper.from_array(conv, "conv_w"), numpy_helper.from_array(linear, "fc_w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def save_tiny_scrfd(path: str | Path, seed: int = 0, batched: bool = False, size: int | None = None,
                    score_gain: float = 6.0, score_bias: float = 0.0, score_levels: int = 0) -> Path:
    """An ONNX model shaped like antelopev2's SCRFD (``scrfd.Scrfd``), exported by ``torch.onnx.export``: input
    ``input.1`` (1, 3, H, W) (dynamic H, W unless ``size``), convolutions down to strides 8, 16, 32 and per stride a
    score head (sigmoid, 2 anchors), a box head (4 positive distances per anchor) and a keypoint head (10 offsets);
    9 outputs in insightface's order (scores 8/16/32, boxes 8/16/32, keypoints 8/16/32), each (anchors, k), or (1,
    anchors, k) when ``batched``. ``score_gain`` spreads the random scores over (0, 1), ``score_bias`` shifts them
    (negative: few faces), ``score_levels`` rounds them to multiples of 1 / levels (equal scores)."""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 8, stride=8)
            self.down = nn.ModuleList([nn.Conv2d(8, 8, 3, stride=2, padding=1) for _ in range(2)])
            self.score = nn.ModuleList([nn.Conv2d(8, 2, 3, padding=1) for _ in range(3)])
            self.box = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)])
            self.kps = nn.ModuleList([nn.Conv2d(8, 20, 3, padding=1) for _ in range(3)])

        def forward(self, x):
            feats = [torch.relu(self.stem(x))]
            for down in self.down:
                feats.append(torch.relu(down(feats[-1])))
            flat = lambda t, k: t.permute(0, 2, 3, 1).reshape(1, -1, k) if batched else \
                t.permute(0, 2, 3, 1).reshape(-1, k)  # noqa: E731
            scores = [torch.sigmoid(score_gain * (h(f) - h(f).mean()) + score_bias) for h, f in
                      zip(self.score, feats, strict=True)]
            if score_levels:
                scores = [torch.round(s * score_levels) / score_levels for s in scores]
            scores = [flat(s, 1) for s in scores]
            boxes = [flat(nn.functional.softplus(h(f)) + 0.5, 4) for h, f in zip(self.box, feats, strict=True)]
            points = [flat(h(f), 10) for h, f in zip(self.kps, feats, strict=True)]
            return (*scores, *boxes, *points)

    torch.manual_seed(seed)
    net = Tiny().eval()
    side = size or 640
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)     # the TorchScript exporter: no onnxscript needed
        torch.onnx.export(net, (torch.zeros(1, 3, side, side),), buffer, input_names=["input.1"], output_names=names,
                          dynamic_axes=None if size else {"input.1": {2: "height", 3: "width"}}, opset_version=13,
                          dynamo=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path


def save_tiny_dreamsim(folder: str | Path, kind: str = "ensemble", seed: int = 0, width: int = 128, depth: int = 2,
                       patch: int = 32, proj_dim: int = 24, rank: int = 4, lora_alpha: float = 2.0,
                       lora_scale: float = 0.05) -> Path:
    """DreamSim's cache layout for ``kind`` with tiny random ViTs (``width // 64`` heads, 224x224 input in
    ``patch``-pixel patches): DINO's (DINOv2's, with a larger position grid) backbone as a plain state dict in
    ``checkpoints/``, CLIP/OpenCLIP as
    ``{'state_dict': ..., 'proj'}`` files, and a peft LoRA adapter on every ``qkv`` (``adapter_config.json`` +
    ``adapter_model.safetensors``, keys as peft saves them for the package's model). ``lora_scale=0`` writes a zero
    adapter."""

    import torch
    from safetensors.torch import save_file

    from .dreamsim import BACKBONES, IMAGE_SIZE, TYPES, DreamSimViT, native_to_official

    folder = Path(folder)
    gen = torch.Generator().manual_seed(seed)
    spec = TYPES[kind]
    tokens = (IMAGE_SIZE // patch) ** 2 + 1
    lora = {}
    for index, name in enumerate(spec.backbones):
        backbone = BACKBONES[name]
        vit = DreamSimViT(backbone, width, depth, patch, 2 * width, tokens, proj_dim if backbone.clip_layout else None)
        state = {}
        for key, value in vit.state_dict().items():
            noise = torch.randn(value.shape, generator=gen)
            is_norm_weight = value.ndim == 1 and key.endswith("weight") and "norm" in key or key.startswith("ln_pre.w")
            state[key] = 1 + 0.1 * noise if is_norm_weight else 0.05 * noise
        if backbone.family == "dinov2":  # as the hub model: positions for a larger grid, resized at load
            side = IMAGE_SIZE // patch + 2
            state["pos_embed"] = 0.05 * torch.randn(1, side * side + 1, width, generator=gen)
            state["mask_token"] = torch.zeros(1, width)
        state = native_to_official(state)
        path = folder / backbone.file
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": state} if backbone.clip_layout else state, path)
        for block in range(depth):
            prefix = f"base_model.model.extractor_list.{index}.model.blocks.{block}.attn.qkv"
            lora[f"{prefix}.lora_A.weight"] = lora_scale * torch.randn(rank, width, generator=gen)
            lora[f"{prefix}.lora_B.weight"] = lora_scale * torch.randn(3 * width, rank, generator=gen)
    adapter = folder / spec.adapter
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": lora_alpha, "lora_dropout": 0.0, "bias": "none",
         "target_modules": ["qkv"]}, indent=2))
    save_file({k: v.contiguous() for k, v in lora.items()}, str(adapter / "adapter_model.safetensors"))
    return folder


def save_tiny_grounding_dino(folder: str | Path, seed: int = 0) -> str:
    """A tiny random ``GroundingDinoForObjectDetection`` (Swin backbone of width 8, BERT text model of width 16,
    10 queries) with a BERT tokenizer over a few words and a small image processor, loadable by
    ``from_pretrained``."""
    import torch
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "character", "a", "the"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    backbone = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, image_size=64,
                          out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                                 decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                                 decoder_attention_heads=2, num_queries=10, encoder_n_points=1, decoder_n_points=1,
                                 max_text_len=32, use_timm_backbone=False)
    model = GroundingDinoForObjectDetection(config)
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(
        size={"shortest_edge": 64, "longest_edge": 96}), tokenizer=tok)
    (folder / "vocab.txt").unlink()
    return _save(model, processor, folder)


def save_tiny_csd(path: str | Path, seed: int = 0, width: int = 32, depth: int = 2, patch: int = 56,
                  style_dim: int = 16) -> Path:
    """A CSD checkpoint of the official layout with a tiny random ViT: ``backbone.*`` in OpenAI CLIP's visual names
    (``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.N.*``,
    ``ln_post``), ``last_layer_style`` and ``last_layer_content`` (``width`` x ``style_dim``); 224x224 input in
    ``patch``-pixel patches."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.05: s * torch.randn(*shape, generator=gen)  # noqa: E731
    grid = 224 // patch
    state = {"backbone.conv1.weight": r(width, 3, patch, patch), "backbone.class_embedding": r(width, s=0.5),
             "backbone.positional_embedding": r(grid * grid + 1, width, s=0.5)}
    for name in ("ln_pre", "ln_post"):
        state[f"backbone.{name}.weight"], state[f"backbone.{name}.bias"] = 1 + r(width, s=0.1), r(width)
    for n in range(depth):
        p = f"backbone.transformer.resblocks.{n}."
        state.update({p + "attn.in_proj_weight": r(3 * width, width, s=0.2), p + "attn.in_proj_bias": r(3 * width),
                      p + "attn.out_proj.weight": r(width, width, s=0.2), p + "attn.out_proj.bias": r(width),
                      p + "ln_1.weight": 1 + r(width, s=0.1), p + "ln_1.bias": r(width),
                      p + "ln_2.weight": 1 + r(width, s=0.1), p + "ln_2.bias": r(width),
                      p + "mlp.c_fc.weight": r(4 * width, width, s=0.2), p + "mlp.c_fc.bias": r(4 * width),
                      p + "mlp.c_proj.weight": r(width, 4 * width, s=0.2), p + "mlp.c_proj.bias": r(width)})
    state["last_layer_style"] = r(width, style_dim, s=0.3)
    state["last_layer_content"] = r(width, style_dim, s=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def save_tiny_aesthetic(folder: str | Path, seed: int = 0) -> tuple[str, Path]:
    """A tiny random ``SiglipVisionModel`` (378x378 input in 126-pixel patches, width 32) saved as a folder, and
    an aesthetic predictor v2.5 head of its width (``scoring_head.{0,2,4,6,8}``) saved as ``head.pth``."""
    import torch
    from torch import nn
    from transformers import SiglipVisionConfig, SiglipVisionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                 num_attention_heads=4, image_size=378, patch_size=126))
    tower.eval().save_pretrained(folder / "siglip")
    head = nn.Sequential(nn.Linear(32, 1024), nn.Dropout(0.5), nn.Linear(1024, 128), nn.Dropout(0.5),
                         nn.Linear(128, 64), nn.Dropout(0.5), nn.Linear(64, 16), nn.Dropout(0.2), nn.Linear(16, 1))

    state = OrderedDict((f"scoring_head.{k}", v) for k, v in head.state_dict().items())   # as the released file
    torch.save(state, folder / "head.pth")
    return str(folder / "siglip"), folder / "head.pth"
