"""Story files: the official text format and a structured YAML/TOML story, parsed into groups and checked.

Text format (official ``inference.py``): one ``background#character#action`` prompt per line, a blank line
between groups, the first line of a group is its identity image, the other lines are its frames. The identity may
be a picture of the character: its line ends with ``| path/to/picture.png`` (relative paths are read from the
story file's folder), e.g. ``a sunny park#a girl with a red scarf#standing | me.png``.

Structured format (``.yaml``/``.yml``/``.toml``)::

    characters: {pip: a small red robot}        # optional names usable in `character:`
    defaults: {height: 1024, width: 1024, seed: 2025}   # optional story-wide per-image defaults
    scenes:                                     # one group each
      - name: park                              # optional, names the output folder
        background: a sunny park                # default for the images of this scene
        character: pip
        identity: {action: standing}            # optional: else the first frame is the identity
        # identity: {action: standing, image: me.png}   # the identity is this picture (its caption as above)
        frames:
          - {action: waving, caption: Pip says hello, seed: 7, height: 768, width: 1024}

Every problem is reported with its place (``file:line`` or ``file: scenes[0].frames[1]``), all at once,
before any model is loaded.

Limits (docs/API.md): a story file is at most ``MAX_STORY_BYTES``; YAML aliases (``*name``, and so ``<<: *name``)
are refused while loading (one alias can stand for a whole list, and nested ones for billions of items), as are
duplicate keys and nesting deeper than ``MAX_DEPTH``; every text field (title, scene name, caption, background,
character, action) must be a string without control characters.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .inputs import InputError, control_character, describe_character, excerpt, seed_problem, size_problem, text_problem
from .story import StoryImage

FIELDS = ("background", "character", "action")
IMAGE_KEYS = {*FIELDS, "caption", "seed", "height", "width", "image"}
PICTURE_MARK = "|"   # text format: ``bg#character#action | picture.png`` on a group's first line
SCENE_KEYS = {"name", "background", "character", "action", "identity", "frames", "seed", "height", "width"}
STORY_KEYS = {"title", "characters", "defaults", "scenes"}
STRUCTURED_SUFFIXES = (".yaml", ".yml", ".toml")
MAX_STORY_BYTES = 2 * 2**20   # a story file's size (a 10,000-image story is about 500 KB); the UI's request limit too
MAX_DEPTH = 32                # lists and mappings nested deeper than a story ever needs are refused while parsing


class StoryError(InputError):
    """Bad story input; ``problems`` lists every message (each starts with its place in the file)."""


@dataclass
class Group:
    """One identity and its frames, generated together; ``where`` gives each image's place in the file."""

    name: str
    identity: StoryImage
    frames: list[StoryImage]
    captions: list[str | None]
    where: list[str]
    picture: str | None = None       # the identity's picture file (resolved against the story file's folder)

    @property
    def images(self) -> list[StoryImage]:
        return [self.identity, *self.frames]


@dataclass
class Story:
    path: str
    groups: list[Group]
    title: str | None = None
    format: str = "text"
    extra: dict = field(default_factory=dict)


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe lower-case ASCII form of ``text`` (accents dropped: "Été" -> "ete")."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:limit].strip("-")


def _syntax_error(error: Exception) -> str:
    """One line from a YAML or TOML parser's error: where (line, column) and what, without the multi-line excerpt
    PyYAML prints."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is not None and problem:
        context, start = getattr(error, "context", None), getattr(error, "context_mark", None)
        if context and start is not None:
            context += f" begun at line {start.line + 1}"
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return f"{where}: {problem}" + (f" ({context})" if context else "")
    return " ".join(str(error).split())


def load_story(path: str | Path) -> Story:
    """Parse a story file (format chosen by suffix: .yaml/.yml/.toml structured, anything else text)."""
    path = Path(path)
    if path.is_dir():
        raise StoryError([f"{path}: is a folder, not a story file"])
    if not path.is_file():
        if path.exists():
            raise StoryError([f"{path}: not a regular file (a device, pipe or socket); give a story file"])
        raise StoryError([f"{path}: story file not found"])
    try:
        if path.stat().st_size > MAX_STORY_BYTES:    # a regular file: its size is what reading it costs
            raise StoryError([_too_large(str(path))])
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise StoryError([f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    except OSError as e:
        raise StoryError([f"{path}: cannot read the story file ({e.strerror or e}); check its permissions"]) from None
    if path.suffix.lower() in STRUCTURED_SUFFIXES:
        return parse_structured(text, str(path), toml=path.suffix.lower() == ".toml", base=path.parent)
    return parse_text(text, str(path), base=path.parent)


def _too_large(source: str) -> str:
    return (f"{source}: more than {MAX_STORY_BYTES // 2**20} MiB, the most a story file may be; split it into "
            "several story files")


def _check_size(text: str, source: str) -> None:
    if len(text) > MAX_STORY_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_STORY_BYTES:
        raise StoryError([_too_large(source)])


def _picture_path(value, base: Path | None) -> str:
    """A picture path as written in a story file, resolved against the story file's folder (``base``)."""
    path = Path(str(value).strip()).expanduser()
    return str(path if path.is_absolute() or base is None else base / path)


