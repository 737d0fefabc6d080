"""``characonsist eval convert vistorybench`` and ``characonsist eval --suite vistorybench``.

    characonsist eval convert vistorybench DATASET_DIR --out STORIES_DIR [--lite] [--language en] [--text-only]
    characonsist eval --suite vistorybench --dataset DATASET_DIR --map STORIES_DIR RUN_DIR [RUN_DIR ...]
        [--export OUTPUTS --method NAME]     # our run folders, scored (and written in the benchmark's layout)
    characonsist eval --suite vistorybench --dataset DATASET_DIR OUTPUTS/<method>/<mode>/<lang>/<timestamp>
                                             # a folder already in the benchmark's layout
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..app.folder import write_file
from . import vistory_metrics as vm
from .face_mix import FaceMixEncoder, FacexlibFaces
from .runfolder import RunError, read_run
from .scrfd import SCRFD_FILE, ScrfdArcFace
from .unavailable import ModelUnavailable
from .vistory_metrics import PromptAligner, PromptAlignError, mean_over_stories
from .vistorybench import (
    VistoryError,
    convert_dataset,
    dataset_root,
    export_layout,
    read_map,
    read_story,
    shots_from_layout,
    shots_from_runs,
)

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1
METRICS = ("cids", "csd", "aesthetic", "prompt_align")


def convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="characonsist eval convert vistorybench",
                                description="Convert ViStoryBench stories to story files: one group per story and "
                                            "character, its frames the shots it appears in (docs/EVAL.md).")
    p.add_argument("dataset", metavar="DATASET_DIR", help="the dataset folder (ViStoryBench/ from the hub, or its parent)")
    p.add_argument("--out", required=True, metavar="STORIES_DIR", help="folder for <story_id>.yaml and vistorybench.json")
    p.add_argument("--lite", action="store_true", help="only the 20 stories of ViStoryBench-Lite")
    p.add_argument("--language", choices=("en", "ch"), default="en", help="text language (default: en)")
    p.add_argument("--text-only", action="store_true",
                   help="no identity picture: each character's first shot is its generated identity (the "
                        "leaderboard's CharaConsist setting)")
    p.add_argument("--force", action="store_true", help="replace files the converter did not write")
    return p


def run_convert(argv: list[str]) -> int:

    args = convert_parser().parse_args(argv)
    try:
        written, converted = convert_dataset(args.dataset, args.out, args.lite, args.language, args.text_only,
                                             overwrite=args.force)
    except VistoryError as e:
        print(f"characonsist eval convert vistorybench: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    groups = sum(len(c.scenes) for c in converted)
    frames = sum(len(s["frames"]) for c in converted for s in c.scenes)
    multi = sum("characters (" in n for c in converted for n in c.notes)
    empty = sum("no character; not converted" in n for c in converted for n in c.notes)
    print(f"{Path(args.out)}: {len(converted)} stories, {groups} groups (one per character), {frames} frames; "
          f"identity: {'the first shot (text only)' if args.text_only else 'the reference picture'}")
    print(f"notes: {multi} shots with several characters (a frame in each one's group), {empty} shots without a "
          f"character (not converted); every note is in the story files and {written[-1].name}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--suite vistorybench (docs/EVAL.md, \"ViStoryBench\")")
    g.add_argument("--suite", choices=("paper", "vistorybench"), default="paper",
                   help="paper: the CharaConsist paper's metrics (default); vistorybench: ViStoryBench's")
    g.add_argument("--dataset", metavar="DATASET_DIR", help="the ViStoryBench dataset folder")
    g.add_argument("--map", metavar="STORIES_DIR", help="the converter's --out folder (its vistorybench.json), for "
                                                        "run folders of converted stories")
    g.add_argument("--language", choices=("en", "ch"), help="dataset language (default: the map's, else en)")
    g.add_argument("--vistory-metrics", default=",".join(METRICS), help="comma-separated subset of: %(default)s")
    g.add_argument("--grounding-dino", default="IDEA-Research/grounding-dino-tiny",
                   help="GroundingDINO (transformers) hub id or folder (default: %(default)s, the SwinT-OGC model)")
    g.add_argument("--cids-clip", default="openai/clip-vit-large-patch14", help="CLIP for non-face characters")
    g.add_argument("--arcface", default="ViStoryBench/VistoryBench_pretrain:insightface/models/antelopev2/"
                                        "glintr100.onnx",
                   help="ArcFace ONNX for realistic_human characters (antelopev2's glintr100.onnx); `none`: leave "
                        "them out")
    g.add_argument("--arcface-detector", default=SCRFD_FILE, metavar="SOURCE",
                   help="where ArcFace's faces come from: an SCRFD ONNX (file, URL or owner/repo:file; default: "
                        "antelopev2's scrfd_10g_bnkps.onnx in the benchmark's weights, %(default)s, the detector of "
                        "their insightface FaceAnalysis), or `retinaface`: this project's RetinaFace (--face-detector)")
    g.add_argument("--face-encoder", choices=("mix", "arcface"), default="mix",
                   help="realistic_human characters: mix (their default use_multi_face_encoder: ArcFace, AdaFace and "
                        "FaceNet, cosines averaged) or arcface alone")
    g.add_argument("--adaface", default="ViStoryBench/VistoryBench_pretrain:adaface/adaface_ir101_webface12m.ckpt",
                   help="AdaFace IR-101 checkpoint for the face mix (file, URL or owner/repo:file; default: "
                        "%(default)s); `none`: left out of the mix")
    g.add_argument("--facenet", default="facenet",
                   help="FaceNet VGGFace2 checkpoint for the face mix (default: facenet-pytorch's release of "
                        "20180402-114759-vggface2.pt, the name and format of their facenet/ copy); `none`: left out "
                        "of the mix")
    g.add_argument("--csd", default="ViStoryBench/VistoryBench_pretrain:csd/csd_vit-large.pth",
                   help="CSD checkpoint (file, URL or owner/repo:file; default: %(default)s)")
    g.add_argument("--aesthetic", default="aesthetic-v2.5",
                   help="aesthetic predictor v2.5 head: aesthetic-v2.5 (downloads discus0434's release once), a file")
    g.add_argument("--siglip", default="google/siglip-so400m-patch14-384", help="the aesthetic predictor's encoder")
    g.add_argument("--api-key", help="prompt alignment: the endpoint's key (or VISTORYBENCH_API_KEY); off without it")
    g.add_argument("--base-url", help="prompt alignment: an OpenAI-compatible base URL (or VISTORYBENCH_BASE_URL)")
    g.add_argument("--model-id", default="gpt-4.1", help="prompt alignment: the model (default: %(default)s)")
    g.add_argument("--rubrics", help="prompt alignment: ViStoryBench's bench/prompt_align/user_prompts folder, to use "
                                     "its exact rubric texts (default: this project's wording, same scale)")
    g.add_argument("--export", metavar="OUTPUTS", help="also write the shots in the benchmark's layout under OUTPUTS")
    g.add_argument("--method", default="characonsist", help="with --export: the method folder (default: %(default)s)")
    g.add_argument("--mode", default="base", help="with --export: the mode folder (default: %(default)s)")
    g.add_argument("--timestamp", help="with --export: YYYYMMDD_HHMMSS (default: now)")
    g.add_argument("--export-format", choices=("jpg", "png"), default="jpg", help="with --export (default: jpg)")


def run_suite(args, parser) -> int:

    if not args.dataset:
        parser.error("--suite vistorybench needs --dataset DATASET_DIR")
    inputs = list(args.compare or []) + list(args.runs)
    if not inputs:
        parser.error("give run folders (with --map) or a folder in the benchmark's layout")
    wanted = [m.strip() for m in args.vistory_metrics.split(",") if m.strip()]
    bad = [m for m in wanted if m not in METRICS]
    if bad:
        parser.error(f"--vistory-metrics: unknown {', '.join(bad)} (choose from {', '.join(METRICS)})")
    try:
        root = dataset_root(args.dataset)
        runs = [Path(f) for f in inputs if (Path(f) / "manifest.json").is_file()]
        layouts = [Path(f) for f in inputs if Path(f) not in runs]
        shots: dict = {}
        language = args.language
        if runs:
            if not args.map:
                raise VistoryError("run folders need --map STORIES_DIR (the converter's --out folder)")
            mapping = read_map(args.map)
            language = language or mapping["language"]
            shots.update(shots_from_runs([read_run(f) for f in runs], mapping))
        for folder in layouts:
            if not folder.is_dir():
                raise VistoryError(f"{folder}: no such folder (a run folder or a folder of <story_id>/shot_XX images)")
            found = shots_from_layout(folder)
            if not found:
                raise VistoryError(f"{folder}: neither a run folder (manifest.json) nor the benchmark's layout "
                                   "(<story_id>/shot_XX.png folders)")
            shots.update(found)
        language = language or "en"
        unknown = [s for s in shots if not (root / s / "story.json").is_file()]
        if unknown:
            raise VistoryError(f"{root}: no story {', '.join(unknown)} (the dataset and the images disagree)")
        stories = {s: read_story(root, s, language) for s in sorted(shots, key=int)}
        exported = None
        if args.export:
            exported = export_layout(shots, args.export, args.method, args.mode, language, args.timestamp,
                                     args.export_format)
    except (VistoryError, RunError) as e:
        print(f"characonsist eval: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if exported:
        print(f"written: {exported} ({sum(len(v) for v in shots.values())} shots; "
              f"bench_run.py --method {args.method} --mode {args.mode} --language {language})")
    results, status = {m: {} for m in wanted}, {}
    aligner = _aligner(args, status)
    for name in wanted:
        if name == "prompt_align" and aligner is None:
            continue
        try:
            scorer = _scorer(name, args, aligner)
        except ModelUnavailable as e:
            status[name] = f"skipped: {e}"
            continue
        try:
            for story_id, story in stories.items():
                results[name][story_id] = scorer(story, shots[story_id])
            status[name] = "ok"
        except Exception as e:  # an endpoint or model failing mid-run: the others still report
            if not isinstance(e, PromptAlignError):
                raise
            status[name] = f"failed: {e}"

    overall = {name: mean_over_stories(results[name]) for name in wanted if status.get(name) == "ok"}
    for name in wanted:
        line = status.get(name, "")
        if name in overall:
            values = ", ".join(f"{k} {v:.4f}" for k, v in overall[name].items())
            print(f"{name}: {values} ({len(results[name])} stories)")
        else:
            print(f"{name}: {line}")
    notes = [f"{s}: {n}" for name in ("cids",) for s, r in results.get(name, {}).items() for n in r.get("notes", [])]
    for n in notes[:10]:
        print(f"note: {n}")
    if args.report_dir:

        out = Path(args.report_dir) / "vistorybench.json"
        data = {"format": "characonsist-vistorybench-eval/1", "dataset": str(root), "language": language,
                "status": status, "overall": overall, "stories": results, "notes": notes,
                "export": str(exported) if exported else None}
        out.parent.mkdir(parents=True, exist_ok=True)
        write_file(out, (json.dumps(data, indent=1, default=str, ensure_ascii=False) + "\n").encode())
        print(f"written: {out}")
    if not overall:
        print("characonsist eval: error: no ViStoryBench metric could be computed (see above)", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _aligner(args, status: dict):

    key = args.api_key or os.environ.get("VISTORYBENCH_API_KEY")
    url = args.base_url or os.environ.get("VISTORYBENCH_BASE_URL")
    if not key or not url:
        status["prompt_align"] = "off (needs --api-key and --base-url, or VISTORYBENCH_API_KEY/VISTORYBENCH_BASE_URL)"
        return None
    try:
        return PromptAligner.with_rubric_dir(url, key, args.model_id, args.rubrics)
    except PromptAlignError as e:
        status["prompt_align"] = f"skipped: {e}"
        return None


def _face_mix(arcface, args, detector: str, progress: bool):
    """The face mix of the models that are not ``none`` (None when all are)."""
    from .adaface import AdaFace
    from .facenet import FaceNet

    adaface = None if str(args.adaface).lower() == "none" else AdaFace(args.adaface, args.device, progress)
    facenet = None if str(args.facenet).lower() == "none" else FaceNet(args.facenet, args.device, progress=progress)
    if arcface is None and adaface is None and facenet is None:
        return None
    faces = FacexlibFaces(detector, args.device, progress) if adaface is not None or facenet is not None else None
    return FaceMixEncoder(arcface, adaface, facenet, faces)


def _scorer(name: str, args, aligner):

    progress = not args.quiet
    none = lambda v: None if v is None or str(v).lower() == "none" else v  # noqa: E731
    if name == "cids":
        from .retinaface import is_retinaface_source

        try:
            import scipy.optimize  # noqa: F401  (the Hungarian matching)
        except ImportError:
            raise vm.ModelUnavailable("CIDS needs scipy (linear_sum_assignment): pip install 'characonsist[eval]'") \
                from None

        detector = args.face_detector if is_retinaface_source(str(args.face_detector)) else "retinaface"
        face = None
        if none(args.arcface) and str(args.arcface_detector).lower() == "retinaface":
            face = vm.FaceEncoder(args.arcface, detector, args.device, progress)
        elif none(args.arcface):
            face = ScrfdArcFace(args.arcface, args.arcface_detector, args.device, progress)
        if args.face_encoder == "mix":
            face = _face_mix(face, args, detector, progress)
        models = vm.CidsModels(vm.GroundingDino(args.grounding_dino, args.device), vm.ClipEncoder(args.cids_clip,
                                                                                                   args.device), face)
        return lambda story, shots: vm.cids_story(story, shots, models, aligner)
    if name == "csd":
        model = vm.CsdModel(args.csd, args.device, progress)
        return lambda story, shots: vm.csd_story(story, shots, model)
    if name == "aesthetic":
        model = vm.AestheticPredictor(args.aesthetic, args.siglip, args.device, progress)
        return lambda story, shots: vm.aesthetic_story(shots, model)
    return lambda story, shots: vm.prompt_align_story(story, shots, aligner)
