"""ViStoryBench's own evaluators' ``evaluate`` against ``vistory_metrics``: CIDS/OCCM/copy-paste, CSD, aesthetic and
prompt alignment, story by story.

Their evaluator imports insightface, groundingdino, facexlib, OpenCV, torchvision and AdaFace at module level; none
installs here, so those imports are stubbed: groundingdino's ``load_image``/``predict`` run the same transformers
GroundingDINO this project uses (its processor, best-token score > box threshold), ``torchvision.ops.box_convert``
is the cxcywh -> xyxy formula. Everything else is their code: reference crops, ``crop_img``, CLIP features
(``get_char_feat`` with transformers' CLIPModel/CLIPProcessor), the per-shot Hungarian matching, cross/self,
OCCM, copy-paste and the story means, reading images through their ``load_outputs`` layout reader (natsort
needed: ``pip install --target DIR natsort`` and put DIR on PYTHONPATH). Tiny random GroundingDINO and CLIP
(``evaluate.tiny``), a synthetic dataset of 3 stories (noise pictures, 1-3 characters per shot, non-human tags:
the face path needs insightface). Compares every story's metrics and per-character cross/self. Then their
``CSDEvaluator`` (torchvision's ``Resize``/``Normalize`` stubbed by the same ``interpolate(bicubic, antialias)`` and
normalisation this project uses) and ``AestheticEvaluator`` (torchvision's PIL ``Resize`` + ``ToTensor`` stubbed by
PIL bilinear + /255; their model built by their ``hubconf`` from the same tiny SigLIP folder and head file) on tiny
random models, and their ``PromptAlignEvaluator`` against a fake endpoint on 127.0.0.1 whose score depends on the
request (rubric, text, image) with this project's aligner given their rubric files (``--rubrics``). Fails above 1e-4.

    PYTHONPATH=src:/tmp/refpkgs python bench/vistorybench_evaluator_reference.py --repo /tmp/vsb
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_data(root: Path, seed: int = 0) -> dict[str, dict[int, Path]]:
    """Dataset in ``root/dataset/ViStory`` and outputs in ``root/outputs/m/base/en/20260101_000000``."""
    rng = np.random.default_rng(seed)
    shots_out: dict[str, dict[int, Path]] = {}
    names = ["Fox", "Bear", "Crow"]
    for sid in ("01", "02", "03"):
        story_dir = root / "dataset" / "ViStory" / sid
        chars = {n: {"name_en": n, "name_ch": n, "prompt_en": f"a {n.lower()}", "prompt_ch": n, "tag": "non_human"}
                 for n in names}
        shots = []
        for index in range(1, 7):
            k = int(rng.integers(1, 4))
            cast = [str(c) for c in rng.choice(names, size=k, replace=False)]
            t = {"en": f"shot {index}", "ch": f"shot {index}"}
            shots.append({"index": index, "Setting Description": t, "Plot Correspondence": t,
                          "Characters Appearing": {"en": cast, "ch": cast}, "Static Shot Description": t,
                          "Shot Perspective Design": t})
        story_dir.mkdir(parents=True)
        (story_dir / "story.json").write_text(json.dumps({"Story_type": {"en": "x", "ch": "x"}, "Characters": chars,
                                                          "Shots": shots}))
        for n in names:
            for r in range(2):
                size = (int(rng.integers(60, 120)), int(rng.integers(60, 120)))
                path = story_dir / "image" / n / f"{r:02d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        out = root / "outputs" / "m" / "base" / "en" / "20260101_000000" / sid
        out.mkdir(parents=True)
        shots_out[sid] = {}
        for index in range(1, 7):
            path = out / f"shot_{index:02d}.png"
            Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(path)
            shots_out[sid][index] = path
    return shots_out


def stub_modules(detector) -> None:
    """Modules their evaluator imports that cannot be installed here."""
    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    def load_image(path):
        image = Image.open(path).convert("RGB")
        return np.asarray(image), image

    def predict(model, image, caption, box_threshold, text_threshold):
        boxes, scores = detector.detect(image, caption, box_threshold)
        return boxes, scores, ["character"] * len(scores)

    def box_convert(boxes, in_fmt, out_fmt):
        assert (in_fmt, out_fmt) == ("cxcywh", "xyxy")
        cx, cy, w, h = boxes.unbind(-1)
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)

    module("insightface", app=types.SimpleNamespace(FaceAnalysis=None))
    module("groundingdino")
    module("groundingdino.util")
    module("groundingdino.util.inference", load_model=None, load_image=load_image, predict=predict,
           annotate=lambda **k: None)
    import torch.nn.functional as F

    class Interp:
        BICUBIC, BILINEAR = "bicubic", "bilinear"

    def resize(size, interpolation="bilinear"):
        def run(x):
            if isinstance(x, Image.Image):       # torchvision's PIL path: PIL's resize, bilinear by default
                return x.resize((size[1], size[0]), Image.BILINEAR)
            return F.interpolate(x, size=tuple(size), mode=interpolation, align_corners=False, antialias=True)
        return run

    def normalize(mean, std):
        return lambda x: (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    def to_tensor():
        return lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)

    def compose(steps):
        def run(x):
            for step in steps:
                x = step(x)
            return x
        return run

    transforms = dict(Compose=compose, Resize=resize, Normalize=normalize, ToTensor=to_tensor,
                      InterpolationMode=Interp)
    module("torchvision", transforms=types.SimpleNamespace(**transforms))
    module("torchvision.ops", box_convert=box_convert)
    module("torchvision.transforms", **transforms)
    module("torchvision.transforms.v2", **transforms)
    module("cv2")
    module("facexlib")
    module("facexlib.utils")
    module("facexlib.utils.face_restoration_helper", FaceRestoreHelper=None)
    module("pandas")
    module("vistorybench.bench.content.AdaFace")
    module("vistorybench.bench.content.AdaFace.inference", load_pretrained_model=None, to_input=None,
           adaface_models={})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True, help="a checkout of github.com/ViStoryBench/vistorybench")
    args = parser.parse_args()
    from characonsist.evaluate import vistory_metrics as vm
    from characonsist.evaluate.tiny import save_tiny_grounding_dino, save_tiny_models
    from characonsist.evaluate.vistorybench import read_story

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip_dir = save_tiny_models(tmp / "models")["clip"]
        detector = vm.GroundingDino(save_tiny_grounding_dino(tmp / "gdino"), "cpu")
        shots = write_data(tmp)
        stub_modules(detector)
        sys.path.insert(0, str(args.repo))
        from transformers import CLIPModel, CLIPProcessor
        from vistorybench.bench.content.cids_evaluator import CIDSEvaluator
        from vistorybench.dataset_loader.dataset_load import StoryDataset

        ev = CIDSEvaluator.__new__(CIDSEvaluator)
        ev.__dict__.update(
            device=torch.device("cpu"), BOX_TRESHOLD=0.25, TEXT_TRESHOLD=0.25, PRE_TEXT_PROMPT={}, ref_mode="origin",
            use_multi_face_encoder=False, ensemble_method="average", superfluous_threshold=0.8, topk_per_nochar=5,
            ensemble_weights={}, cos=torch.nn.functional.cosine_similarity, gpt_api_pkg=(None, "", ""),
            _pa_skip_warned=True, _pa_prompt_path="", dino=object(), clip=CLIPModel.from_pretrained(clip_dir).eval(),
            clip_processor=CLIPProcessor.from_pretrained(clip_dir), arcface=None, face_helper=None, adaface=None,
            facenet=None, story_dataset=StoryDataset(str(tmp / "dataset" / "ViStory")),
            dataset_path=str(tmp / "dataset"), output_path=str(tmp / "outputs"), mode="base", language="en",
            outputs_timestamp=None, result_path=str(tmp / "results"), timestamp="20260101_000001")
        # transformers 5 returns an output object from get_image_features (4.x, which their code expects: the
        # projected tensor, now its pooler_output)
        features = ev.clip.get_image_features
        ev.clip.get_image_features = lambda **kw: features(**kw).pooler_output
        models = vm.CidsModels(detector, vm.ClipEncoder(clip_dir, "cpu"), None)
        # single character action through the same fake endpoint, their rubric file on both sides
        url = start_endpoint()
        rubrics = Path(args.repo) / "vistorybench/bench/prompt_align/user_prompts"
        ev.gpt_api_pkg = ("gpt-4.1", "k", url)
        ev._pa_prompt_path = str(rubrics / "user_prompt_single_character_text_align.txt")
        aligner = vm.PromptAligner.with_rubric_dir(url, "k", "gpt-4.1", str(rubrics))
        worst = 0.0
        for sid in ("01", "02", "03"):
            theirs = ev.evaluate("m", sid)
            ours = vm.cids_story(read_story(tmp / "dataset" / "ViStory", sid), shots[sid], models, aligner)
            diffs = {k: abs(float(theirs["metrics"][k]) - float(ours["metrics"][k])) for k in theirs["metrics"]}
            per_char = max(abs(theirs["cids"][c][s] - ours["characters"][c][s]) for c in theirs["cids"]
                           for s in ("cross", "self"))
            per_shot_theirs = {k: v["single_character_action_char"] for k, v in theirs["detailed_scores"].items()}
            if per_shot_theirs != ours["single_character_action"]:
                print(f"story {sid}: single character action per shot differs: {per_shot_theirs} vs "
                      f"{ours['single_character_action']}")
                worst = 1.0
            worst = max(worst, per_char, *diffs.values())
            print(f"story {sid}: theirs {theirs['metrics']}; ours {ours['metrics']}; max abs difference "
                  f"{max(diffs.values()):.2e}, per character {per_char:.2e}; single character action per shot and "
                  f"character equal ({sum(len(v) for v in per_shot_theirs.values())} scores)")
            worst = max(worst, check_style_quality_prompt(Path(args.repo), tmp, shots[sid], sid, url))
    print("OK" if worst < 1e-4 else "FAILED")
    return 0 if worst < 1e-4 else 1


def start_endpoint() -> str:
    """A fake OpenAI-compatible endpoint on 127.0.0.1: the score is a hash of the whole request (rubric, text,
    image bytes); at temperature 0 a third of the requests get no score (so the retry path runs)."""
    import hashlib
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            digest = hashlib.sha256(json.dumps(data["messages"], sort_keys=True).encode()).digest()
            reply = "Analysis: none" if data["temperature"] == 0 and digest[1] % 3 == 0 else f"Score: {digest[0] % 5}"
            out = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def check_style_quality_prompt(repo: Path, tmp: Path, shots: dict, sid: str, url: str) -> float:
    """Their CSD, aesthetic and prompt-alignment evaluators against ours on story ``sid``."""
    from characonsist.evaluate import vistory_metrics as vm
    from characonsist.evaluate.tiny import save_tiny_aesthetic, save_tiny_csd
    from characonsist.evaluate.vistorybench import read_story

    pretrain = tmp / "pretrain"
    save_tiny_csd(pretrain / "csd" / "csd_vit-large.pth")
    siglip, head = save_tiny_aesthetic(tmp / "aesthetic")
    (pretrain / "aesthetic_predictor").mkdir(parents=True, exist_ok=True)
    (pretrain / "aesthetic_predictor" / "aesthetic_predictor_v2_5.pth").write_bytes(Path(head).read_bytes())
    import shutil

    shutil.copytree(siglip, pretrain / "google" / "siglip-so400m-patch14-384", dirs_exist_ok=True)
    from transformers import SiglipImageProcessor  # their hubconf loads one (unused by their scoring)

    SiglipImageProcessor(size={"height": 378, "width": 378}).save_pretrained(
        pretrain / "google" / "siglip-so400m-patch14-384")
    config = {"core": {"paths": {"dataset": str(tmp / "dataset"), "outputs": str(tmp / "outputs"),
                                 "pretrain": str(pretrain), "results": str(tmp / "results")},
                       "runtime": {"device": "cpu"}}}
    story = read_story(tmp / "dataset" / "ViStory", sid)
    worst = 0.0

    # CSD: their CSD_CLIP cannot read a tiny checkpoint (it builds ViT-L), so their evaluator gets our tiny model
    from vistorybench.bench.style import csd_evaluator

    ours_csd = vm.CsdModel(str(pretrain / "csd" / "csd_vit-large.pth"), "cpu", progress=False)

    class Encoder(torch.nn.Module):
        def forward(self, x):
            return {"style": torch.from_numpy(ours_csd.embed_pixels(x))[:, None]}

    csd_evaluator.load_csd = lambda path: Encoder()
    theirs = csd_evaluator.CSDEvaluator(config, "20260101_000001", "base", "en").evaluate("m", sid)["metrics"]
    ours = vm.csd_story(story, shots, ours_csd)["metrics"]
    diff = max(abs(theirs[k] - ours[k]) for k in ("self_csd", "cross_csd"))
    print(f"CSD story {sid}: theirs {theirs}; ours {ours}; max abs difference {diff:.2e}")
    worst = max(worst, diff)

    # aesthetic: their hub model from the same SigLIP folder and head file, in float32 on the CPU
    from vistorybench.bench.quality import aesthetic_evaluator

    cls = aesthetic_evaluator.AestheticEvaluator
    original = cls.__init__

    def init(self, *a, **k):
        original(self, *a, **k)
        self.torch_dtype = torch.float32
        self.aesthetic_predictor_v2_5 = self.aesthetic_predictor_v2_5.float()

    cls.__init__ = init
    import os

    cwd = os.getcwd()
    os.chdir(repo)                       # their hub path is relative to the repository
    try:
        theirs = cls(config, "20260101_000001", "base", "en").evaluate("m", sid)["metrics"]
    finally:
        os.chdir(cwd)
    model = vm.AestheticPredictor(str(head), siglip, "cpu", progress=False)
    ours = vm.aesthetic_story(shots, model)["metrics"]
    diff = abs(theirs["aesthetic_score"] - ours["aesthetic_score"])
    print(f"aesthetic story {sid}: theirs {theirs}; ours {ours}; max abs difference {diff:.2e}")
    worst = max(worst, diff)

    # prompt alignment: their requests-based client against ours, on the same fake endpoint
    config["cli_args"] = {"api_key": "k", "base_url": url, "model_id": "gpt-4.1"}
    from vistorybench.bench.prompt_align.prompt_align_evaluator import PromptAlignEvaluator

    os.chdir(repo)
    try:
        theirs = PromptAlignEvaluator(config, "20260101_000001", "base", "en").evaluate("m", sid)["metrics"]
    finally:
        os.chdir(cwd)
    aligner = vm.PromptAligner.with_rubric_dir(url, "k", "gpt-4.1",
                                               str(repo / "vistorybench/bench/prompt_align/user_prompts"))
    ours = vm.prompt_align_story(story, shots, aligner)["metrics"]
    diff = max(abs(theirs[k] - ours[k]) for k in vm.PROMPT_DIMENSIONS)
    print(f"prompt alignment story {sid}: theirs {theirs}; ours {ours}; max abs difference {diff:.2e}")
    return max(worst, diff)


if __name__ == "__main__":
    sys.exit(main())
