"""ViStoryBench (Zhuang et al., CVPR 2026; code Apache-2.0 github.com/ViStoryBench/vistorybench, data MIT on the hub
as ``ViStoryBench/ViStoryBench``): reading its dataset, converting its stories to story files, and writing a run in
the layout its scripts read.

Dataset layout (``vistorybench/dataset_loader/dataset_load.py`` at 514cc31): ``<root>/<story_id>/story.json`` and
``<root>/<story_id>/image/<character key>/*.jpg|png``; the root is the hub folder ``ViStoryBench`` (renamed
``ViStory`` under ``data/dataset`` by their README), story ids are digit folder names. ``story.json`` (read as
``utf-8-sig``) holds ``Story_type`` ({en, ch}), ``Characters`` (key -> ``name_en``, ``name_ch``, ``prompt_en``,
``prompt_ch``, ``tag`` in non_human / realistic_human / unrealistic_human, ``num_of_appearances``) and ``Shots``:
``index`` plus ``Setting Description``, ``Plot Correspondence``, ``Characters Appearing``, ``Static Shot
Description``, ``Shot Perspective Design``, each {en, ch}. ``Characters Appearing`` in ``en`` gives the character
keys (the loader's ``character_key``), in the chosen language their names. The Lite split is the 20 ids of
``get_story_name_list(split='lite')`` (``LITE`` below).

Output layout (``dataset_loader/read_outputs.py``, ``load_outputs``): ``<outputs>/<method>/<mode>/<language>/
<timestamp>/<story_id>/shot_XX.<png|jpg>``; the shot number is ``int(name.split('_')[-1].split('.')[0])`` and is
matched to the shot's ``index`` of story.json. ``timestamp`` is ``YYYYMMDD_HHMMSS`` (or with ``-``).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml
from PIL import Image

from ..app.folder import write_file
from ..storyfile import slug

LITE = ("01", "08", "09", "15", "17", "19", "24", "27", "28", "29", "32", "41", "52", "53", "55", "57", "60", "64",
        "68", "79")
LANGUAGES = ("en", "ch")
SHOT_FIELDS = {"Setting Description": "scene", "Plot Correspondence": "plot", "Characters Appearing": "names",
               "Static Shot Description": "script", "Shot Perspective Design": "camera"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MARK = "# characonsist: converted ViStoryBench story"
MAP_FILE = "vistorybench.json"
MAP_FORMAT = "characonsist-vistorybench-map/1"
EXPORT_MARK = ".characonsist-export"
TIMESTAMP = re.compile(r"^\d{8}[_-]\d{6}$")
# the identity picture's text (a reference picture shows the character alone; the benchmark gives no setting)
PICTURE_BACKGROUND = "a plain reference picture,"
PICTURE_ACTION = "shown in full view"


class VistoryError(ValueError):
    """Bad dataset, map or output folder; the message names the file and what to do."""


@dataclass
class Character:
    key: str
    name: str
    prompt: str
    tag: str
    images: list[Path]          # sorted, .png/.jpg/.jpeg (the loader's ``images``)

    @property
    def jpgs(self) -> list[Path]:
        """The reference images CIDS reads: ``image/<key>/**/*.jpg`` sorted (``cids_evaluator.py``, ref_mode
        origin, ``glob(..., '**/*.jpg')``: only ``.jpg``)."""
        return sorted(p for p in self.images if p.suffix == ".jpg")


@dataclass
class Shot:
    index: int
    scene: str
    plot: str
    names: list[str]            # in the chosen language
    keys: list[str]             # character keys (the ``en`` list)
    script: str
    camera: str


@dataclass
class VStory:
    id: str
    type: str
    shots: list[Shot]
    characters: dict[str, Character]
    notes: list[str] = field(default_factory=list)


def dataset_root(folder: str | Path) -> Path:
    """The folder holding the story folders: ``folder`` itself, or its ``ViStory``/``ViStoryBench`` subfolder."""
    folder = Path(folder)
    for candidate in (folder, folder / "ViStory", folder / "ViStoryBench"):
        if candidate.is_dir() and any((d / "story.json").is_file() for d in candidate.iterdir() if d.is_dir()):
            return candidate
    raise VistoryError(f"{folder}: no ViStoryBench stories here (expected <id>/story.json, e.g. 01/story.json, in "
                       "this folder or in its ViStory/ or ViStoryBench/ subfolder; download the dataset "
                       "ViStoryBench/ViStoryBench from the Hugging Face hub)")


def story_ids(root: Path, lite: bool = False) -> list[str]:
    """Digit-named story folders in numeric order (only the Lite ones with ``lite``)."""
    ids = [d.name for d in root.iterdir() if d.is_dir() and d.name.isdigit() and (d / "story.json").is_file()]
    if lite:
        ids = [i for i in ids if i in LITE]
    return sorted(ids, key=int)


def _text(value, language: str, where: str, notes: list[str]) -> str:
    if isinstance(value, dict):
        if language in value:
            return str(value[language] or "")
        other = next((value[k] for k in LANGUAGES if k in value), "")
        notes.append(f"{where}: no {language!r} text, the other language's kept")
        return str(other or "")
    return str(value or "")


def read_story(root: Path, story_id: str, language: str = "en") -> VStory:
    """One story as the benchmark's loader reads it (shots missing a field are left out with a note, as there)."""
    path = root / story_id / "story.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise VistoryError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise VistoryError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("Shots"), list) or not isinstance(
            data.get("Characters"), dict):
        raise VistoryError(f"{path}: expected an object with 'Shots' (a list) and 'Characters' (an object)")
    notes: list[str] = []
    characters = {}
    for key, info in data["Characters"].items():
        if not isinstance(info, dict):
            raise VistoryError(f"{path}: Characters[{key!r}] must be an object")
        folder = root / story_id / "image" / key
        images = sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                        key=lambda p: str(p)) if folder.is_dir() else []
        if not images:
            notes.append(f"{folder}: no reference image for character {key!r}")
        characters[key] = Character(key, str(info.get(f"name_{language}") or key), str(info.get(f"prompt_{language}")
                                                                                          or ""),
                                    str(info.get("tag") or ""), images)
    shots = []
    for k, raw in enumerate(data["Shots"]):
        where = f"{path}: Shots[{k}]"
        if not isinstance(raw, dict) or "index" not in raw:
            raise VistoryError(f"{where}: a shot needs an 'index'")
        missing = [f for f in SHOT_FIELDS if f not in raw]
        if missing:
            notes.append(f"{where}: missing {', '.join(missing)}; shot left out (as the benchmark's loader does)")
            continue
        try:
            index = int(raw["index"])
        except (TypeError, ValueError):
            raise VistoryError(f"{where}: 'index' must be a number, not {raw['index']!r}") from None
        appearing = raw["Characters Appearing"]
        keys = [str(c).strip() for c in (appearing.get("en") if isinstance(appearing, dict) else appearing) or []]
        names = appearing.get(language, keys) if isinstance(appearing, dict) else keys
        unknown = [c for c in keys if c not in characters]
        if unknown:
            notes.append(f"{where}: character(s) {', '.join(map(repr, unknown))} not in Characters; left out")
            names = [n for n, c in zip(names, keys, strict=True) if c in characters]
            keys = [c for c in keys if c in characters]
        shots.append(Shot(index, _text(raw["Setting Description"], language, where, notes),
                          _text(raw["Plot Correspondence"], language, where, notes), [str(n) for n in names], keys,
                          _text(raw["Static Shot Description"], language, where, notes),
                          _text(raw["Shot Perspective Design"], language, where, notes)))
    return VStory(story_id, _text(data.get("Story_type", ""), language, f"{path}: Story_type", notes), shots,
                  characters, notes)