def _control_problems(text: str, source: str, limit: int = 20) -> list[str]:
    """``file:line:column`` of the control characters of a text story (the first ``limit``)."""
    problems = []
    start = 0
    while len(problems) < limit:
        index = control_character(text[start:], newlines=True)
        if index is None:
            break
        index += start
        line = text.count("\n", 0, index) + 1
        column = index - (text.rfind("\n", 0, index) + 1) + 1
        problems.append(f"{source}:{line}:{column}: {describe_character(text[index])} in the line; remove it "
                        "(story lines may not hold control characters)")
        start = text.find("\n", index) + 1 or len(text)   # one per line
    return problems


def parse_text(text: str, source: str = "<text>", base: str | Path | None = None) -> Story:
    """Parse the official format: ``background#character#action`` lines, blank lines between groups; a group's
    first line may end with ``| picture`` (the identity is that picture; a relative path is read from ``base``)."""
    _check_size(text, source)
    text = text.replace("\r\n", "\n").replace("\r", "\n")   # Windows and old Mac line ends
    problems = _control_problems(text, source)
    if problems:
        raise StoryError(problems)
    blocks: list[list[tuple[int, str]]] = [[]]
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            blocks[-1].append((number, line.strip()))
        elif blocks[-1]:
            blocks.append([])
    blocks = [b for b in blocks if b]
    if not blocks:
        raise StoryError([f"{source}: the story is empty (no background#character#action lines)"])
    groups = []
    base = Path(base) if base is not None else None
    for index, block in enumerate(blocks):
        images, where, picture = [], [], None
        for k, (number, line) in enumerate(block):
            place = f"{source}:{number}"
            line, mark, path = line.partition(PICTURE_MARK)
            if mark and k:
                problems.append(f"{place}: only a group's first line (its identity) may name a picture "
                                f"('{PICTURE_MARK} picture.png'); this is a frame")
            elif mark and not path.strip():
                problems.append(f"{place}: '{PICTURE_MARK}' with no picture after it; write "
                                f"background#character#action {PICTURE_MARK} picture.png")
            elif mark:
                picture = _picture_path(path, base)
            image = _image_from_fields(_split_line(line.strip(), place, problems), {}, place, problems)
            if image is not None:
                images.append(image)
                where.append(place)
        if len(images) == len(block):
            groups.append(Group(f"group_{index:03d}", images[0], images[1:], [None] * len(images), where, picture))
    if problems:
        raise StoryError(problems)
    return Story(source, groups, format="text")


def _split_line(line: str, place: str, problems: list[str]) -> dict | None:
    parts = line.split("#")
    if len(parts) != 3:
        problems.append(f"{place}: {excerpt(line)} has {len(parts) - 1} '#' but needs exactly two: "
                        "background#character#action")
        return None
    return dict(zip(FIELDS, parts, strict=True))


def _image_from_fields(fields: dict | None, extra: dict, place: str, problems: list[str],
                       line_of=None) -> StoryImage | None:
    """Build one StoryImage from its three text fields and optional seed/height/width; report, don't raise.
    ``line_of(name)`` gives the place with the field's line where it is known (YAML)."""
    if fields is None:
        return None
    ok = True
    for name in FIELDS:
        value = fields.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            problems.append(f"{place}: the {name} field is empty (every image needs background, character and action)")
            ok = False
            continue
        problem = text_problem(f"the {name} field", value)
        if problem:
            problems.append(f"{line_of(name) if line_of else place}: {problem}")
            ok = False
    sizes = {}
    for name in ("seed", "height", "width"):
        value = extra.get(name)
        if value is None:
            continue
        problem = seed_problem(name, value) if name == "seed" else size_problem(name, value)
        if problem:
            problems.append(f"{place}: {problem}")
            ok = False
        sizes[name] = value
    if not ok:
        return None
    return StoryImage(*(fields[name].strip() for name in FIELDS), **sizes)


# ---------------------------------------------------------------------------------------------- YAML and TOML

