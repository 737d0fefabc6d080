"""``characonsist bench toy --two-characters``: stories with two characters of different kinds in every image.

Every image of a story (:class:`suite.ToyTwoStory`) is 128 high and 256 wide, one character in each half
(``world.render_two``); :func:`readout.read_pairs` reads each half as a single image. The metrics
(docs/TOY_WORLD.md, "Two characters in one image"):

- identity, per character: a frame's character keeps its identity when its four unnamed attributes all equal
  those of the identity image's character of the same kind. The toy text encoders make the prompt a bag of words,
  so the model cannot know which kind the caption puts on the left: each character is looked up by the kind the
  readout reads, in the half the caption gives it first, else in the other half (:func:`find_kind`); a character
  found in neither half of the frame (or of the identity) is a miss. ``first`` / ``second`` are the characters the
  captions name first and second; ``both``: frames where both keep their identity; per attribute and per mode too;
- adherence, per image (identity included): ``checks.two_character_row``'s scene, kinds (either order), kinds in
  order, actions (either way round), bound (each half's kind with one caption character's action) and all named;
- leak: the share of images whose two characters read the same value of each attribute and of all four, against
  the chance agreement of the attributes' frequencies over every character read (``checks.chance_per_attribute``):
  the two characters have independent identities, so agreement above chance is one identity copied onto the other;
- unsure: characters whose least sure readout field is under 0.9; seconds per story.

The oracle draws each story's two characters, each with its own random identity (independent draws), into every
image: it must read 100% identity and a leak at chance.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..seeds import DEFAULT_SEED, story_seeds
from . import world
from .runner import ORACLE, check_prompt_lengths, method_seeding, parse_method, save_strip
from .scoring import _pct, _ratio, merge_results, to_uint8
from .suite import MODES, ToyTwoStory

ATTRS = tuple(world.ATTRIBUTES)
ADHERENCE = ("all_named", "scene", "kinds", "kinds_in_order", "actions", "bound")   # checks.TWO_ADHERENCE


def find_kind(reads: tuple[dict, dict], kind: str, caption_half: int) -> int | None:
    """The half (0 left, 1 right) of a two-character image whose character reads ``kind``: the caption's half
    ``caption_half`` when it does, else the other half when it does, else None."""
    for h in (caption_half, 1 - caption_half):
        if reads[h]["kind"] == kind:
            return h
    return None


def score_two_story(truth: list, reads: list[tuple[dict, dict]], mode: str | None = None) -> dict:
    """Counts for one two-character story (identity first in ``truth`` and ``reads``, each read a (left, right)
    pair of field dicts); see the module doc."""
    from .checks import two_character_row

    kinds = truth[0][1]
    ident = reads[0]
    ref = [find_kind(ident, k, c) for c, k in enumerate(kinds)]     # identity half of each character
    frames = list(zip(truth[1:], reads[1:], strict=True))
    out: dict = {"frames": len(frames), "images": len(reads), "mode": mode, "identity_found": sum(
        r is not None for r in ref)}
    hits = [0, 0]
    attr_hits = {a: 0 for a in ATTRS}
    both = found = swapped = 0
    for (_, f_kinds, _), pair in frames:
        ok = []
        for c, k in enumerate(kinds):
            h = find_kind(pair, k, list(f_kinds).index(k))
            if h is not None:
                found += 1
                swapped += h != list(f_kinds).index(k)
            if h is None or ref[c] is None:
                ok.append(False)
                continue
            same = {a: pair[h][a] == ident[ref[c]][a] for a in ATTRS}
            for a in ATTRS:
                attr_hits[a] += same[a]
            ok.append(all(same.values()))
            hits[c] += ok[-1]
        both += all(ok)
    rows = [two_character_row(t, r) for t, r in zip(truth, reads, strict=True)]
    out.update(identity_hits=hits, both_hits=both, attribute_hits=attr_hits, kind_found=found, swapped=swapped,
               adherence_hits={k: int(sum(r[k] for r in rows)) for k in ADHERENCE},
               same_hits={a: int(sum(r["same"][a] for r in rows)) for a in ATTRS},
               same_all_four=int(sum(all(r["same"].values()) for r in rows)))
    return out


def aggregate_two(stories: list[dict]) -> dict:
    """Method-level metrics from :func:`score_two_story` records (with ``reads``, ``confidence``, ``seconds``)."""
    from .checks import chance_per_attribute

    ok = [s for s in stories if "error" not in s]
    frames = sum(s["frames"] for s in ok)
    images = sum(s["images"] for s in ok)
    chars = [r for s in ok for pair in s["reads"] for r in pair]
    chance = chance_per_attribute(chars) if chars else {a: float("nan") for a in ATTRS}
    m = {
        "stories": len(stories), "failed": len(stories) - len(ok), "frames": frames, "images": images,
        "identity_consistency": _ratio(sum(sum(s["identity_hits"]) for s in ok), 2 * frames),
        "identity_first": _ratio(sum(s["identity_hits"][0] for s in ok), frames),
        "identity_second": _ratio(sum(s["identity_hits"][1] for s in ok), frames),
        "identity_both": _ratio(sum(s["both_hits"] for s in ok), frames),
        "attribute_agreement": {a: _ratio(sum(s["attribute_hits"][a] for s in ok), 2 * frames) for a in ATTRS},
        "identity_by_mode": {mode: _ratio(sum(sum(s["identity_hits"]) for s in ok if s["mode"] == mode),
                                          2 * sum(s["frames"] for s in ok if s["mode"] == mode)) for mode in MODES},
        "kind_found": _ratio(sum(s["kind_found"] for s in ok), 2 * frames),
        "identity_kind_found": _ratio(sum(s["identity_found"] for s in ok), 2 * len(ok)),
        "swapped": _ratio(sum(s["swapped"] for s in ok), sum(s["kind_found"] for s in ok)),
        "adherence": {k: _ratio(sum(s["adherence_hits"][k] for s in ok), images) for k in ADHERENCE},
        "leak_attribute": {a: _ratio(sum(s["same_hits"][a] for s in ok), images) for a in ATTRS},
        "leak_all_four": _ratio(sum(s["same_all_four"] for s in ok), images),
        "chance_attribute": chance, "chance_all_four": float(np.prod(list(chance.values()))),
        "unsure_reads": _ratio(sum(sum(c < 0.9 for c in s.get("confidence", [])) for s in ok), 2 * images),
        "seconds_per_story": float(np.mean([s["seconds"] for s in ok])) if ok else float("nan"),
    }
    return m


def oracle_two_images(story: ToyTwoStory, seed: int, size: int = 128,
                      characters: dict[str, world.Character] | None = None) -> list[np.ndarray]:
    """The truth: the story's two characters, each with its own random identity drawn from ``seed`` (independent
    draws; or ``characters`` by kind), in every image; a scene keeps its layout within a story."""
    rng = np.random.default_rng(seed)
    chars = characters or {k: world.sample_character(rng, kind=k) for k in story.kinds}
    images = []
    for scene, kinds, actions in story.truth:
        layout = np.random.default_rng([seed, list(world.SCENES).index(scene)])
        images.append(world.render_two(scene, (chars[kinds[0]], chars[kinds[1]]), actions, size=size, rng=layout))
    return images


def run_two_bench(pipe, stories: list[ToyTwoStory], methods: list[str], seed: int = DEFAULT_SEED, height: int = 128,
                  num_inference_steps: int = 20, max_sequence_length: int = 32, log=None, readout_net=None,
                  image_dir: str | Path | None = None, seeding: str = "official", oracle_characters=None,
                  **gen_kwargs) -> dict:
    """Run ``methods`` on two-character ``stories`` at ``height`` x ``2 * height`` with ``pipe`` and score them
    (seeds and conventions as ``bench.run_bench``). ``oracle_characters`` (tests): a function (story) -> {kind:
    Character} the oracle draws instead of its random identities.
    Returns ``{"settings": ..., "methods": {spec: {"method", "options", "seeding", "metrics", "stories"}}}``."""
    from .readout import read_pairs

    width = 2 * height
    conventions = {}
    for spec in methods:
        name, options = parse_method(spec)
        conventions[spec] = method_seeding(name, options.get("seeding", seeding))
    settings = {"seed": seed, "height": height, "width": width, "num_inference_steps": num_inference_steps,
                "max_sequence_length": max_sequence_length, "stories": len(stories), "seeding": conventions,
                "two_characters": True, **gen_kwargs}
    result: dict = {"settings": settings, "methods": {}}
    check_prompt_lengths(pipe, stories, max_sequence_length)
    for spec in methods:
        name, options = parse_method(spec)
        options.pop("seeding", None)
        records = []
        t_method = time.perf_counter()
        for n, story in enumerate(stories):
            s = seed + story.seed
            seeds = story_seeds(s, len(story.images), conventions[spec]) if conventions[spec] else [s]
            t0 = time.perf_counter()
            try:
                if name == ORACLE:
                    chars = oracle_characters(story) if oracle_characters is not None else None
                    images = oracle_two_images(story, s, height, chars)
                else:
                    out = pipe(identity=story.identity, frames=list(story.frames), method=name, seed=seeds,
                               num_inference_steps=num_inference_steps, height=height, width=width,
                               max_sequence_length=max_sequence_length, output_type="np", **gen_kwargs, **options)
                    images = [to_uint8(im) for im in (out.identity, *out.frames)]
            except Exception as e:  # a failing story is reported, the others still count
                records.append({"name": story.name, "mode": story.mode, "error": f"{type(e).__name__}: {e}"})
                if log:
                    log(f"[{spec}] {story.name}: FAILED {type(e).__name__}: {e}")
                continue
            seconds = time.perf_counter() - t0
            if image_dir is not None:
                save_strip(image_dir, spec, story.name, images, axis=0)     # wide images: one above the other
            pairs, conf = read_pairs(images, readout_net, confidence=True)
            rec = score_two_story(story.truth, pairs, story.mode)
            rec.update(name=story.name, seconds=seconds, seed=s, seeds=seeds, reads=[list(p) for p in pairs],
                       prompts=[im.spec() for im in story.images],
                       confidence=[min(c.values()) for pair in conf for c in pair])
            records.append(rec)
            if log:
                log(f"[{spec}] {n + 1}/{len(stories)} {story.name}: identity {rec['identity_hits'][0]}+"
                    f"{rec['identity_hits'][1]}/{2 * rec['frames']}, both {rec['both_hits']}/{rec['frames']} "
                    f"in {seconds:.1f}s")
        metrics = aggregate_two(records)
        metrics["wall_seconds"] = time.perf_counter() - t_method
        result["methods"][spec] = {"method": name, "options": options, "seeding": conventions[spec],
                                   "metrics": metrics, "stories": records}
        if log:
            log(f"[{spec}] done in {metrics['wall_seconds']:.1f}s")
    return result


def merge_two_results(parts: list[dict]) -> dict:
    """One result from those of processes that each ran a contiguous share of the stories
    (``bench.merge_results`` with :func:`aggregate_two`)."""
    return merge_results(parts, aggregate_two)


def format_two_tables(result: dict) -> str:
    """Three aligned tables: identity and adherence, identity by mode and attribute, the leak against chance."""
    names = list(result["methods"])
    w = max([len("method"), *map(len, names)])
    cols = ("identity", "1st", "2nd", "both", "found", "all named", "scene", "kinds", "in order", "actions",
            "bound", "unsure", "s/story", "wall s", "failed")
    head = f"{'method':<{w}}  " + "  ".join(f"{c:>9}" for c in cols)
    lines = [head, "-" * len(head)]
    for n in names:
        m = result["methods"][n]["metrics"]
        a = m["adherence"]
        vals = [_pct(v) for v in (m["identity_consistency"], m["identity_first"], m["identity_second"],
                                  m["identity_both"], m["kind_found"], a["all_named"], a["scene"], a["kinds"],
                                  a["kinds_in_order"], a["actions"], a["bound"], m["unsure_reads"])]
        vals += [f"{m['seconds_per_story']:.2f}", f"{m.get('wall_seconds', float('nan')):.1f}", str(m["failed"])]
        lines.append(f"{n:<{w}}  " + "  ".join(f"{v:>9}" for v in vals))
    cols2 = [*MODES, *ATTRS]
    head2 = f"{'identity by':<{w}}  " + "  ".join(f"{c:>15}" for c in cols2)
    lines += ["", head2, "-" * len(head2)]
    for n in names:
        m = result["methods"][n]["metrics"]
        vals = [m["identity_by_mode"][c] for c in MODES] + [m["attribute_agreement"][a] for a in ATTRS]
        lines.append(f"{n:<{w}}  " + "  ".join(f"{_pct(v):>15}" for v in vals))
    cols3 = [*ATTRS, "all four"]
    head3 = f"{'leak (chance)':<{w}}  " + "  ".join(f"{c:>15}" for c in cols3)
    lines += ["", head3, "-" * len(head3)]
    for n in names:
        m = result["methods"][n]["metrics"]
        pairs = [(m["leak_attribute"][a], m["chance_attribute"][a]) for a in ATTRS]
        pairs.append((m["leak_all_four"], m["chance_all_four"]))
        lines.append(f"{n:<{w}}  " + "  ".join(f"{_pct(v).strip() + ' (' + _pct(c).strip() + ')':>15}"
                                                for v, c in pairs))
    lines.append("(percent; identity = a frame's character whose four unnamed attributes all match the identity "
                 "image's character of the same kind, found by the kind the readout reads (the toy prompt is a bag\n"
                 " of words, so either half may hold either kind); 1st / 2nd = the characters the captions name first "
                 "and second; both = frames where both match; found = frame characters whose kind is read in a half;\n"
                 " adherence over all images: all named = scene and bound, kinds = the caption's two (either order), "
                 "in order = first-named on the left, bound = each half's kind with its own action;\n"
                 " leak = images whose two characters read the same value, against the chance of the attributes' "
                 "frequencies in brackets; unsure = characters whose least sure readout field is under 0.9)")
    return "\n".join(lines)
