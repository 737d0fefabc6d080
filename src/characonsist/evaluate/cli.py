"""``characonsist eval``: the papers' metrics on run folders, side by side, and the benchmark converter.

    characonsist eval RUN_DIR [options]              scores of one run (table, eval.json, CSV, eval.html)
    characonsist eval --compare RUN_A RUN_B ...      several runs side by side (+ papers' reference rows)
    characonsist eval convert BENCH.yaml --out STORY.yaml [--limit N --seed S]
    characonsist eval convert vistorybench DATASET_DIR --out STORIES_DIR [--lite] [--language en] [--text-only]
    characonsist eval --suite vistorybench --dataset DATASET_DIR [--map STORIES_DIR] RUN_DIR ... [--export OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..app.folder import write_file
from .convert import ConvertError, convert_sets, read_sets, subset, write_story
from .evaluator import EVAL_FORMAT, MASK_MODES, TEXT_MODES, EvalConfig, ModelBank, evaluate_run
from .hub import offline_notice
from .metrics import METRICS, PAIR_MODES
from .references import BENCHMARKS, references
from .report import ReportError, check_ours, compare_html, compare_table, terminal_summary, text_table, write_report
from .runfolder import RunError, read_run
from .segment import ALIASES
from .vistory_cli import add_arguments, run_suite
from .vistory_cli import run_convert as run_vistory_convert

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1


def build_parser() -> argparse.ArgumentParser:
    d = EvalConfig()
    p = argparse.ArgumentParser(prog="characonsist eval", description=__doc__.split("\n\n")[0],
                                epilog="`characonsist eval convert --help` for the benchmark converter. "
                                       "Models: hub ids or local folders; `none` switches one off.")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run folder(s) written by `characonsist generate`")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="evaluate several runs and put them side by side")
    p.add_argument("--benchmark", choices=sorted(BENCHMARKS),
                   help="with --compare: add the papers' figures on this prompt set as reference rows")
    p.add_argument("--report-dir", help="where the files go (default: RUN_DIR/eval; with --compare: no files unless set)")
    p.add_argument("--metrics", default=",".join(METRICS), help="comma-separated subset of: %(default)s")
    p.add_argument("--pairs", choices=PAIR_MODES, default=d.pairs,
                   help="identity: identity vs each frame (default); all: every two images of a group")
    p.add_argument("--masks", choices=MASK_MODES, default=d.masks,
                   help="foreground masks for CLIP-I-fg/bg: auto (the run's own where every image has one, else the "
                        "segmenter), method, model")
    p.add_argument("--text", choices=TEXT_MODES, default=d.text,
                   help="CLIP-T text: the prompt (default) or the caption (converted benchmarks hold the source prompt)")
    p.add_argument("--clip", default=d.clip, help="CLIP model (default: %(default)s)")
    p.add_argument("--dinov2", default=d.dinov2, help="DINOv2 model (default: %(default)s)")
    p.add_argument("--segmenter", default=d.segmenter,
                   help=f"masks where the run has none: sam ({ALIASES['sam']}, prompted with the --box-detector box), "
                        f"clipseg ({ALIASES['clipseg']}), or a SAM or CLIPSeg hub id or folder (default: %(default)s)")
    p.add_argument("--box-detector", default=d.box_detector,
                   help="OWLv2 model giving SAM its box, queried with the character text (default: %(default)s)")
    p.add_argument("--face-detector", default=d.face_detector,
                   help="retinaface (RetinaFace ResNet-50, the paper's detector; facexlib's release of the PyTorch "
                        "port's weights, downloaded once), retinaface-mobilenet (MobileNet-0.25), a URL or .pth file "
                        "of those weights, or an OWLv2 hub id or folder (zero-shot 'a photo of a human face') "
                        "(default: %(default)s)")
    p.add_argument("--face-model", default=d.face_model,
                   help="face embedder: facenet (facenet-pytorch's VGGFace2 weights, downloaded once), a URL or .pt "
                        "file of them, or an ArcFace .onnx file, folder with one, or owner/repo:file (needs the "
                        "eval extra) (default: %(default)s)")
    p.add_argument("--dreamsim", default=d.dreamsim,
                   help="DreamSim type of the official package: ensemble, dino_vitb16, clip_vitb32, open_clip_vitb32 "
                        "(default: %(default)s)")
    p.add_argument("--dreamsim-cache", help="the dreamsim package's checkpoint folder (default: ./models when it "
                                            "holds the type's files, else HF_HOME/dreamsim; missing files download)")
    p.add_argument("--seg-threshold", type=float, default=d.seg_threshold, help="CLIPSeg probability threshold")
    p.add_argument("--box-threshold", type=float, default=d.box_threshold,
                   help="OWLv2 score threshold for SAM's character box (default: %(default)s)")
    p.add_argument("--face-threshold", type=float, default=d.face_threshold,
                   help="face score threshold (default: the detector's own: RetinaFace face probability > 0.8 as "
                        "facexlib, OWLv2 score >= 0.3)")
    p.add_argument("--device", default=d.device, help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    add_arguments(p)
    return p


def convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="characonsist eval convert",
                                description="Convert ConsiStory+ (resource/consistory+.yaml of 1Prompt1Story) or any "
                                            "story list of its form to a characonsist story file (YAML).")
    p.add_argument("source", help="the story list (YAML: domain -> [{style, subject, settings}], or a list)")
    p.add_argument("--out", required=True, help="story file to write (.yaml)")
    p.add_argument("--limit", type=int, help="keep at most this many sets")
    p.add_argument("--seed", type=int, help="with --limit: a random subset for this seed (else the first sets)")
    p.add_argument("--show-guesses", action="store_true", help="print every guess, not only the counts")
    p.add_argument("--force", action="store_true", help="replace --out even if the converter did not write it")
    return p


def config_from(args) -> EvalConfig:
    none = lambda v: None if v is None or str(v).lower() == "none" else v  # noqa: E731
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    return EvalConfig(clip=none(args.clip), dinov2=none(args.dinov2), segmenter=none(args.segmenter),
                      box_detector=none(args.box_detector), face_detector=none(args.face_detector),
                      face_model=none(args.face_model), box_threshold=args.box_threshold,
                      dreamsim=none(args.dreamsim), dreamsim_cache=args.dreamsim_cache, device=args.device,
                      pairs=args.pairs, masks=args.masks, text=args.text, seg_threshold=args.seg_threshold,
                      face_threshold=args.face_threshold, metrics=metrics)


def run_convert(argv: list[str]) -> int:

    args = convert_parser().parse_args(argv)
    try:
        sets = read_sets(args.source)
        chosen = subset(sets, args.limit, args.seed)
        converted = convert_sets(chosen)
        out = write_story(converted, args.out, args.source, overwrite=args.force)
    except ConvertError as e:
        print(f"characonsist eval convert: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    c = converted.counts
    print(f"{out}: {c['sets']} of {len(sets)} sets, {c['images']} images")
    print(f"guesses: {c['split']} settings split into place (background) and action; {c['place_only']} place-only "
          f"settings kept as the action too; {c['no_place']} settings without a place (background = style); "
          f"{c['empty_style']} empty styles")
    for line in converted.guesses if args.show_guesses else converted.guesses[:5]:
        print(f"  {line}")
    if not args.show_guesses and len(converted.guesses) > 5:
        print(f"  ... {len(converted.guesses) - 5} more (--show-guesses)")
    print("identity = each set's first setting; captions = the source prompts (use `characonsist eval --text caption`)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["convert", "vistorybench"]:

        return run_vistory_convert(argv[2:])
    if argv and argv[0] == "convert":
        return run_convert(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.suite == "vistorybench":

        return run_suite(args, parser)
    try:
        config = config_from(args)
    except ValueError as e:
        parser.error(str(e))
    folders = list(args.compare or []) + list(args.runs if args.compare else [])
    if not args.compare:
        if len(args.runs) != 1:
            parser.error("give one RUN_DIR (or --compare RUN_A RUN_B ...)")
        folders = args.runs
    if args.benchmark and not args.compare:
        parser.error("--benchmark goes with --compare")
    try:
        runs = [read_run(f) for f in folders]
        if args.report_dir and not args.compare:
            check_ours(Path(args.report_dir))
    except (RunError, ReportError) as e:
        print(f"characonsist eval: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    c = config
    notice = offline_notice({"clip": c.clip, "dinov2": c.dinov2, "segmenter": c.segmenter,
                             "box_detector": c.box_detector, "face_detector": c.face_detector,
                             "face_model": c.face_model, "dreamsim": c.dreamsim_cache or c.dreamsim})
    if notice:   # said at once, before every model waits on the network
        print(f"characonsist eval: {notice}", file=sys.stderr)
    bank = ModelBank(config, progress=not args.quiet)
    results = []
    for run in runs:
        result = evaluate_run(run, config, bank, progress=not args.quiet)
        results.append(result)
        if not args.compare or args.report_dir:
            folder = Path(args.report_dir) / _safe(run.folder.name) if args.compare else Path(args.report_dir or
                                                                                              run.folder / "eval")
            try:
                written = write_report(result, folder, run.folder)
            except ReportError as e:
                print(f"characonsist eval: error: {e}", file=sys.stderr)
                return EXIT_BAD_INPUT
            if not args.compare:
                print(terminal_summary(result))
                print(f"\nwritten: {', '.join(str(p) for p in written)}")
    if not any(m["status"] == "ok" for r in results for m in r["metrics"].values()):
        print("characonsist eval: error: no metric could be computed (see the reasons above: install or pass the "
              "models)", file=sys.stderr)
        return EXIT_FAILED
    if args.compare:
        refs = references(args.benchmark)
        header, rows = compare_table(results, refs)
        notes = _compare_notes(results, refs, args.benchmark)
        print(text_table(rows, header))
        for n in notes:
            print(n)
        if args.report_dir:
            out = Path(args.report_dir)
            data = {"format": EVAL_FORMAT + "+compare", "config": config.to_dict(), "benchmark": args.benchmark,
                    "runs": [{"label": r["run"]["label"], "folder": r["run"]["folder"], "overall": r["overall"],
                              "metrics": r["metrics"]} for r in results], "references": refs, "notes": notes}
            write_file(out / "compare.json", (json.dumps(data, indent=2, default=str) + "\n").encode())
            write_file(out / "compare.csv", "\n".join(",".join(_cell(c) for c in r) for r in [header, *rows]).encode()
                         + b"\n")
            write_file(out / "compare.html", compare_html(header, rows, notes).encode())
            print(f"\nwritten: {out / 'compare.json'}, {out / 'compare.csv'}, {out / 'compare.html'}")
    return 0


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "run"


def _cell(text: str) -> str:
    return f'"{text}"' if "," in text or '"' in text else text


def _compare_notes(results: list[dict], refs: list[dict], benchmark: str | None) -> list[str]:
    notes = []
    for key in METRICS:
        sources = {tuple(r["metrics"].get(key, {}).get("mask_sources", [])) for r in results}
        if key in ("clip_i_fg", "clip_i_bg") and len(sources) > 1:
            notes.append(f"note: {METRICS[key][0]} used different mask sources across runs "
                         f"({', '.join('/'.join(s) or 'none' for s in sorted(sources))}); "
                         "--masks model gives every run the same segmenter")
    missing: dict[tuple, list[str]] = {}
    for r in results:
        for m in r["metrics"].values():
            if m["status"] != "ok":
                missing.setdefault((m["label"], m["status"], m.get("reason", "")), []).append(r["run"]["label"])
    for (label, status, reason), labels in missing.items():
        notes.append(f"{label} {status} for {', '.join(dict.fromkeys(labels))}: {reason}")
    if refs:
        notes.append(f"[paper] rows: {refs[0]['source']}; measured with the paper's own models (CLIP variant not "
                     "stated, SAM masks, RetinaFace + FaceNet), so they place a run, they do not certify it")
    elif benchmark:
        notes.append(f"{benchmark}: {BENCHMARKS[benchmark]['source']}")
    return notes


if __name__ == "__main__":
    sys.exit(main())