class _Lines:
    """The line of each key of the mappings a YAML story was read into (by the mapping's id; TOML: none)."""

    def __init__(self):
        self.keys: dict[int, dict] = {}
        self.duplicates: list[tuple[int, object, int]] = []   # (line, key, line of the first)

    def of(self, mapping, key) -> int | None:
        lines = self.keys.get(id(mapping))
        try:
            return None if lines is None else lines.get(key)
        except TypeError:
            return None


def _yaml_error(source: str, line: int, text: str) -> StoryError:
    return StoryError([f"{source}:{line}: {text}"])


def _scan(text: str, source: str, base) -> None:
    """Read the YAML events of ``text`` with the parser ``base`` (nothing is built): StoryError at the first alias
    or at nesting deeper than ``MAX_DEPTH``; the parser's own error at a syntax error."""

    scan = base(text)
    try:
        depth = 0
        while scan.check_event():
            event = scan.get_event()
            if isinstance(event, yaml.AliasEvent):
                raise _yaml_error(source, event.start_mark.line + 1, f"YAML alias *{event.anchor} refused: story "
                                  "files may not use aliases (*name, <<: *name), which let a few bytes stand for "
                                  "billions of items; write the value out where it is used")
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise _yaml_error(source, event.start_mark.line + 1, f"lists and mappings nested more than "
                                      f"{MAX_DEPTH} deep; a story needs a few levels")
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
    finally:
        scan.dispose()


def _load_yaml(text: str, source: str) -> tuple[object, _Lines]:
    """The YAML document's data, read in two passes over libyaml's events (the pure-Python parser without it):
    first refuse aliases and nesting deeper than ``MAX_DEPTH`` (nothing is built yet), then build it, noting every
    mapping key's line and refusing duplicate keys."""

    fast = getattr(yaml, "CSafeLoader", None)
    base = fast or yaml.SafeLoader
    try:
        _scan(text, source, base)
    except yaml.YAMLError:
        if fast is None:
            raise
        _scan(text, source, yaml.SafeLoader)   # a syntax error in the pure-Python parser's words (line, column)
        raise
    lines = _Lines()

    class Loader(base):
        def construct_yaml_map(self, node):
            data: dict = {}
            yield data
            if isinstance(node, yaml.MappingNode):
                self.flatten_mapping(node)
            keys: dict = {}
            for key_node, _ in node.value:
                key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                try:
                    if key in keys:
                        lines.duplicates.append((line, key, keys[key]))
                    else:
                        keys[key] = line
                except TypeError:
                    continue      # an unhashable key: construct_mapping says so
            data.update(self.construct_mapping(node))
            lines.keys[id(data)] = keys

    Loader.add_constructor("tag:yaml.org,2002:map", Loader.construct_yaml_map)
    loader = Loader(text)
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    return data, lines