def merged_prompt(story: VStory, shot: Shot) -> str:
    """The benchmark's one-string prompt of a shot (``StoryDataset.story_prompt_merge``): camera; plot; script;
    "<name> is <prompt>" per character; scene."""
    chars = ";".join(f"{n} is {story.characters[k].prompt}" for n, k in zip(shot.names, shot.keys, strict=True))
    return f"{shot.camera};{shot.plot};{shot.script};{chars};{shot.scene};"


# ---------------------------------------------------------------------------------------------------------- converter

@dataclass
class ConvertedStory:
    id: str
    scenes: list[dict]
    groups: dict[str, dict]       # group folder name -> {character, identity_shot, frame_shots}
    primary: dict[int, str]       # shot index -> the group whose image stands for the shot
    notes: list[str]


def convert_story(story: VStory, text_only: bool = False) -> ConvertedStory:
    """One group per character that appears in a shot: its frames are those shots in story order.

    Fields: background = the shot's ``Setting Description``; character = the character's description (``prompt``,
    as the leaderboard's CharaConsist adapter ``gen-mix.py``); action = ``Static Shot Description`` + " Perspective:
    " + ``Shot Perspective Design`` (the adapter appends the perspective likewise); caption = the benchmark's
    merged prompt (``merged_prompt``). Lost from the prompt: the ``Plot Correspondence`` (kept in the caption) and,
    in a shot with several characters, the other characters' descriptions (their names stay in the shot text).
    Identity: the character's first reference image (picture identity), captioned ``PICTURE_BACKGROUND`` #
    description # ``PICTURE_ACTION``; with ``text_only`` the character's first shot is a generated identity (the
    leaderboard's setting: the adapter generates from text and keeps the pictures for logging)."""
    scenes, groups, primary, notes = [], {}, {}, list(story.notes)
    order = [k for k in story.characters if any(k in s.keys for s in story.shots)]
    for key in story.characters:
        if key not in order:
            notes.append(f"character {key!r} appears in no shot; no group")
    for s, key in enumerate(order):
        char = story.characters[key]
        shots = [shot for shot in story.shots if key in shot.keys]
        frames = [{"background": shot.scene.strip() or "a scene", "action": _action(shot),
                   "caption": merged_prompt(story, shot)} for shot in shots]
        name = f"{story.id}-{slug(char.key) or 'character'}"
        scene = {"name": name, "character": char.prompt.strip() or char.name}
        picture = None if text_only else next(iter(char.images), None)
        if picture is None and not text_only:
            notes.append(f"character {key!r} has no reference picture: its identity is generated (text only)")
        if picture is not None:
            scene["identity"] = {"background": PICTURE_BACKGROUND, "action": PICTURE_ACTION,
                                 "image": str(picture.resolve()), "caption": f"{char.name} is {char.prompt}"}
            scene["frames"], identity_shot, frame_shots = frames, None, [shot.index for shot in shots]
        else:
            scene["identity"], scene["frames"] = frames[0], frames[1:]
            identity_shot, frame_shots = shots[0].index, [shot.index for shot in shots[1:]]
        folder = f"{s:03d}_{slug(name) or 'scene'}"
        scenes.append(scene)
        groups[folder] = {"character": key, "identity_shot": identity_shot, "frame_shots": frame_shots}
    for shot in story.shots:
        if not shot.keys:
            notes.append(f"shot {shot.index}: no character; not converted (every group follows one character), so "
                         "no image for it")
            continue
        first = next(f for f, g in groups.items() if g["character"] == shot.keys[0])
        primary[shot.index] = first
        if len(shot.keys) > 1:
            notes.append(f"shot {shot.index}: {len(shot.keys)} characters ({', '.join(shot.keys)}): one frame in each "
                         f"one's group, each holding only its own character consistent; the export takes "
                         f"{shot.keys[0]!r}'s")
    return ConvertedStory(story.id, scenes, groups, primary, notes)


