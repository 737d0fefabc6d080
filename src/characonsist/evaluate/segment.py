"""Foreground masks for CLIP-I-fg / CLIP-I-bg where a run has none of its own.

CharaConsist's paper segments each generated image's foreground with SAM (Segment Anything) and does not say how
SAM was prompted or which size. Here SAM is prompted with one box around the character: OWLv2 (zero-shot, the
detector also available for faces) queried with the image's character text, best box by score; SAM returns three
masks for the box and the one with the highest predicted IoU is kept (logits > 0, at the image's size). An image
where OWLv2 finds no box above the threshold gets no mask, with a note: its pairs are left out of CLIP-I-fg/bg.

Default size: ``facebook/sam-vit-huge``, SAM's own default model (``sam_model_registry["default"]`` is ViT-H in
the segment-anything repository); the paper names no size. ``facebook/sam-vit-base`` is the quick choice
(``--segmenter facebook/sam-vit-base``). CLIPSeg (``--segmenter clipseg``) stays available.
"""

from __future__ import annotations

import numpy as np

from .models import ClipSegSegmenter, Owlv2Detector, _describe_processor, _load, _quiet, _Torch
from .unavailable import ModelUnavailable

DEFAULT_SAM = "facebook/sam-vit-huge"
DEFAULT_CLIPSEG = "CIDAS/clipseg-rd64-refined"
ALIASES = {"sam": DEFAULT_SAM, "clipseg": DEFAULT_CLIPSEG}
KINDS = {"sam": "SAM", "clipseg": "CLIPSeg"}


class SamSegmenter(_Torch):
    """SAM prompted with the OWLv2 box of the character text; the best of SAM's three masks by predicted IoU."""

    def __init__(self, name: str, detector: Owlv2Detector, device: str = "auto", box_threshold: float = 0.1,
                 batch_size: int = 4):
        super().__init__(device)
        from transformers import AutoProcessor, SamModel

        with _quiet():
            self.model = _load(SamModel, name, "SAM model").eval().to(self.device)
            self.processor = _load(AutoProcessor, name, "SAM processor")
        self.name, self.detector, self.box_threshold, self.batch_size = name, detector, box_threshold, batch_size

    def describe(self) -> str:
        return (f"SamModel {self.name} ({_describe_processor(self.processor)}) prompted with one box: "
                f"Owlv2ForObjectDetection {self.detector.name} queried with the character text, best box with score "
                f">= {self.box_threshold}; of SAM's 3 masks the one with the highest predicted IoU, logits > 0 at the "
                "image's size; no box: no mask (the image's pairs left out)")

    def masks(self, images, texts) -> list[np.ndarray | None]:
        return self.segment(images, texts)[0]

    def segment(self, images, texts) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Per image a boolean mask (or None) and a note saying why there is none."""
        images, texts = list(images), list(texts)
        boxes = self.detector.best_boxes(images, texts, self.box_threshold)
        scores = list(self.detector.last_scores)
        masks: list[np.ndarray | None] = [None] * len(images)
        notes: list[str | None] = [None] * len(images)
        found = [k for k, b in enumerate(boxes) if b is not None]
        for k, (box, score, text) in enumerate(zip(boxes, scores, texts, strict=True)):
            if box is None:
                why = (f"best OWLv2 score {score:.3f} < {self.box_threshold}" if score < self.box_threshold
                       else "the best box is under 2 px wide or high")
                notes[k] = f"no box for {text!r} ({why}): no SAM mask, left out of CLIP-I-fg/bg"
        for start in range(0, len(found), self.batch_size):
            chunk = found[start:start + self.batch_size]
            for k, mask in zip(chunk, self._sam([images[k] for k in chunk], [boxes[k][:4] for k in chunk]), strict=True):
                masks[k] = mask
        return masks, notes

    def _sam(self, images, boxes) -> list[np.ndarray]:
        batch = self.processor(images=images, input_boxes=[[list(map(float, b))] for b in boxes], return_tensors="pt")
        sizes, reshaped = batch.pop("original_sizes"), batch.pop("reshaped_input_sizes")
        out = self._run(self.model, **batch, multimask_output=True)
        logits = self.processor.post_process_masks(out.pred_masks.float().cpu(), sizes, reshaped, binarize=False)
        best = out.iou_scores.float().cpu().argmax(dim=-1)  # (images, boxes=1)
        return [(m[0, int(b[0])] > 0).numpy() for m, b in zip(logits, best, strict=True)]

    def _run(self, module, multimask_output: bool = True, **inputs):
        with self.torch.inference_mode():
            return module(**{k: v.to(self.device) for k, v in inputs.items()}, multimask_output=multimask_output)


def segmenter_kind(name: str) -> str:
    """``sam`` or ``clipseg`` for ``--segmenter``: the aliases, else the model type in the folder's/hub's config."""
    if name.lower() in ALIASES:
        return name.lower()
    from transformers import AutoConfig

    with _quiet():
        kind = getattr(_load(AutoConfig, name, "segmenter config"), "model_type", None)
    if kind not in KINDS:
        raise ModelUnavailable(f"--segmenter {name}: a {kind!r} model; expected a SAM (model_type 'sam') or CLIPSeg "
                               "('clipseg') model, or the aliases sam / clipseg")
    return kind


def load_segmenter(name: str, device: str, seg_threshold: float, box_detector, box_threshold: float):
    """The segmenter ``name`` names; ``box_detector()`` gives SAM its OWLv2 detector (only called for SAM)."""
    kind = segmenter_kind(name)
    name = ALIASES.get(name.lower(), name)
    if kind == "clipseg":
        return ClipSegSegmenter(name, device, seg_threshold)
    return SamSegmenter(name, box_detector(), device, box_threshold)