def _type_name(value) -> str:
    return {list: "a list", dict: "a mapping", bool: "true/false", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


def parse_structured(text: str, source: str = "<yaml>", toml: bool = False, base: str | Path | None = None) -> Story:
    """Parse a YAML or TOML story (see the module docstring for the layout and its limits). The identity's
    ``image`` (a picture of the character) is read from ``base`` when relative."""
    _check_size(text, source)
    lines = _Lines()
    try:
        if toml:
            import tomllib

            data = tomllib.loads(text)
        else:
            data, lines = _load_yaml(text, source)
    except StoryError:
        raise
    except RecursionError:
        raise StoryError([f"{source}: not valid {'TOML' if toml else 'YAML'}: nested too deeply (lists and mappings "
                          f"more than {MAX_DEPTH} deep); a story needs a few levels"]) from None
    except Exception as e:  # both libraries raise their own error types
        raise StoryError([f"{source}: not valid {'TOML' if toml else 'YAML'}: {_syntax_error(e)}"]) from None
    if lines.duplicates:
        raise StoryError([f"{source}:{line}: duplicate key {excerpt(key)} (first at line {first}); a key may appear "
                          "once per mapping: keep one" for line, key, first in lines.duplicates])
    if not isinstance(data, dict):
        raise StoryError([f"{source}: the story must be a mapping with a 'scenes' list"])

    def at(place: str, mapping, key) -> str:
        """``place`` (``file`` or ``file: scenes[0]...``) with the key's line where the format keeps lines (YAML):
        ``file:7`` / ``file:7: scenes[0]...``."""
        line = lines.of(mapping, key)
        if line is None:
            return place
        return f"{source}:{line}" + place[len(source):]

    def text_field(mapping, key, place: str, problems: list[str], newlines: bool = True) -> str | None:
        """A text field's value when it is one (None when absent), else a problem with its place and line."""
        value = mapping.get(key)
        if value is None:
            return None
        problem = text_problem(f"'{key}'", value, newlines)
        if problem:
            if not isinstance(value, str):
                problem = f"'{key}' must be text, got {_type_name(value)} {excerpt(value)}" + (
                    f" (quote it: {key}{' =' if toml else ':'} \"{value}\")" if isinstance(value, (int, float)) and
                    not isinstance(value, bool) else "")
            problems.append(f"{at(place, mapping, key)}: {problem}")
            return None
        return value

    problems: list[str] = []
    for key in sorted(set(data) - STORY_KEYS, key=repr):
        problems.append(f"{at(source, data, key)}: unknown key {excerpt(key)} (valid: {', '.join(sorted(STORY_KEYS))})")
    title = text_field(data, "title", source, problems)
    characters = data.get("characters") or {}
    if not isinstance(characters, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in characters.items()):
        problems.append(f"{at(source, data, 'characters')}: 'characters' must map names to descriptions")
        characters = {}
    for name in characters:
        text_field(characters, name, f"{source}: characters", problems)
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) - {"seed", "height", "width"}:
        problems.append(f"{at(source, data, 'defaults')}: 'defaults' may only set seed, height and width")
        defaults = {}
    scenes = data.get("scenes")
    if not isinstance(scenes, list) or not scenes:
        raise StoryError([*problems, f"{at(source, data, 'scenes')}: 'scenes' must be a non-empty list of scenes"])
    groups, names = [], set()
    for s, scene in enumerate(scenes):
        place = f"{source}: scenes[{s}]"
        if not isinstance(scene, dict):
            problems.append(f"{place}: a scene must be a mapping")
            continue
        for key in sorted(set(scene) - SCENE_KEYS, key=repr):
            problems.append(f"{place}: unknown key {excerpt(key)} (valid: {', '.join(sorted(SCENE_KEYS))})")
        scene_name = text_field(scene, "name", place, problems)
        entries = []
        if scene.get("identity") is not None:
            entries.append((f"{place}.identity", scene["identity"]))
        frames = scene.get("frames") or []
        if not isinstance(frames, list):
            problems.append(f"{place}: 'frames' must be a list")
            frames = []
        entries += [(f"{place}.frames[{f}]", frame) for f, frame in enumerate(frames)]
        if not entries:
            problems.append(f"{place}: empty group (no identity and no frames)")
            continue
        inherited = {k: scene[k] for k in ("background", "character", "action", "seed", "height", "width") if k in scene}
        images, captions, where, picture = [], [], [], None
        for k, (image_place, entry) in enumerate(entries):
            if not isinstance(entry, dict):
                problems.append(f"{image_place}: an image must be a mapping with background, character, action")
                continue
            for key in sorted(set(entry) - IMAGE_KEYS, key=repr):
                problems.append(f"{image_place}: unknown key {excerpt(key)} (valid: {', '.join(sorted(IMAGE_KEYS))})")
            if "image" in entry:
                value = entry["image"]
                if k:
                    problems.append(f"{image_place}: only the identity (a scene's 'identity', else its first frame) "
                                    "may have an 'image'")
                elif not isinstance(value, str) or not value.strip():
                    problems.append(f"{image_place}: 'image' must be the path of a picture file, got {excerpt(value)}")
                elif control_character(value, newlines=False) is not None:
                    problems.append(f"{at(image_place, entry, 'image')}: {text_problem(repr('image'), value, False)}")
                else:
                    picture = _picture_path(value, Path(base) if base is not None else None)
            merged = {**defaults, **inherited, **entry}
            if isinstance(merged.get("character"), str):
                merged["character"] = characters.get(merged["character"], merged["character"])
            caption = text_field(entry, "caption", image_place, problems)
            failed = entry.get("caption") is not None and caption is None

            def line_of(name, place=image_place, entry=entry, scene=scene) -> str:
                owner = entry if name in entry else scene if name in scene else None
                return place if owner is None else at(place, owner, name)

            image = _image_from_fields({k: merged.get(k) for k in FIELDS}, merged, image_place, problems, line_of)
            if image is not None and not failed:
                images.append(image)
                captions.append(caption)
                where.append(image_place)
        if len(images) != len(entries):
            continue
        name = f"group_{s:03d}" if not scene_name else f"{s:03d}_{slug(scene_name) or 'scene'}"
        if name in names:
            problems.append(f"{place}: two scenes are named {name!r}")
        names.add(name)
        groups.append(Group(name, images[0], images[1:], captions, where, picture))
    if problems:
        raise StoryError(problems)
    return Story(source, groups, title=title, format="toml" if toml else "yaml")