def _action(shot: Shot) -> str:
    script, camera = shot.script.strip(), shot.camera.strip()
    text = f"{script} Perspective: {camera}" if camera else script
    return text.strip() or "in the scene"


def convert_dataset(dataset: str | Path, out: str | Path, lite: bool = False, language: str = "en",
                    text_only: bool = False, overwrite: bool = False) -> tuple[list[Path], list[ConvertedStory]]:
    """Write ``<out>/<story_id>.yaml`` per story and ``<out>/vistorybench.json`` (which shot each group's images
    are, which group stands for each shot, the notes); refuses files it did not write unless ``overwrite``."""
    if language not in LANGUAGES:
        raise VistoryError(f"--language {language!r}: the dataset has {', '.join(LANGUAGES)}")
    root = dataset_root(dataset)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VistoryError(f"{out}: exists and is not a folder; --out names the folder for the story files")
    ids = story_ids(root, lite)
    if not ids:
        raise VistoryError(f"{root}: no stories" + (" of the Lite split" if lite else ""))
    stories = [read_story(root, i, language) for i in ids]
    converted = [convert_story(story, text_only) for story in stories]
    targets = [out / f"{c.id}.yaml" for c in converted] + [out / MAP_FILE]
    for path in targets:
        if path.exists() and not overwrite and not _ours(path):
            raise VistoryError(f"{path}: exists and was not written by the converter; choose another --out or pass "
                               "--force")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for c, story in zip(converted, stories, strict=True):
        header = [MARK, f"# source: {root / c.id / 'story.json'} ({language}{', text only' if text_only else ''})",
                  f"# {len(c.scenes)} groups (one per character), {sum(len(s['frames']) for s in c.scenes)} frames",
                  *(f"# note: {n}" for n in c.notes)]
        body = yaml.safe_dump({"title": f"ViStoryBench {c.id}: {story.type}", "scenes": c.scenes}, sort_keys=False,
                              allow_unicode=True, width=1000)
        path = out / f"{c.id}.yaml"
        write_file(path, ("\n".join(header) + "\n" + body).encode())
        written.append(path)
    mapping = {"format": MAP_FORMAT, "dataset": str(root.resolve()), "language": language, "lite": lite,
               "text_only": text_only,
               "stories": {c.id: {"file": f"{c.id}.yaml", "groups": c.groups,
                                  "primary": {str(k): v for k, v in c.primary.items()}, "notes": c.notes}
                           for c in converted}}
    write_file(out / MAP_FILE, (json.dumps(mapping, indent=1, ensure_ascii=False) + "\n").encode())
    return written + [out / MAP_FILE], converted


