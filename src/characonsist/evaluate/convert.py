"""ConsiStory+ (and any story list of its form) to this tool's structured story file.

The source form (1Prompt1Story's ``resource/consistory+.yaml``, MIT): a mapping from a domain name to a list
of sets, or a bare list of sets; each set has ``style`` (e.g. "A photo of"), ``subject`` (e.g. "A dog"),
``settings`` (a list of phrases such as "chasing a frisbee" or "running on a beach") and optionally
``concept_token``. Its generator prompts every image with ``f"{style} {subject} {setting}"``.

This tool's prompts have three fields, ``background#character#action``; the background text drives the
foreground mask and decides which images share a scene. The source does not separate place from action, so the
converter guesses, and reports every guess:

* character = the subject (its leading article lower-cased after a style: "A photo of a dog").
* A setting with a place phrase (from a place preposition such as "in", "on", "at", "under", "near", ... to
  the end; not after "dressed", "wearing", ...) is split there: background = "{style} {place noun phrase},"
  (the preposition dropped: "A photo of a beach,"), action = the words before it. A setting that *is* a place
  phrase ("in a city alley") keeps the whole phrase as its action too (the action may not be empty).
* A setting without a place phrase: background = the style alone; all such images of a set share that
  background text, so the engine treats them as one scene.
* An empty style becomes "A picture of" (the background may not be empty).
* The identity image is the set's first setting, the frames are the rest: a group has exactly the set's images.
* Every image's ``caption`` is the source prompt ``"{style} {subject} {setting}"``; evaluate against it with
  ``characonsist eval --text caption`` to score CLIP-T on the benchmark's own prompts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..app.folder import write_file

MARK = "# characonsist: converted story list"
PLACE_WORDS = ("in front of", "on top of", "next to", "inside", "outside", "under", "underneath", "beneath", "near",
               "beside", "behind", "atop", "among", "amid", "across", "along", "around", "through", "within", "in",
               "on", "at", "by", "over")
NOT_PLACE_BEFORE = {"dressed", "wearing", "clad", "wrapped", "covered", "interested", "skilled", "engaged", "lost",
                    "absorbed", "filled", "painted", "made", "written", "drawn"}
DEFAULT_STYLE = "A picture of"
ARTICLE = re.compile(r"^(A|An|The)\b")
PLACE = re.compile(r"\b(" + "|".join(re.escape(w) for w in PLACE_WORDS) + r")\s+(.+)$", re.IGNORECASE)


class ConvertError(ValueError):
    """Bad source file; the message names the file and the entry."""


@dataclass
class Converted:
    story: dict
    guesses: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)


def read_sets(path: str | Path) -> list[dict]:
    """The sets of a ConsiStory+-form file, each with ``id``, ``style``, ``subject``, ``settings``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        raise ConvertError(f"{path}: not valid YAML ({e})") from None
    if isinstance(data, list):
        domains = [("set", data)]
    elif isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        domains = list(data.items())
    else:
        raise ConvertError(f"{path}: expected a mapping of domain -> list of sets, or a list of sets "
                           "(each with style, subject, settings)")
    sets, problems = [], []
    for domain, entries in domains:
        for index, entry in enumerate(entries):
            place = f"{path}: {domain}[{index}]"
            before = len(problems)
            if not isinstance(entry, dict):
                problems.append(f"{place}: a set must be a mapping with style, subject, settings")
                continue
            subject, style, settings = entry.get("subject"), entry.get("style", ""), entry.get("settings")
            if not isinstance(subject, str) or not subject.strip():
                problems.append(f"{place}: 'subject' must be non-empty text")
            if style is not None and not isinstance(style, str):
                problems.append(f"{place}: 'style' must be text")
            if (not isinstance(settings, list) or len(settings) < 1
                    or not all(isinstance(s, str) and s.strip() for s in settings)):
                problems.append(f"{place}: 'settings' must be a list of non-empty phrases")
            if len(problems) == before:
                sets.append({"id": f"{domain}_{index}", "style": (style or "").strip(), "subject": subject.strip(),
                             "settings": [s.strip() for s in settings], "where": place})
    if problems:
        raise ConvertError("\n".join(problems))
    if not sets:
        raise ConvertError(f"{path}: no sets")
    return sets


def subset(sets: list[dict], limit: int | None, seed: int | None) -> list[dict]:
    """At most ``limit`` sets: the first ones, or a random sample for ``seed`` (kept in file order)."""
    if limit is None or limit >= len(sets):
        return list(sets)
    if limit < 1:
        raise ConvertError("--limit must be at least 1")
    if seed is None:
        return list(sets[:limit])
    keep = sorted(random.Random(seed).sample(range(len(sets)), limit))
    return [sets[k] for k in keep]


def split_setting(setting: str) -> tuple[str, str | None]:
    """``(action, place noun phrase or None)``: "running on a beach" -> ("running", "a beach")."""
    for match in PLACE.finditer(setting):
        before = setting[:match.start()].strip()
        if before and before.split()[-1].lower() in NOT_PLACE_BEFORE:
            continue
        return before, match.group(2).strip()
    return setting, None


def convert_sets(sets: list[dict]) -> Converted:
    scenes, guesses = [], []
    counts = {"sets": len(sets), "images": 0, "split": 0, "place_only": 0, "no_place": 0, "empty_style": 0}
    for entry in sets:
        style = entry["style"]
        if not style:
            counts["empty_style"] += 1
            guesses.append(f"{entry['where']}: empty style; background starts with {DEFAULT_STYLE!r}")
            style = DEFAULT_STYLE
        subject = entry["subject"]
        character = ARTICLE.sub(lambda m: m.group(1).lower(), subject)
        images = []
        for setting in entry["settings"]:
            action, place = split_setting(setting)
            if place is None:
                counts["no_place"] += 1
                background = style
            else:
                background = f"{style} {place},"
                if action:
                    counts["split"] += 1
                    guesses.append(f"{entry['where']}: {setting!r} -> place {place!r}, action {action!r}")
                else:
                    counts["place_only"] += 1
                    action = setting
                    guesses.append(f"{entry['where']}: {setting!r} is only a place; kept as the action too")
            source = " ".join(p for p in (entry["style"], subject, setting) if p)
            images.append({"background": background, "character": character, "action": action, "caption": source})
        counts["images"] += len(images)
        scenes.append({"name": entry["id"], "identity": images[0], "frames": images[1:]})
    return Converted({"title": "converted story list", "scenes": scenes}, guesses, counts)


def write_story(converted: Converted, out: str | Path, source: str | Path, overwrite: bool = False) -> Path:
    """Write the YAML story (refusing to replace a file this converter did not write, unless ``overwrite``)."""
    out = Path(out)
    if out.exists() and not overwrite and not out.read_text(errors="replace").startswith(MARK):
        raise ConvertError(f"{out}: exists and was not written by the converter; choose another --out or pass --force")
    c = converted.counts
    header = [MARK, f"# source: {source}",
              f"# {c['sets']} sets, {c['images']} images; guesses: {c['split']} settings split into place and action, "
              f"{c['place_only']} place-only settings kept as actions, {c['no_place']} without a place (background = "
              f"style), {c['empty_style']} empty styles",
              "# captions hold the source prompts: score CLIP-T on them with `characonsist eval --text caption`"]
    story = dict(converted.story, title=f"converted from {Path(source).name}")
    body = yaml.safe_dump(story, sort_keys=False, allow_unicode=True, width=1000)
    write_file(out, ("\n".join(header) + "\n" + body).encode())
    return out
