"""Stories as documents a front end edits: a plain dict (the structured story format's layout, every image
spelled out), to and from story files in the formats the command line reads (YAML, TOML, the official text).

    doc = story_document(load_story("examples/toy-story.yaml"))   # Story -> dict (a web form's state)
    text = dump_story(doc, "yaml")                                # dict -> story file text
    story = parse_story(text, "story.yaml")                       # the command line's own parser

The dict: ``{"title", "character", "scenes": [{"name", "background", "images": [image, ...]}]}``, the first image
of a scene is its identity; an image is ``{"background", "character", "action", "caption", "seed", "height",
"width"}``, and an identity may have ``"image"``: its picture's path as the story file writes it (``image:``, or
``| path`` in the text format; relative to the story file's folder). An image's empty background / character is
the scene's background / the story's character. Writing
goes through ``storyfile``'s parser again, so a document that cannot be a story file gets that parser's
messages, with their places (``story.yaml: scenes[0].frames[1]: ...``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from ..inputs import InputError, text_problem
from ..seeds import DEFAULT_SEED, story_seeds
from ..storyfile import FIELDS, PICTURE_MARK, Story, StoryError, parse_structured, parse_text

FORMATS = ("yaml", "toml", "text")
SUFFIX = {"yaml": ".yaml", "toml": ".toml", "text": ".txt"}
MARK = "# characonsist story"   # first line of the story files a front end writes (whose file is it)
EXTRA = ("caption", "seed", "height", "width")


def format_of(name: str) -> str:
    """The story format a file name implies (as ``storyfile.load_story`` reads it)."""
    suffix = Path(name).suffix.lower()
    return "toml" if suffix == ".toml" else "yaml" if suffix in (".yaml", ".yml") else "text"


def parse_story(text: str, name: str) -> Story:
    """Parse story text by the format its file name implies (StoryError with every problem and its place); an
    identity's picture path is kept as written."""
    fmt = format_of(name)
    return parse_text(text, name) if fmt == "text" else parse_structured(text, name, toml=fmt == "toml")


def scene_name(group_name: str) -> str:
    """The scene name a group folder came from: ``003_night-walk`` -> ``night-walk``, ``group_003`` -> ''."""
    match = re.fullmatch(r"\d{3}_(.+)", group_name)
    return match.group(1) if match else ""


def story_document(story: Story) -> dict:
    """A parsed story as a document (every image spelled out; the story's character set when all share one)."""
    scenes = []
    for group in story.groups:
        images = []
        for image, caption in zip(group.images, group.captions, strict=True):
            images.append({"background": image.background, "character": image.character, "action": image.action,
                           "caption": caption or "", "seed": image.seed, "height": image.height,
                           "width": image.width})
        if group.picture is not None:
            images[0]["image"] = group.picture
        scenes.append({"name": scene_name(group.name), "background": "", "images": images})
    return _factor(story.title or "", scenes)


def _factor(title: str, scenes: list[dict]) -> dict:
    characters = {im["character"] for s in scenes for im in s["images"]}
    character = characters.pop() if len(characters) == 1 else ""
    for scene in scenes:
        backgrounds = {im["background"] for im in scene["images"]}
        if len(backgrounds) == 1:   # one background: the scene's (the rows stay blank)
            scene["background"] = backgrounds.pop()
        for im in scene["images"]:
            if character:
                im["character"] = ""
            if scene["background"] and im["background"] == scene["background"]:
                im["background"] = ""
    return {"title": title, "character": character, "scenes": scenes}


def document_from_manifest(manifest: dict) -> dict:
    """The document of a run folder's story, from its ``manifest.json`` alone (a run of ``characonsist generate``
    opened in a front end): every image as it was generated; seeds and sizes that are the run's own (its seed
    spread by the method's convention, its size) are left to the run, so the same settings give the same groups."""
    from ..methods import method_class

    settings = manifest.get("settings") or {}
    try:
        seeding = method_class(settings.get("method", "characonsist")).seeding
    except ValueError:
        seeding = "shared"
    scenes = []
    for group in manifest.get("groups") or []:
        records = [group["identity"], *group["frames"]]
        spread = story_seeds(int(settings.get("seed", DEFAULT_SEED)), len(records), seeding)
        images = []
        for record, seed in zip(records, spread, strict=True):
            images.append({"background": record["background"], "character": record["character"],
                           "action": record["action"], "caption": record.get("caption") or "",
                           "seed": None if record["seed"] == seed else record["seed"],
                           "height": None if record["height"] == settings.get("height") else record["height"],
                           "width": None if record["width"] == settings.get("width") else record["width"]})
        if (group["identity"].get("picture") or {}).get("path"):
            images[0]["image"] = group["identity"]["picture"]["path"]
        name = group["name"]
        if "/" in name:
            raise InputError(f"group {name!r}: this run folder holds several stories; open one story's run folder")
        scenes.append({"name": scene_name(name), "background": "", "images": images})
    return _factor("", scenes)


def _field(value, place: str, problems: list[str]) -> str:
    """A document's text field (None and absent are ''), stripped; anything else is a problem (never str()-ed)."""
    if value is None:
        return ""
    problem = text_problem(place, value)
    if problem:
        problems.append(f"story: {problem}")
        return ""
    return value.strip()