def _ours(path: Path) -> bool:
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:200]
    except OSError:
        return False
    return head.startswith(MARK) or MAP_FORMAT in head


# ------------------------------------------------------------------------------------------------ shots of a run

def read_map(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / MAP_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise VistoryError(f"{path}: cannot read the converter's map ({e.strerror or e}); pass the --out folder of "
                           "`characonsist eval convert vistorybench`") from None
    except ValueError as e:
        raise VistoryError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != MAP_FORMAT:
        raise VistoryError(f"{path}: not a map written by `characonsist eval convert vistorybench`")
    return data


def shots_from_runs(runs, mapping: dict) -> dict[str, dict[int, Path]]:
    """Story id -> shot index -> image file, from run folders (``runfolder.Run``) of converted stories: each shot's
    image is its primary group's frame (the group of the shot's first character). A run of several story files
    names its groups ``<story file stem>/<group>``; the group names hold the story id, so the last part is enough."""
    by_group = {}
    for run in runs:
        for group in run.groups:
            by_group[group.name.rsplit("/", 1)[-1]] = group
    out: dict[str, dict[int, Path]] = {}
    for story_id, info in mapping["stories"].items():
        for shot, group_name in info["primary"].items():
            group = by_group.get(group_name)
            if group is None:
                continue
            spec = info["groups"][group_name]
            stems = ([spec["identity_shot"]] if spec["identity_shot"] is not None else [None]) + spec["frame_shots"]
            # manifest order: identity, then the frames; an unfinished image is missing from group.images
            files = {Path(im.path).name: im.file for im in group.images}
            paths = _image_order(group)
            for position, index in enumerate(stems):
                if index == int(shot) and position < len(paths) and paths[position] in files:
                    out.setdefault(story_id, {})[int(shot)] = files[paths[position]]
    return out


def _image_order(group) -> list[str]:
    """The file names of a group's images in manifest order (identity first), finished or not."""
    return [Path(p).name for p in (group.all_paths or [im.path for im in group.images])]


def shots_from_layout(folder: str | Path) -> dict[str, dict[int, Path]]:
    """Story id -> shot index -> image, from a folder in the benchmark's layout at the timestamp level
    (``<story_id>/shot_XX.png``), read as ``read_outputs._collect_story_images`` reads it (a ``shots`` subfolder
    and a timestamp level inside a story folder are followed; the latest timestamp is taken)."""
    folder = Path(folder)
    out = {}
    for story in sorted((d for d in folder.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name)):
        base = story
        stamps = sorted((d for d in base.iterdir() if d.is_dir() and TIMESTAMP.match(d.name)),
                        key=lambda d: d.name.replace("-", "_"))
        if stamps:
            base = stamps[-1]
        sub = next((d for d in base.iterdir() if d.is_dir() and (d.name.lower() in ("shots", "shot")
                                                                 or d.name.endswith(("shot", "shots")))), None)
        base = sub or base
        shots = {}
        for f in sorted(base.iterdir()):
            if f.is_file() and f.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif", ".bmp"):
                try:
                    shots[int(f.name.split("_")[-1].split(".")[0])] = f
                except ValueError:
                    continue
        out[story.name] = shots
    return out


def export_layout(shots: dict[str, dict[int, Path]], out: str | Path, method: str, mode: str = "base",
                  language: str = "en", timestamp: str | None = None, suffix: str = "jpg") -> Path:
    """Write ``<out>/<method>/<mode>/<language>/<timestamp>/<story_id>/shot_XX.<suffix>`` (XX = the shot's story.json
    index, two digits) for the official scripts (``bench_run.py --method <method> --mode <mode>``). A timestamp
    folder that exists and was not written by this export is refused; one of ours is completed, files kept."""

    if suffix not in ("jpg", "png"):
        raise VistoryError(f"--export-format {suffix!r}: jpg or png")
    for name, value in (("method", method), ("mode", mode), ("language", language)):
        if not value or "/" in value or value in (".", ".."):
            raise VistoryError(f"--{name} {value!r}: must be one folder name")
    timestamp = timestamp or datetime.now().strftime("%Y%m%d_%H%M%S")
    if not TIMESTAMP.match(timestamp):
        raise VistoryError(f"timestamp {timestamp!r}: the benchmark's reader wants YYYYMMDD_HHMMSS")
    root = Path(out) / method / mode / language / timestamp
    if root.exists() and not (root / EXPORT_MARK).is_file():
        raise VistoryError(f"{root}: exists and was not written by this export; choose another timestamp or folder")
    root.mkdir(parents=True, exist_ok=True)
    (root / EXPORT_MARK).write_text("written by characonsist eval --suite vistorybench --export\n")
    for story_id, images in shots.items():
        folder = root / story_id
        folder.mkdir(exist_ok=True)
        for index, src in sorted(images.items()):
            target = folder / f"shot_{index:02d}.{suffix}"
            if target.exists():
                continue
            with Image.open(src) as image:
                image = image.convert("RGB")
                data = _encode(image, suffix)
            write_file(target, data)
    return root


def _encode(image, suffix: str) -> bytes:

    buffer = io.BytesIO()
    if suffix == "jpg":
        image.save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()
