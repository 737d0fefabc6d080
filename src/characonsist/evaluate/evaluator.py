"""``evaluate_run``: every metric of ``metrics.py`` over a run folder, per image, per pair, per group, overall."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from . import metrics as M
from .models import (
    ArcFaceOnnx,
    ClipModel,
    Dinov2,
    DreamSim,
    ModelUnavailable,
    Owlv2Detector,
    Owlv2FaceDetector,
    fill_colour,
)
from .runfolder import EvalGroup, Run, method_mask
from .segment import load_segmenter

EVAL_FORMAT = "characonsist-eval/1"
MASK_MODES = ("auto", "method", "model")
TEXT_MODES = ("prompt", "caption")


@dataclass
class EvalConfig:
    """What to compute and with which models (hub ids or local folders; None switches a model off)."""

    clip: str | None = "openai/clip-vit-large-patch14"
    dinov2: str | None = "facebook/dinov2-base"
    segmenter: str | None = "sam"          # SAM or CLIPSeg: the aliases sam / clipseg (segment.ALIASES), hub id, folder
    box_detector: str | None = "google/owlv2-base-patch16-ensemble"  # SAM's box prompt (character text query)
    face_detector: str | None = "retinaface"  # RetinaFace (retinaface / retinaface-mobilenet / URL / .pth) or OWLv2
    face_model: str | None = "facenet"     # FaceNet (alias, URL or .pt) or ArcFace ONNX (.onnx, folder, owner/repo:file)
    dreamsim: str | None = "ensemble"      # dreamsim_type of the official package
    dreamsim_cache: str | None = None
    device: str = "auto"
    pairs: str = "identity"                # identity | all
    masks: str = "auto"                    # auto: the run's own masks where every image has one, else the segmenter
    text: str = "prompt"                   # CLIP-T text: the prompt, or the caption where there is one
    seg_threshold: float = 0.4
    box_threshold: float = 0.1
    face_threshold: float | None = None    # None: the detector's own (RetinaFace 0.8, OWLv2 0.3)
    metrics: tuple[str, ...] = tuple(M.METRICS)

    def __post_init__(self):
        unknown = [m for m in self.metrics if m not in M.METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; valid: {', '.join(M.METRICS)}")
        for name, value, valid in (("pairs", self.pairs, M.PAIR_MODES), ("masks", self.masks, MASK_MODES),
                                   ("text", self.text, TEXT_MODES)):
            if value not in valid:
                raise ValueError(f"{name}={value!r}: expected one of {', '.join(valid)}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class ModelBank:
    """Loads each model once, on first use, and remembers why one could not be had."""

    config: EvalConfig
    loaded: dict = field(default_factory=dict)
    progress: bool = True        # download bars of the checkpoints fetched by URL (FaceNet, DreamSim)

    def get(self, kind: str):
        if kind not in self.loaded:
            try:
                self.loaded[kind] = self._build(kind)
            except ModelUnavailable as e:
                self.loaded[kind] = e
        value = self.loaded[kind]
        if isinstance(value, ModelUnavailable):
            raise value
        return value

    def _build(self, kind: str):
        c = self.config
        name = {"clip": c.clip, "dinov2": c.dinov2, "segmenter": c.segmenter, "face_detector": c.face_detector,
                "box_detector": c.box_detector, "face_model": c.face_model, "dreamsim": c.dreamsim}[kind]
        if not name or str(name).lower() == "none":
            raise ModelUnavailable(f"no {kind.replace('_', ' ')}: switched off (--{kind.replace('_', '-')} none)")
        if kind == "clip":
            return ClipModel(name, c.device)
        if kind == "dinov2":
            return Dinov2(name, c.device)
        if kind == "segmenter":
            return load_segmenter(name, c.device, c.seg_threshold, lambda: self.get("box_detector"), c.box_threshold)
        if kind == "face_detector":
            from .retinaface import THRESHOLD, RetinaFaceDetector, is_retinaface_source

            if is_retinaface_source(name):
                return RetinaFaceDetector(name, c.device, THRESHOLD if c.face_threshold is None else c.face_threshold,
                                          progress=self.progress)
            return Owlv2FaceDetector(name, c.device, *(() if c.face_threshold is None else (c.face_threshold,)))
        if kind == "box_detector":  # one OWLv2 in memory when faces and boxes use the same model
            if name == c.face_detector:
                shared = self.get("face_detector")
                if isinstance(shared, Owlv2Detector):
                    return shared
            return Owlv2Detector(name, c.device)
        if kind == "face_model":
            from .facenet import FaceNet, is_facenet_source

            return FaceNet(name, c.device, progress=self.progress) if is_facenet_source(name) \
                else ArcFaceOnnx(name, c.device)
        return DreamSim(name, c.dreamsim_cache, c.device, progress=self.progress)


class _Skip(Exception):
    pass


def evaluate_run(run: Run, config: EvalConfig | None = None, bank: ModelBank | None = None,
                 progress: bool = False) -> dict:
    """Scores of ``run`` as a JSON-serialisable dict (see docs/EVAL.md for the layout)."""
    config = config or EvalConfig()
    bank = bank or ModelBank(config)
    info = {key: {"label": M.METRICS[key][0], "higher_is_better": M.METRICS[key][1], "status": "pending",
                  "pairs": None if key == "clip_t" else config.pairs} for key in config.metrics}
    groups = []
    bar = _bar(progress, len(run.groups))
    for group in run.groups:
        groups.append(_evaluate_group(run, group, config, bank, info))
        bar.update(1)
    bar.close()
    overall = {}
    for key in config.metrics:
        means = [g["summary"][key]["mean"] for g in groups if g["summary"].get(key, {}).get("mean") is not None]
        overall[key] = {"mean": M.mean(means), "groups": len(means),
                        "n": sum(g["summary"].get(key, {}).get("n", 0) for g in groups)}
        if isinstance(info[key].get("mask_sources"), set):
            info[key]["mask_sources"] = sorted(info[key]["mask_sources"])
        if info[key]["status"] == "pending":
            info[key]["status"] = "n/a"
            info[key].setdefault("reason", _no_value_reason(key, config))
    notes = list(run.notes) + [f"{g['name']}: {n}" for g in groups for n in g["notes"]]
    return {"format": EVAL_FORMAT, "run": {"folder": str(run.folder), "label": run.label, "method": run.method,
                                           "model": run.model, "settings": run.settings},
            "config": config.to_dict(), "metrics": info, "overall": overall, "groups": groups, "notes": notes}


def _no_value_reason(key: str, config: EvalConfig) -> str:
    return {"clip_i_bg": "no pair of images shares a background text (no fixed-scene pairs)",
            "id_sim": "no pair of images where both have a detected face",
            "clip_i_fg": "no foreground masks"}.get(key, "no image pairs (groups of one image)")


def _evaluate_group(run: Run, group: EvalGroup, config: EvalConfig, bank: ModelBank, info: dict) -> dict:
    images = [im.load() for im in group.images]
    texts = [(im.caption if config.text == "caption" and im.caption else im.prompt) for im in group.images]
    index_pairs = M.pairs(len(images), config.pairs)
    scene = [M.same_scene(group.images[i].background, group.images[j].background) for i, j in index_pairs]
    image_rows = [{"path": im.path, "role": im.role, "prompt": im.prompt, "text": t, "background": im.background,
                   "character": im.character} for im, t in zip(group.images, texts, strict=True)]
    pair_rows = [{"a": group.images[i].path, "b": group.images[j].path, "same_scene": s}
                 for (i, j), s in zip(index_pairs, scene, strict=True)]
    notes = list(group.notes)
    wanted = set(config.metrics)

    def record(key: str, per_pair: list | None = None, per_image: list | None = None):
        rows, values = (pair_rows, per_pair) if per_pair is not None else (image_rows, per_image)
        for row, value in zip(rows, values, strict=True):
            row[key] = value
        if info[key]["status"] == "pending" and any(v is not None for v in values):
            info[key]["status"] = "ok"

    def attempt(keys: set, fn):
        keys = keys & wanted
        if not keys or all(info[k]["status"] == "skipped" for k in keys):
            return
        try:
            fn(keys)
        except ModelUnavailable as e:
            for k in keys:
                info[k].update(status="skipped", reason=str(e))
        except _Skip as e:
            notes.append(str(e))

    def clip_metrics(keys):
        clip = bank.get("clip")
        for k in keys:
            info[k].update(clip.describe(text=k == "clip_t"))
        emb = clip.embed_images(images)
        if "clip_t" in keys:
            record("clip_t", per_image=[float(np.clip(v, -1, 1)) for v in np.sum(emb * clip.embed_texts(texts), axis=1)])
            if clip.truncated:
                info["clip_t"]["truncated_texts"] = clip.truncated
        if "clip_i" in keys:
            record("clip_i", per_pair=M.pair_similarity(emb, index_pairs))
        masked = keys & {"clip_i_fg", "clip_i_bg"}
        if masked:
            try:
                masks, sources, how, mask_notes = _masks(run, group, images, config, bank)
            except ModelUnavailable as e:  # no masks for this group: CLIP-T and CLIP-I stand
                for k in masked:
                    if info[k]["status"] == "ok":  # other groups had masks
                        notes.append(f"{info[k]['label']} not computed: {e}")
                    else:
                        info[k].update(status="skipped", reason=str(e))
                return
            notes.extend(mask_notes)
            for row, source in zip(image_rows, sources, strict=True):
                row["mask_source"] = source
            fill = fill_colour()
            for key, keep in (("clip_i_fg", "fg"), ("clip_i_bg", "bg")):
                if key not in masked:
                    continue
                info[key]["preprocessing"] = (f"{'background' if keep == 'fg' else 'foreground'} replaced by RGB {fill} "
                                              f"(CLIP's mean colour), masks: {how}; then " + clip.describe()["preprocessing"])
                info[key].setdefault("mask_sources", set()).update(s for s in sources if s)
                cut = [None if m is None else M.mask_out(im, m, keep, fill) for im, m in zip(images, masks, strict=True)]
                present = [k for k, c in enumerate(cut) if c is not None]
                embs = [None] * len(images)
                if present:
                    for k, e in zip(present, clip.embed_images([cut[k] for k in present]), strict=True):
                        embs[k] = e
                values = M.pair_similarity(embs, index_pairs)
                if key == "clip_i_bg":
                    values = [v if s else None for v, s in zip(values, scene, strict=True)]
                record(key, per_pair=values)

    def single(key, kind, distance=False):
        def fn(keys):
            model = bank.get(kind)
            info[key].update(model.describe())
            record(key, per_pair=M.pair_similarity(model.embed_images(images), index_pairs, distance=distance))
        return fn

    def faces(keys):
        detector, embedder = bank.get("face_detector"), bank.get("face_model")
        info["id_sim"].update(model=f"detector: {detector.describe()}; embedder: {embedder.label}",
                              preprocessing=embedder.describe())
        boxes = detector.detect(images)
        embs = [None] * len(images)
        found = [k for k, b in enumerate(boxes) if b is not None]
        if found:
            for k, e in zip(found, embedder.embed([embedder.crop(images[k], boxes[k]) for k in found]), strict=True):
                embs[k] = e
        for row, box in zip(image_rows, boxes, strict=True):
            row["face"] = None if box is None else [round(v, 2) for v in box[:4]] + [round(box[4], 4)]
            if getattr(box, "landmarks", None):   # RetinaFace: eyes, nose tip, mouth corners (not used by the crop)
                row["face_landmarks"] = [[round(x, 2), round(y, 2)] for x, y in box.landmarks]
        record("id_sim", per_pair=M.pair_similarity(embs, index_pairs))

    attempt({"clip_t", "clip_i", "clip_i_fg", "clip_i_bg"}, clip_metrics)
    attempt({"dinov2"}, single("dinov2", "dinov2"))
    attempt({"dreamsim"}, single("dreamsim", "dreamsim", distance=True))
    attempt({"id_sim"}, faces)

    summary = {}
    for key in config.metrics:
        rows = image_rows if key == "clip_t" else pair_rows
        summary[key] = M.summary(row.get(key) for row in rows)
    return {"name": group.name, "images": image_rows, "pairs": pair_rows, "summary": summary, "notes": notes}


def _usable(mask) -> bool:
    return mask is not None and 0 < int(mask.sum()) < mask.size


def _masks(run: Run, group: EvalGroup, images, config: EvalConfig, bank: ModelBank):
    """Foreground masks of a group, their source per image, how they were made (for the report) and notes.

    ``auto`` takes the run's own masks when every image of the group has a usable one (not empty, not full),
    else the segmenter's for the whole group (so that a pair is never compared across two mask sources); where
    the segmenter cannot be had, the run's masks where present."""
    own = [method_mask(run, im, image.size) for im, image in zip(group.images, images, strict=True)]
    own = [m if _usable(m) else None for m in own]
    notes = []
    if config.masks == "auto" and not all(m is not None for m in own) and any(m is not None for m in own):
        lacking = [im.path for im, m in zip(group.images, own, strict=True) if m is None]
        notes.append(f"the run's own masks are missing or empty for {', '.join(lacking)}: the segmenter's "
                     "masks are used for the whole group")
    if config.masks == "method" or (config.masks == "auto" and all(m is not None for m in own)):
        return own, ["method" if m is not None else None for m in own], "the method's own (masks/*_mask.png)", notes
    try:
        segmenter = bank.get("segmenter")
    except ModelUnavailable:
        if config.masks == "model" or not any(m is not None for m in own):
            raise
        return own, ["method" if m is not None else None for m in own], "the method's own where present", notes
    texts = [im.character or im.prompt for im in group.images]
    if hasattr(segmenter, "segment"):
        made, why = segmenter.segment(images, texts)
    else:
        made, why = segmenter.masks(images, texts), [None] * len(images)
    for im, m, reason in zip(group.images, made, why, strict=True):
        if reason:
            notes.append(f"{im.path}: {reason}")
        elif m is not None and not _usable(m):
            notes.append(f"{im.path}: the segmenter's mask is {'empty' if not m.any() else 'the whole image'}; "
                         "left out of CLIP-I-fg/bg")
    made = [m if _usable(m) else None for m in made]
    return made, ["model" if m is not None else None for m in made], segmenter.describe(), notes


def _bar(progress: bool, total: int):
    if progress:

        return tqdm(total=total, unit="group", desc="eval", dynamic_ncols=True)

    class _No:
        def update(self, n):
            pass

        def close(self):
            pass

    return _No()
