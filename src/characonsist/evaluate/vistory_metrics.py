"""ViStoryBench's metrics, computed as its code computes them (github.com/ViStoryBench/vistorybench at 514cc31).

Per story (the official ``bench_run.py`` averages each story's numbers over the stories, ``ResultManager``):

* **CIDS** (``bench/content/cids_evaluator.py``). Detection: GroundingDINO SwinT-OGC with the caption
  "character" (``TEXT_PROMPT``), box threshold 0.25 (``config.yaml``, ``detection.dino.box_threshold``; the text
  threshold only names phrases, unused here); a box's score is its best token probability. Crops: the normalised
  cx, cy, w, h times the image size, truncated to integers, turned into corners, clamped to the image, kept when
  not empty (``crop_img``). References: every ``image/<key>/**/*.jpg``; its best box's crop, or the whole images
  when no reference has one. Encoder by the character's ``tag``: ``realistic_human`` -> faces (their default
  ``face_mix``, ``face_mix.py``: ArcFace, AdaFace and FaceNet, per pair the mean of the models' cosines; ArcFace
  takes the first face found while the detection threshold steps 0.45, 0.35, ... down to 0.1), others -> CLIP ViT-L/14
  ``get_image_features``, unit length. A shot's crops (all boxes, best first) get a (characters x crops) matrix of
  each crop's best cosine to the character's references; Hungarian assignment (``linear_sum_assignment`` on the
  negated matrix); an assigned crop joins its character's crops. Per character: **cross** = mean cosine of its
  crops to its references, **self** = mean over pairs of its crops (1.0 for one crop), both 0 for a character
  never matched; rounded to 4 places; the story's ``cids_cross_mean``/``cids_self_mean`` are the means over all
  the story's characters. **Copy-paste**: per character softmax((cos to the primary reference crop, cos to its
  mirror) / 0.01)[0], averaged over crops, then over matched characters.
* **OCCM** (character count match, same file): per shot with characters, 100 * exp(-|D - E| / (1e-6 + E)),
  E = the shot's character count, D = the boxes detected; the story's value is the mean over its shots.
* **CSD** (``bench/style/csd_evaluator.py``, ``csd/csd_model.py``, ``csd/clip_model.py``): an OpenAI CLIP ViT-L/14
  visual tower, the final-normed CLS token times the style head (``last_layer_style``), unit length. Pixels: RGB
  / 255, resized to 224x224 bicubic with antialiasing (torchvision ``Resize`` on a tensor), CLIP mean/std.
  **self** = mean cosine over all pairs of the story's shots (0.0 below two shots); **cross** = per shot the mean
  cosine to the first reference image (png/jpg, sorted) of each character in it (no character: the story's first
  character with one), averaged over shots.
* **Aesthetic** (``bench/quality/aesthetic_evaluator.py``, ``aesthetic-predictor-v2-5/model.py``): SigLIP
  so400m-patch14-384 vision tower, the pooled embedding at unit length, the v2.5 MLP head (1152-1024-128-64-16-1).
  Pixels: resized to 378x378 (PIL bilinear) and scaled to [0, 1], **without** SigLIP's normalisation (as their
  code); fp16 there (here fp16 on a GPU, float32 on a CPU). The story's score is the mean over its shots.
* **Prompt alignment** (``bench/prompt_align/``): an OpenAI-compatible chat endpoint scores each shot 0-4 on the
  scene (``Setting Description``), the character action (``Static Shot Description``) and the camera (``Shot
  Perspective Design``), the image sent as a 512x512 JPEG data URL; the first "Score: N" of the reply is taken,
  up to 10 tries with the temperature raised by 0.1 each (0 when none); ``single_character_action`` scores each
  matched CIDS crop with the character's name. Only when a key and URL are given.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .checkpoints import load_exactly, read_state_dict, resolve_checkpoint
from .face_mix import ensemble_matrix, similarity_transform, warp_affine
from .models import ArcFaceOnnx, ClipModel, _load, _quiet, _Torch
from .unavailable import ModelUnavailable

GROUNDING_DINO = "IDEA-Research/grounding-dino-tiny"     # transformers' conversion of groundingdino_swint_ogc.pth
CIDS_CLIP = "openai/clip-vit-large-patch14"
PRETRAIN = "ViStoryBench/VistoryBench_pretrain"          # the benchmark's weights on the hub (download_weights.sh)
CSD_FILE = f"{PRETRAIN}:csd/csd_vit-large.pth"
AESTHETIC_URL = "https://github.com/discus0434/aesthetic-predictor-v2-5/raw/main/models/aesthetic_predictor_v2_5.pth"
SIGLIP = "google/siglip-so400m-patch14-384"
ARCFACE_FILE = f"{PRETRAIN}:insightface/models/antelopev2/glintr100.onnx"
BOX_THRESHOLD = 0.25
TEXT_PROMPT = "character"
FACE_THRESHOLDS = (0.45, 0.1, 0.1)       # initial, minimum, step (cids_evaluator.py)
COPY_PASTE_T = 0.01
CSD_SIZE = 224
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
AESTHETIC_SIZE = 378
# insightface's ArcFace alignment template for 112x112 crops (face_align.arcface_dst)
ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                        [70.7299, 92.2041]], dtype=np.float64)
PROMPT_DIMENSIONS = ("scene", "character_action", "camera")
SCORE = re.compile(r"(score|Score):\s*[a-zA-Z]*\s*(\d+)")


def face_thresholds() -> list[float]:
    """The ArcFace detection thresholds tried in turn (``_get_arcface_features``: from 0.45 down by 0.1 while
    >= 0.1, in floating point: 0.45, 0.35, 0.25, 0.15...)."""
    t, low, step = FACE_THRESHOLDS
    out = []
    while t >= low:
        out.append(t)
        t -= step
    return out


# ------------------------------------------------------------------------------------------------------ detection

class GroundingDino(_Torch):
    """GroundingDINO through transformers (``GroundingDinoForObjectDetection``): boxes for a caption."""

    def __init__(self, name: str = GROUNDING_DINO, device: str = "auto"):
        super().__init__(device)
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        with _quiet():
            self.model = _load(GroundingDinoForObjectDetection, name, "GroundingDINO detector").eval().to(self.device)
            self.processor = _load(AutoProcessor, name, "GroundingDINO processor")
        self.name = name

    def describe(self) -> str:
        return (f"GroundingDinoForObjectDetection {self.name}, caption {TEXT_PROMPT + '.'!r}, box score (best token "
                f"probability) > {BOX_THRESHOLD}; processor: shortest side 800, longest 1333, ImageNet normalisation")

    def detect(self, image, caption: str = TEXT_PROMPT, threshold: float = BOX_THRESHOLD):
        """``(boxes, scores)``: normalised (cx, cy, w, h) and scores above ``threshold``, best first (the caption is
        lower-cased and ends with a period, as groundingdino's ``preprocess_caption``)."""
        import torch

        caption = caption.lower().strip()
        caption = caption if caption.endswith(".") else caption + "."
        batch = self.processor(images=image.convert("RGB"), text=caption, return_tensors="pt")
        out = self._run(self.model, **batch)
        probs = out.logits[0].float().sigmoid().cpu()
        boxes = out.pred_boxes[0].float().cpu()
        scores = probs.max(dim=1).values
        keep = scores > threshold
        boxes, scores = boxes[keep], scores[keep]
        order = torch.argsort(scores, descending=True, stable=True)
        return boxes[order], scores[order]


def crop_boxes(image, boxes) -> tuple[list, list[int]]:
    """The crops of normalised (cx, cy, w, h) boxes as ``crop_img`` cuts them (scaled, truncated to integers,
    corners, clamped, empty ones dropped; PIL rounds the corners), and the indices of the boxes kept."""
    import torch

    w, h = image.size
    scaled = (boxes.float() * torch.tensor([w, h, w, h], dtype=torch.float32)).int()
    cx, cy, bw, bh = scaled.unbind(-1)
    corners = torch.stack([cx - 0.5 * bw, cy - 0.5 * bh, cx + 0.5 * bw, cy + 0.5 * bh], dim=-1).numpy()
    crops, kept = [], []
    for k, (x0, y0, x1, y1) in enumerate(corners.tolist()):
        x0, x1 = max(0, min(x0, w)), max(0, min(x1, w))
        y0, y1 = max(0, min(y0, h)), max(0, min(y1, h))
        if x1 > x0 and y1 > y0:
            crops.append(image.crop((x0, y0, x1, y1)))
            kept.append(k)
    return crops, kept


# ------------------------------------------------------------------------------------------------------- encoders

def align_face(image, landmarks, size: int = 112):
    """The face warped so that its 5 landmarks land on ArcFace's template (insightface ``norm_crop``: skimage's
    similarity, then ``cv2.warpAffine(img, M, (112, 112), borderValue=0.0)``, bilinear, black outside), with OpenCV's
    own warp arithmetic (``face_mix.warp_affine``)."""

    m = similarity_transform(np.asarray(landmarks, np.float64), ARCFACE_DST * size / 112.0)
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    return Image.fromarray(warp_affine(rgb, m, (size, size), border=(0, 0, 0)))


class FaceEncoder:
    """ArcFace embeddings of a crop's face: RetinaFace (this project's ``retinaface.py``) finds the face and its 5
    landmarks, the best face whose score reaches one of the stepped thresholds; the face is aligned to ArcFace's
    112x112 template and embedded by the ArcFace ONNX model (antelopev2's ``glintr100.onnx``)."""

    def __init__(self, arcface: str = ARCFACE_FILE, detector: str = "retinaface", device: str = "auto",
                 progress: bool = True):
        from .retinaface import RetinaFaceDetector

        self.embedder = ArcFaceOnnx(str(_checkpoint(arcface, "ArcFace ONNX (antelopev2 glintr100.onnx)", "--arcface",
                                                    "glintr100.onnx", progress)), device)
        self.detector = RetinaFaceDetector(detector, device, threshold=min(face_thresholds()), progress=progress)

    def describe(self) -> str:
        return (f"faces: {self.detector.label}, best face with score >= one of "
                f"{[round(t, 2) for t in face_thresholds()]} tried in turn; 5-point similarity alignment to ArcFace's "
                f"112x112 template; {self.embedder.label}, (x - 127.5) / 127.5, unit length")

    def embed(self, images) -> tuple[np.ndarray | None, list[int]]:
        faces, valid = [], []
        for k, image in enumerate(images):
            found = self.detector.faces([image.convert("RGB")])[0]
            best = found[0] if found else None
            if best is not None and any(best.score >= t for t in face_thresholds()):
                faces.append(align_face(image, best.landmarks))
                valid.append(k)
        if not faces:
            return None, []
        return self.embedder.embed(faces), valid


class ClipEncoder:
    def __init__(self, name: str = CIDS_CLIP, device: str = "auto"):

        self.clip = ClipModel(name, device)

    def describe(self) -> str:
        d = self.clip.describe()
        return f"{d['model']} get_image_features ({d['preprocessing']})"

    def embed(self, images) -> tuple[np.ndarray | None, list[int]]:
        images = [im.convert("RGB") for im in images]
        if not images:
            return None, []
        return self.clip.embed_images(images), list(range(len(images)))


# ------------------------------------------------------------------------------------------------------------ CIDS

@dataclass
class CidsModels:
    detector: object
    clip: object
    face: object | None = None      # None: realistic_human characters are left out (with a note)


def _open(path):

    with Image.open(path) as image:
        return image.convert("RGB")


def _mirror(image):

    return ImageOps.mirror(image)


def _sim(a, b) -> np.ndarray:
    """Cosine matrix of two feature sets: unit arrays (CLIP, ArcFace), or the face mix's per-model dicts (the mean
    of the models' cosines, ``face_mix.ensemble_matrix``)."""
    if isinstance(a, np.ndarray):
        return a @ b.T
    return ensemble_matrix(a, b)


def _twice(feats):
    return np.concatenate([feats, feats]) if isinstance(feats, np.ndarray) else [feats[0], feats[0]]


def cids_story(story, shots: dict[int, Path], models: CidsModels, aligner=None) -> dict:
    """CIDS cross/self, OCCM and copy-paste of one story (``shots``: shot index -> image), as ``CIDSEvaluator``."""
    from scipy.optimize import linear_sum_assignment

    notes: list[str] = []
    encoders = {}
    for key, char in story.characters.items():
        if char.tag == "realistic_human":
            encoders[key] = models.face
            if models.face is None:
                notes.append(f"{key!r} (realistic_human) left out: no face model (pass --arcface glintr100.onnx, "
                             "--adaface or --facenet)")
        else:
            encoders[key] = models.clip
    refs, copy_refs = {}, {}
    for key, char in story.characters.items():
        enc = encoders[key]
        if enc is None:
            continue
        files = char.jpgs
        crops = []
        for file in files:
            image = _open(file)
            boxes, _ = models.detector.detect(image)
            if len(boxes):
                cut, _ = crop_boxes(image, boxes[:1])
                if cut:
                    crops.append(cut[0])
        feats, valid = enc.embed(crops) if crops else (None, [])
        if feats is None:
            crops = [_open(f) for f in files]
            feats, valid = enc.embed(crops) if crops else (None, [])
        if feats is None:
            notes.append(f"{key!r}: no usable reference ({len(files)} .jpg files); character left out")
            continue
        refs[key] = feats
        primary = crops[valid[0]]
        cp, _ = enc.embed([primary, _mirror(primary)])
        if cp is None:
            notes.append(f"{key!r}: no face in the mirrored reference; copy-paste left out")
        else:
            copy_refs[key] = cp if len(cp) == 2 else _twice(cp)
    matched: dict[str, list] = {k: [] for k in story.characters}
    per_shot, occm, single = {}, [], {}
    for shot in story.shots:
        image_path = shots.get(shot.index)
        if image_path is None or not shot.keys:
            continue
        image = _open(image_path)
        expected = len(shot.keys)
        boxes, scores = models.detector.detect(image)
        crops, kept = crop_boxes(image, boxes)
        detected = len(kept)
        occm.append(100 * math.exp(-abs(detected - expected) / (1e-6 + expected)))
        result = {k: {"box": None, "cross_sim": 0.0} for k in shot.keys}
        per_shot[shot.index] = result
        if not crops:
            continue
        sims = np.full((expected, len(crops)), -1e6)
        rows, cache = [False] * expected, {}
        for r, key in enumerate(shot.keys):
            enc = encoders.get(key)
            if enc is None or key not in refs:
                continue
            feats, valid = enc.embed(crops)
            if feats is None:
                continue
            matrix = _sim(feats, refs[key])
            cache[key] = ({c: matrix[i] for i, c in enumerate(valid)}, valid)
            sims[r, valid] = matrix.max(axis=1)
            rows[r] = True
        if not any(rows):
            continue
        if aligner is not None:
            single.setdefault(shot.index, {})     # a shot that reaches matching counts, 0 if nobody is matched
        for r, c in zip(*linear_sum_assignment(-sims), strict=True):   # rows and columns of one assignment
            key = shot.keys[r]
            if not rows[r] or c not in cache[key][1]:
                continue
            box = boxes[kept[c]].tolist()
            result[key] = {"box": [round(v, 3) for v in box], "cross_sim": round(float(cache[key][0][c].mean()), 4)}
            matched[key].append(crops[c])
            if aligner is not None:
                single.setdefault(shot.index, {})[story.characters[key].name] = aligner.single_character(
                    shot, story.characters[key].name, crops[c])
    chars, cp_scores = {}, []
    for key in story.characters:
        crops = matched[key]
        enc = encoders.get(key)
        if not crops or enc is None or key not in refs:
            chars[key] = {"cross": 0.0, "self": 0.0, "matched": len(crops)}
            continue
        feats, _ = enc.embed(crops)
        if feats is None:
            chars[key] = {"cross": 0.0, "self": 0.0, "matched": len(crops)}
            continue
        cross = float(_sim(feats, refs[key]).mean())
        pair = _sim(feats, feats)
        upper = pair[np.triu_indices(len(feats), k=1)]
        chars[key] = {"cross": round(cross, 4), "self": round(float(upper.mean()), 4) if len(feats) > 1 else 1.0,
                      "matched": len(crops)}
        if key in copy_refs:
            two = np.clip(_sim(feats, copy_refs[key]), -1.0, 1.0) / COPY_PASTE_T
            two = np.exp(two - two.max(axis=1, keepdims=True))
            cp_scores.append(float((two[:, 0] / two.sum(axis=1)).mean()))
    scored = {k: v for k, v in chars.items() if encoders.get(k) is not None}
    metrics = {
        "cids_cross_mean": round(sum(v["cross"] for v in scored.values()) / len(scored), 4) if scored else 0.0,
        "cids_self_mean": round(sum(v["self"] for v in scored.values()) / len(scored), 4) if scored else 0.0,
        "copy_paste_score": sum(cp_scores) / len(cp_scores) if cp_scores else 0.0,
        "occm": round(sum(occm) / len(occm), 4) if occm else 0.0,
    }
    if single:
        per_shot_single = [int(round(sum(v.values()) / len(v))) if v else 0 for v in single.values()]
        metrics["single_character_action"] = int(round(sum(per_shot_single) / len(per_shot_single)))
    return {"metrics": metrics, "characters": chars, "shots": per_shot, "notes": notes,
            "single_character_action": single}


# ------------------------------------------------------------------------------------------------------------- CSD

def openai_visual_to_transformers(state: dict, prefix: str) -> dict:
    """An OpenAI CLIP visual tower's state dict (``conv1``, ``class_embedding``, ``transformer.resblocks.N.attn.
    in_proj_weight``, ...) under ``prefix`` in transformers ``CLIPVisionModel`` names."""
    out = {}
    get = lambda k: state[prefix + k]  # noqa: E731
    out["vision_model.embeddings.patch_embedding.weight"] = get("conv1.weight")
    out["vision_model.embeddings.class_embedding"] = get("class_embedding")
    out["vision_model.embeddings.position_embedding.weight"] = get("positional_embedding")
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for p in ("weight", "bias"):
            out[f"vision_model.{ours}.{p}"] = get(f"{theirs}.{p}")
    layers = sorted({int(k[len(prefix):].split(".")[2]) for k in state if k.startswith(prefix + "transformer.resblocks.")})
    for n in layers:
        src, dst = f"transformer.resblocks.{n}.", f"vision_model.encoder.layers.{n}."
        for p in ("weight", "bias"):
            q, k, v = get(f"{src}attn.in_proj_{p}").chunk(3)
            out[f"{dst}self_attn.q_proj.{p}"], out[f"{dst}self_attn.k_proj.{p}"] = q, k
            out[f"{dst}self_attn.v_proj.{p}"] = v
            out[f"{dst}self_attn.out_proj.{p}"] = get(f"{src}attn.out_proj.{p}")
            out[f"{dst}layer_norm1.{p}"] = get(f"{src}ln_1.{p}")
            out[f"{dst}layer_norm2.{p}"] = get(f"{src}ln_2.{p}")
            out[f"{dst}mlp.fc1.{p}"] = get(f"{src}mlp.c_fc.{p}")
            out[f"{dst}mlp.fc2.{p}"] = get(f"{src}mlp.c_proj.{p}")
    return out


class CsdModel(_Torch):
    """CSD (Somepalli et al. 2024) as ViStoryBench loads it: the CLIP ViT visual tower + ``last_layer_style``."""

    def __init__(self, source: str = CSD_FILE, device: str = "auto", progress: bool = True):
        super().__init__(device)
        import torch
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.file = _checkpoint(source, "CSD", "--csd", "csd_vit-large.pth", progress)
        state = _read_csd(self.file)
        width = state["backbone.conv1.weight"].shape[0]
        patch = state["backbone.conv1.weight"].shape[-1]
        grid = round((state["backbone.positional_embedding"].shape[0] - 1) ** 0.5)
        depth = len({k.split(".")[3] for k in state if k.startswith("backbone.transformer.resblocks.")})
        config = CLIPVisionConfig(hidden_size=width, intermediate_size=state[
            "backbone.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], num_hidden_layers=depth,
            num_attention_heads=max(1, width // 64), image_size=grid * patch, patch_size=patch,
            hidden_act="quick_gelu", layer_norm_eps=1e-5)
        self.tower = CLIPVisionModel(config)
        converted = openai_visual_to_transformers(state, "backbone.")
        if not any(k.startswith("vision_model.") for k in self.tower.state_dict()):   # transformers 5 layout
            converted = {k.removeprefix("vision_model."): v for k, v in converted.items()}
        missing, unexpected = self.tower.load_state_dict(converted, strict=False)
        missing = [k for k in missing if "position_ids" not in k]
        if missing or unexpected:
            raise ModelUnavailable(f"{self.file}: not a CSD ViT checkpoint (missing {missing[:3]}, unexpected "
                                   f"{unexpected[:3]})")
        self.tower = self.tower.eval().to(self.device, torch.float32)
        self.style = state["last_layer_style"].float().to(self.device)
        self.label = f"CSD {self.file.name} (ViT width {width}, {depth} blocks, patch {patch})"

    def describe(self) -> str:
        return (f"{self.label}: RGB / 255, resize {CSD_SIZE}x{CSD_SIZE} bicubic antialiased, CLIP mean/std; final-normed "
                "CLS x last_layer_style, unit length; cosine")

    @staticmethod
    def pixels(image):
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None].permute(0, 3, 1, 2)
        x = F.interpolate(x, size=(CSD_SIZE, CSD_SIZE), mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def embed_pixels(self, x):
        import torch

        with torch.inference_mode():
            cls = self.tower(pixel_values=x.to(self.device)).pooler_output
            return torch.nn.functional.normalize(cls @ self.style, dim=-1).float().cpu().numpy()

    def embed(self, images) -> np.ndarray:
        import torch

        return self.embed_pixels(torch.cat([self.pixels(im) for im in images]))


def _read_csd(file: Path) -> dict:
    """CSD's state dict: ``backbone.*`` + ``last_layer_style`` (a ``model_state_dict``/``state_dict`` wrapper and
    DataParallel's ``module.`` prefix, as in CSD's own checkpoints, are removed)."""
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelUnavailable(f"{file}: cannot read a CSD checkpoint ({e}); expected csd_vit-large.pth") from None
    for wrapper in ("model_state_dict", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ModelUnavailable(f"{file}: not a state dict (expected csd_vit-large.pth)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    need = ["backbone.conv1.weight", "backbone.positional_embedding", "last_layer_style"]
    if any(k not in state for k in need):
        raise ModelUnavailable(f"{file}: not a CSD checkpoint (needs {', '.join(need)})")
    return state


def csd_story(story, shots: dict[int, Path], model: CsdModel) -> dict:
    """CSD self and cross of one story, as ``CSDEvaluator``."""
    cache: dict[str, np.ndarray] = {}

    def embed(path: Path) -> np.ndarray:
        key = str(path)
        if key not in cache:
            cache[key] = model.embed([_open(path)])[0]
        return cache[key]

    paths = [shots[k] for k in sorted(shots)]
    pairs = [(a, b) for i, a in enumerate(paths) for b in paths[i + 1:]]
    self_csd = sum(float(embed(a) @ embed(b)) for a, b in pairs) / len(pairs) if pairs else 0.0

    def reference(key=None):
        if key is not None and story.characters.get(key) and story.characters[key].images:
            return story.characters[key].images[0]
        return next((c.images[0] for c in story.characters.values() if c.images), None)

    per_shot = {}
    for shot in story.shots:
        path = shots.get(shot.index)
        if path is None:
            continue
        refs = [r for r in (reference(k) for k in shot.keys) if r is not None] or [r for r in [reference()] if r]
        if not refs:
            continue
        per_shot[shot.index] = sum(float(embed(r) @ embed(path)) for r in refs) / len(refs)
    cross = sum(per_shot.values()) / len(per_shot) if per_shot else 0.0
    return {"metrics": {"self_csd": self_csd, "cross_csd": cross}, "shots": per_shot}


# ------------------------------------------------------------------------------------------------------- aesthetic

class AestheticPredictor(_Torch):
    """Aesthetic predictor v2.5 (discus0434): SigLIP vision tower + MLP head, as ViStoryBench runs it."""

    def __init__(self, head: str = AESTHETIC_URL, encoder: str = SIGLIP, device: str = "auto", progress: bool = True):
        super().__init__(device)
        import torch
        from torch import nn
        from transformers import SiglipVisionModel

        with _quiet():
            self.tower = _load(SiglipVisionModel, encoder, "SigLIP vision model").eval()
        hidden = self.tower.config.hidden_size
        self.head = nn.Sequential(nn.Linear(hidden, 1024), nn.Dropout(0.5), nn.Linear(1024, 128), nn.Dropout(0.5),
                                  nn.Linear(128, 64), nn.Dropout(0.5), nn.Linear(64, 16), nn.Dropout(0.2),
                                  nn.Linear(16, 1))
        self.file = _checkpoint(head, "aesthetic predictor v2.5 head", "--aesthetic", "aesthetic_predictor_v2_5.pth",
                                progress, aliases={"aesthetic-v2.5": AESTHETIC_URL})

        state = read_state_dict(self.file, "aesthetic predictor v2.5 head", "aesthetic_predictor_v2_5.pth")
        state = {k.removeprefix("scoring_head."): v for k, v in state.items()}
        load_exactly(self.head, state, self.file, "the aesthetic predictor v2.5 head (scoring_head.0-8)")
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.tower.to(self.device, self.dtype)
        self.head.eval().to(self.device, self.dtype)
        self.size = AESTHETIC_SIZE       # their transforms.Resize((378, 378)), whatever the config says
        self.encoder = encoder

    def describe(self) -> str:
        return (f"SiglipVisionModel {self.encoder} + {self.file.name}: resize {self.size}x{self.size} (PIL bilinear), "
                f"[0, 1] without normalisation (as ViStoryBench), {str(self.dtype).split('.')[-1]}; pooled embedding "
                "at unit length -> MLP")

    def pixels(self, image):
        import torch

        image = image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]

    def score_pixels(self, x) -> list[float]:
        import torch

        with torch.inference_mode():
            pooled = self.tower(pixel_values=x.to(self.device, self.dtype)).pooler_output
            pooled = pooled / pooled.norm(dim=-1, keepdim=True)
            return [float(v) for v in self.head(pooled).float().cpu().flatten()]

    def score(self, image) -> float:
        return self.score_pixels(self.pixels(image))[0]


def aesthetic_story(shots: dict[int, Path], model: AestheticPredictor) -> dict:
    per = {k: model.score(_open(shots[k])) for k in sorted(shots)}
    return {"metrics": {"aesthetic_score": sum(per.values()) / len(per) if per else 0.0}, "shots": per}


# ------------------------------------------------------------------------------------------------ prompt alignment

# This project's own wording of the four rubrics (same dimensions, 0-4 scale and "Score:" reply as ViStoryBench's
# user_prompts/*.txt; pass --rubrics DIR with their files to use their exact text).
RUBRICS = {
    "scene": "Rate how well the image's setting matches the text (places, objects, weather, light, mood; ignore the "
             "characters). Scale: 0 none of it, 1 a vague match with most details missing or wrong, 2 some of it, 3 "
             "most of it with minor misses, 4 all of it. Reply with a short analysis, then a line 'Score: N'.",
    "character_action": "Rate how well the main character's action in the image matches the text (relevance, "
                        "accuracy of posture and gestures, completeness). Scale: 0 none, 1 weak, 2 partial, 3 mostly, "
                        "4 fully. Reply with a short analysis, then a line 'Score: N'.",
    "camera": "Rate how well the image's shot matches the requested shot distance (long, full, medium long, medium, "
              "close-up, extreme close-up) and camera angle (eye level, low, high, bird's eye, tilted). Scale: 0 "
              "none, 1 a little, 2 partly, 3 mostly, 4 fully. Reply with a short analysis, then a line 'Score: N'.",
    "single_character": "From the text, take the action of the named character; rate how well that character in the "
                        "image performs it. Scale: 0 none, 1 weak, 2 partial, 3 mostly, 4 fully. Reply with a short "
                        "analysis, then a line 'Score: N'.",
}
RUBRIC_FILES = {"scene": "user_prompt_environment_text_align.txt",
                "character_action": "user_prompt_character_text_align.txt",
                "camera": "user_prompt_camera_text_align.txt",
                "single_character": "user_prompt_single_character_text_align.txt"}


class PromptAlignError(RuntimeError):
    """The endpoint could not be used; the message says which URL and why."""


@dataclass
class PromptAligner:
    """Scores through an OpenAI-compatible ``/v1/chat/completions`` endpoint (``gptv_utils.gptv_query``: model,
    max_tokens 512, temperature, messages, seed 123)."""

    base_url: str
    api_key: str
    model: str = "gpt-4.1"
    rubrics: dict = field(default_factory=lambda: dict(RUBRICS))
    timeout: float = 120.0
    attempts: int = 3            # HTTP failures per request before giving up (the benchmark retries forever)
    calls: int = 0

    @classmethod
    def with_rubric_dir(cls, base_url: str, api_key: str, model: str, folder: str | None) -> PromptAligner:
        rubrics = dict(RUBRICS)
        if folder:
            for key, name in RUBRIC_FILES.items():
                path = Path(folder) / name
                try:
                    rubrics[key] = path.read_text(encoding="utf-8", errors="replace")
                except OSError as e:
                    raise PromptAlignError(f"{path}: cannot read the rubric ({e.strerror or e}); --rubrics takes "
                                           "ViStoryBench's bench/prompt_align/user_prompts folder") from None
        return cls(base_url, api_key, model, rubrics)

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        return f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"

    def query(self, messages: list, temperature: float) -> str:
        body = json.dumps({"model": self.model, "max_tokens": 512, "temperature": temperature, "messages": messages,
                           "seed": 123}).encode()
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
        last = ""
        for _ in range(self.attempts):
            self.calls += 1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    data = json.loads(response.read())
                return str(data["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} {e.reason}"
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
                last = str(getattr(e, "reason", e))
        raise PromptAlignError(f"{self.url}: no usable answer after {self.attempts} tries ({last})")

    def score(self, messages: list) -> int:
        temperature = 0.0
        for _ in range(10):
            found = SCORE.findall(self.query(messages, temperature))
            if found:
                return int(found[0][1])
            temperature += 0.1
        return 0

    def shot_scores(self, shot, image_path: Path) -> dict[str, int]:
        image = image_content(_open(image_path))
        texts = {"scene": shot.scene, "character_action": shot.script, "camera": shot.camera}
        return {dim: self.score([{"role": "user", "content": [{"type": "text", "text": self.rubrics[dim]},
                                                               {"type": "text", "text": texts[dim]}, image]}])
                for dim in PROMPT_DIMENSIONS}

    def single_character(self, shot, name: str, crop) -> int:
        return self.score([{"role": "system", "content": [{"type": "text", "text": self.rubrics["single_character"]}]},
                           {"role": "user", "content": [{"type": "text", "text": shot.script},
                                                        {"type": "text", "text": f"Evaluated Character Name is {name}"},
                                                        image_content(crop, detail="low")]}])


def image_content(image, detail: str | None = None) -> dict:
    """An image as the benchmark sends it: resized to 512x512, RGB JPEG, base64 data URL."""
    buffer = io.BytesIO()
    image.resize((512, 512)).convert("RGB").save(buffer, format="JPEG")
    content = {"type": "image_url",
               "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()}}
    if detail:
        content["image_url"]["detail"] = detail
    return content


def prompt_align_story(story, shots: dict[int, Path], aligner: PromptAligner) -> dict:
    per = {}
    for shot in story.shots:
        if shot.index in shots:
            per[shot.index] = aligner.shot_scores(shot, shots[shot.index])
    metrics = {dim: (sum(s[dim] for s in per.values()) / len(per) if per else 0) for dim in PROMPT_DIMENSIONS}
    return {"metrics": metrics, "shots": per}


# ------------------------------------------------------------------------------------------------------- helpers

def _checkpoint(source: str, what: str, flag: str, expected: str, progress: bool, aliases: dict | None = None):

    return resolve_checkpoint(str(source), aliases=aliases or {}, what=what, flag=flag, expected=expected,
                              progress=progress)


def mean_over_stories(results: dict[str, dict]) -> dict[str, float]:
    """Dataset-level numbers: each numeric story metric averaged over the stories that have it
    (``ResultManager._aggregate_story_metrics_mean``)."""
    values: dict[str, list[float]] = {}
    for result in results.values():
        for key, value in (result.get("metrics") or {}).items():
            if isinstance(value, (int, float)):
                values.setdefault(key, []).append(float(value))
    return {k: sum(v) / len(v) for k, v in values.items()}