def structured(doc: dict) -> dict:
    """The document as the structured story format's mapping (identity and frames of each scene, every image
    with its three fields; blank ones inherited from the scene and the story). Every field's type is checked
    first (StoryError with every problem): text fields are strings, nothing is turned into one."""
    if not isinstance(doc, dict) or not isinstance(doc.get("scenes"), list):
        raise StoryError(["story: expected a mapping with a 'scenes' list"])
    problems: list[str] = []
    data: dict = {}
    title = _field(doc.get("title"), "title", problems)
    if title:
        data["title"] = title
    character = _field(doc.get("character"), "character", problems)
    scenes = []
    for s, scene in enumerate(doc["scenes"]):
        if not isinstance(scene, dict) or not isinstance(scene.get("images"), list):
            raise StoryError([f"story: scenes[{s}]: every scene needs an 'images' list"])
        out: dict = {}
        name = _field(scene.get("name"), f"scenes[{s}].name", problems)
        if name:
            out["name"] = name
        background = _field(scene.get("background"), f"scenes[{s}].background", problems)
        images = []
        for i, image in enumerate(scene["images"]):
            place = f"scenes[{s}].images[{i}]"
            if not isinstance(image, dict):
                raise StoryError([f"story: {place}: every image must be a mapping"])
            item = {"background": _field(image.get("background"), f"{place}.background", problems) or background,
                    "character": _field(image.get("character"), f"{place}.character", problems) or character,
                    "action": _field(image.get("action"), f"{place}.action", problems)}
            for key in ("caption", "image"):
                value = _field(image.get(key), f"{place}.{key}", problems)
                if value:
                    item[key] = value
            for key in ("seed", "height", "width"):   # numbers: the story file's parser checks them, with places
                value = image.get(key)
                if value is not None and value != "":
                    item[key] = value.strip() if isinstance(value, str) else value
            images.append(item)
        if images:
            out["identity"] = images[0]
        out["frames"] = images[1:]
        scenes.append(out)
    if problems:
        raise StoryError(problems)
    data["scenes"] = scenes
    return data


def dump_story(doc: dict, fmt: str = "yaml") -> str:
    """The document as story file text in ``fmt`` (yaml, toml or text), checked by the command line's parser."""
    if fmt not in FORMATS:
        raise InputError(f"story format {fmt!r}; valid: {', '.join(FORMATS)}")
    data = structured(doc)
    if fmt == "yaml":
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)
    elif fmt == "toml":
        text = _toml(data)
    else:
        text = _text(data)
    if fmt != "text":
        text = f"{MARK} ({fmt}; `characonsist generate` reads it)\n" + text
    parse_story(text, "story" + SUFFIX[fmt])   # the command line must read back what was written
    return text


def _text(data: dict) -> str:
    """The official text format: one ``background#character#action`` line per image (an identity's picture after
    ``|``), a blank line between groups. It has nothing else: a story with a title, scene names, captions, seeds or
    sizes is refused."""
    lost = sorted({k for s in data["scenes"] for im in [s.get("identity", {}), *s["frames"]] for k in im
                   if k in EXTRA} | ({"title"} if "title" in data else set())
                  | ({"name"} if any("name" in s for s in data["scenes"]) else set()))
    if lost:
        raise InputError(f"the text format has only background#character#action lines; this story also has "
                         f"{', '.join(lost)}: save it as YAML or TOML to keep them")
    blocks = []
    for s, scene in enumerate(data["scenes"]):
        lines = []
        for f, image in enumerate([scene.get("identity"), *scene["frames"]]):
            if image is None:
                continue
            if any(c in image[k] for k in FIELDS for c in ("#", PICTURE_MARK, "\n")):
                place = "identity" if f == 0 else f"frames[{f - 1}]"
                raise InputError(f"scenes[{s}].{place}: a field holds '#', '{PICTURE_MARK}' or a line break, which the "
                                 "text format cannot hold: save it as YAML or TOML")
            line = "#".join(image[k] for k in FIELDS)
            if image.get("image"):
                if "\n" in image["image"]:
                    raise InputError(f"scenes[{s}].identity: the picture's path holds a line break, which the text "
                                     "format cannot hold: save it as YAML or TOML")
                line += f" | {image['image']}"
            lines.append(line)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value), ensure_ascii=False)   # JSON's escapes are TOML basic-string escapes


def _toml(data: dict) -> str:
    lines = [f"title = {_toml_value(data['title'])}", ""] if "title" in data else []
    for scene in data["scenes"]:
        lines.append("[[scenes]]")
        if "name" in scene:
            lines.append(f"name = {_toml_value(scene['name'])}")
        if "identity" in scene:
            lines += ["", "[scenes.identity]"] + [f"{k} = {_toml_value(v)}" for k, v in scene["identity"].items()]
        for frame in scene["frames"]:
            lines += ["", "[[scenes.frames]]"] + [f"{k} = {_toml_value(v)}" for k, v in frame.items()]
        lines.append("")
    return "\n".join(lines)
