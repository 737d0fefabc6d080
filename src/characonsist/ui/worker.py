"""The UI's work: one worker thread owns the model (loaded once) and runs queued jobs one at a time through the
application layer, the same ``validate_request`` / ``StoryRun`` as ``characonsist generate``. Each job keeps the
list of its events (queued, progress, images, done, ...), which the server streams to the browser.

Stories live in the workspace (``characonsist ui --out DIR``): ``DIR/<name>/`` is an ordinary run folder of
``characonsist generate`` plus its ``story.yaml``, so the command line resumes or re-runs what the UI made.
Pictures uploaded as identities are kept in ``DIR/pictures/<sha256 prefix>.<ext>`` (their bytes as uploaded) and
named in ``story.yaml`` as ``image: ../pictures/...``, which the command line reads from the story file's folder.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import random
import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from ..app import Cancelled, FolderError, StoryRequest, StoryRun, StorySettings, loading, memory_plan, validate_request
from ..app import model as models
from ..app.folder import OutputFolder
from ..app.layouts import LAYOUTS, write_layouts
from ..app.regenerate import regenerate
from ..app.stories import MARK, document_from_manifest, dump_story, parse_story, story_document
from ..inputs import InputError, excerpt
from ..output import read_json
from ..seeds import DEFAULT_SEED

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
STORY_FILE = "story.yaml"
MAX_SEED = 2**32 - 1    # re-rolled seeds: small enough to read and type
PREVIEW_KEEP_S = 30     # a job's superseded preview pictures stay in its log this long (then only the newest)
PICTURES = "pictures"   # DIR/pictures: the uploaded identity pictures (not a story name)
PICTURE_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}   # what browsers show
PICTURE_NAME = re.compile(r"[0-9a-f]{16}\.(?:png|jpg|webp|gif|bmp)")
MAX_PICTURE_BYTES = 16 * 2**20      # an upload's size (a large phone photo is 5-10 MB)
MAX_PICTURE_PIXELS = 50_000_000     # its pixels, checked before decoding (the identity is fitted to ~1 MP anyway)


class UiError(Exception):
    """A request the UI refuses (status 400 unless ``status`` says otherwise), with every problem."""

    def __init__(self, problems: list[str] | str, status: int = 422):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.status = status
        super().__init__("; ".join(self.problems))


def check_name(name) -> str:
    """A story's folder name as the browser sent it, refused unless it is a plain lower-case name."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UiError(f"story name {name!r}: use 1-64 lower-case letters, digits, '-' or '_' (it names the story's "
                      "folder)")
    if name == PICTURES:
        raise UiError(f"story name {name!r}: the UI keeps the uploaded pictures in that folder; choose another name")
    return name


def picture_ref(file: str) -> str:
    """How a story file in a story's folder names a stored picture (relative to the story file's folder)."""
    return f"../{PICTURES}/{file}"


def stored_picture(ref) -> str | None:
    """The stored picture's file name a story's ``image`` names (``../pictures/<sha>.<ext>``), else None."""
    if not isinstance(ref, str):
        return None
    head, _, file = ref.strip().rpartition("/")
    return file if head == f"../{PICTURES}" and PICTURE_NAME.fullmatch(file) else None


def upload_name(filename) -> str:
    """The browser's file name, for messages only: its last part, printable, at most 80 characters ('' for none)."""
    name = str(filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable()).strip()
    return name[:80]


def new_seed() -> int:
    return random.SystemRandom().randint(0, MAX_SEED)


@dataclass(frozen=True)
class Loading:
    """How the UI loads its one model, the same for every story (``characonsist ui --memory --quantize --vae-tiling
    --gpu-ids --dtype``, as ``characonsist generate`` takes them): what a small GPU needs to run the UI at all."""

    memory: str = "none"
    quantize: str = "none"
    vae_tiling: bool = False
    gpu_ids: str = "0"
    dtype: str = "auto"

    def check(self, names: dict | None = None) -> Loading:
        """The options with their names resolved (``0``-``3`` -> the mode's name), checked before the UI starts:
        InputError for an unknown one, ``auto`` (the UI's stories have no fixed size to plan for), or a mode that
        needs a CUDA GPU where none is visible."""
        mode, gpus = memory_plan.check_memory(self.memory, self.gpu_ids, names)
        quantize = memory_plan.check_quantize(self.quantize, names)
        models.resolve_dtype(self.dtype, names)
        if "auto" in (mode, quantize):
            raise InputError("ui: --memory/--quantize auto plans for one story's size; the UI loads one model for "
                             "stories of any size: give the mode and format (`characonsist generate ... --memory auto` "
                             "prints what it picks for a story)")
        memory_plan.check_memory_device(mode, names)
        return Loading(mode, quantize, bool(self.vae_tiling), ",".join(map(str, gpus)), self.dtype)

    def flags(self, flags: dict[str, str] | None) -> list[str]:
        """The ``characonsist generate`` flags that load the model the same way (those not at their default), named
        by ``flags`` (the command line's table, which ``characonsist ui`` hands over; None: the field names)."""
        default, parts = Loading(), []
        for f in dataclasses.fields(self):
            value, flag = getattr(self, f.name), (flags or {}).get(f.name, f.name)
            if value != getattr(default, f.name):
                parts += [flag] if value is True else [flag, str(value)]
        return parts


# How the page labels the fields it sets, for the application layer's messages (the command line uses its flags).
LABELS = {"method": "Method", "num_inference_steps": "Steps", "guidance_scale": "Guidance", "seed": "Seed",
          "width": "Width", "height": "Height", "inversion": "Picture inversion", "method_options": "More options"}


@dataclass
class Settings:
    """A run's settings as the editor holds them (None = the model's default; option values may stay text): the
    ``StoryRequest`` fields the form sets, under the same names (the UI's JSON, ``StorySettings``, the manifest)."""

    method: str = "characonsist"
    method_options: dict = field(default_factory=dict)
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = DEFAULT_SEED
    save_masks: bool = True
    inversion: str | None = None   # how an identity picture is followed (None: the default, euler)

    @classmethod
    def parse(cls, data) -> Settings:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise UiError("settings: expected a mapping")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UiError(f"settings: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        values = {k: (None if v == "" else v) for k, v in data.items()}
        if values.get("seed") is None:
            values.pop("seed", None)
        if values.get("method_options") is None:
            values["method_options"] = {}
        if not isinstance(values.get("method_options", {}), dict):
            raise UiError("settings.method_options: expected a mapping of option names to values")
        return cls(**values)

    @classmethod
    def of(cls, settings: StorySettings) -> Settings:
        """The editor's settings of a run (``StorySettings.from_manifest``): the same fields, by name."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


def cli_command(request: StoryRequest, flags: dict[str, str] | None) -> str | None:
    """The ``characonsist generate`` command of a story's request (fields at their defaults left out), written with
    the command line's table of flags (``characonsist ui`` hands it over; None: no command is shown)."""
    import shlex

    if not flags:
        return None
    default = StoryRequest(stories=[], model="", out="")
    parts = ["characonsist", "generate", *map(str, request.stories)]
    options = dict(request.method_options or {})
    for name in flags:    # in the table's order
        value = getattr(request, name, None)
        if value is None or (name not in ("model", "out", "method") and value == getattr(default, name)):
            continue
        if name == "loras":
            parts += [p for lora in value for p in (flags[name], str(lora))]
        elif isinstance(value, bool):
            parts += [flags[name]] if value else []
        else:
            parts += [flags[name], str(value)]
        if name == "method":   # the method's options after it: a flag of their own, else --option KEY=VALUE
            for key, text in options.items():
                if key in flags:
                    on = text in (True, "true", "True", "1")
                    parts.append(flags[key] if on else flags[key].replace("--", "--no-", 1))
                else:
                    parts += ["--option", f"{key}={str(text).lower() if isinstance(text, bool) else text}"]
    return " ".join(shlex.quote(p) for p in parts)


@dataclass
class UiJob:
    id: str
    kind: str                      # generate | regenerate | export
    name: str                      # the story
    payload: dict
    state: str = "queued"          # queued | running | done | failed | cancelled
    events: list = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    result: dict = field(default_factory=dict)
    previews: list = field(default_factory=list)   # its preview events that still hold their pictures

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def emit(self, type: str, **data) -> None:
        self.events.append({"seq": len(self.events), "type": type, "job": self.id, "time": round(time.time(), 3),
                            **data})

    def summary(self) -> dict:
        return {"id": self.id, "kind": self.kind, "name": self.name, "state": self.state, "events": len(self.events),
                **({"result": self.result} if self.result else {})}


class Workspace:
    """The UI's output folder: one run folder per story, nothing read or written outside it."""

    def __init__(self, root: str | Path, model: str, loading: Loading | None = None,
                 flags: dict[str, str] | None = None):
        self.root = Path(root).expanduser().resolve()
        self.model = model
        self.loading = loading or Loading()
        self.flags = flags        # the command line's flags, to show each story's command (``cli_command``)
        self.lock = OutputFolder(self.root)
        self._storing = threading.Lock()   # uploads run in the server's threads; one writes at a time

    def open(self) -> None:
        """Create the folder and hold its lock while the UI runs (a second UI on it, or a `generate --out` into
        the workspace itself, stops with a message); story folders have their own locks."""
        self.lock.check()
        self.lock.open()
        if self.lock.read_only:   # every story the UI makes or edits is written here: say so now, not at Generate
            why = self.lock.read_only_why
            self.lock.close()
            raise FolderError(f"--out {self.root} is not writable ({why}); the UI writes its stories there: make it "
                              "writable or choose another folder", self.root)

    def close(self) -> None:
        self.lock.close()

    def folder(self, name: str) -> Path:
        """A story's folder in the workspace (UiError 404 where that name is a link: the UI never follows one)."""
        try:
            path = self.lock.path(check_name(name))
        except FolderError:
            path = None
        if path is None or path.is_symlink():
            raise UiError(f"no story {name!r}: its folder in the workspace is a link, which the UI never follows; "
                          "move the link away", status=404)
        return path

    def relative(self, messages: list[str]) -> list[str]:
        """Messages as the page shows them: paths inside the output folder relative to it (the CLI's messages
        name absolute paths; the page's user knows only the folder's contents)."""
        prefix = f"{self.root}{os.sep}"
        return [m.replace(prefix, "") for m in messages]

    def file(self, name: str, rel: str) -> Path:
        """A file inside a story's folder to serve (never a path outside it, a link, or a hidden file)."""
        folder = self.folder(name)
        if not rel or any(part.startswith(".") for part in Path(rel).parts):
            raise UiError(f"{excerpt(rel)}: not a file of story {name}", status=404)
        try:
            path = OutputFolder(folder).path(rel)
        except FolderError:   # an absolute path, '..', a link out of the folder: not one of its files
            raise UiError(f"{excerpt(rel)}: not a file of story {name}", status=404) from None
        if path.is_symlink() or not path.is_file():
            raise UiError(f"{excerpt(rel)}: no such file in story {name}", status=404)
        return path

    # ------------------------------------------------------------------ pictures
    def store_picture(self, data: bytes, filename=None) -> dict:
        """Keep an uploaded identity picture: checked as the command line checks a story's picture (it decodes
        completely), in a format browsers show, at most ``MAX_PICTURE_BYTES`` and ``MAX_PICTURE_PIXELS``; written
        atomically with its bytes as uploaded to ``pictures/<sha256[:16]>.<ext>`` (the same picture twice is one
        file; a file there that characonsist did not write is never replaced). ``filename`` is the browser's name,
        used in messages only. UiError says what is wrong."""
        from ..picture import bytes_digest, file_digest, load_picture_bytes

        name = upload_name(filename)
        where = f"picture: {name}" if name else "picture"
        kinds = "PNG, JPEG, WebP, GIF or BMP"
        if not data:
            raise UiError(f"{where}: the file is empty; choose a picture ({kinds})")
        if len(data) > MAX_PICTURE_BYTES:
            raise UiError(f"{where}: {len(data) / 2**20:.1f} MiB is more than the UI takes "
                          f"({MAX_PICTURE_BYTES // 2**20} MiB); scale it down or save it as JPEG", status=413)
        try:
            image, fmt = load_picture_bytes(data, name, "picture", tuple(PICTURE_FORMATS), MAX_PICTURE_PIXELS)
        except InputError as e:
            raise UiError(e.problems) from None
        digest = bytes_digest(data)
        file = f"{digest[:16]}.{PICTURE_FORMATS[fmt]}"
        with self._storing:
            try:
                path = self.lock.path(f"{PICTURES}/{file}")
                if path.is_symlink() or (path.exists() and not (path.is_file() and file_digest(path) == digest)):
                    raise FolderError(f"{path} was not written by characonsist: move it away (characonsist never "
                                      "replaces files it did not write)", path)
                stored = not path.exists()
                if stored:
                    self.lock.write_bytes(f"{PICTURES}/{file}", data)
            except FolderError as e:
                raise UiError(str(e), status=409) from None
        return {"image": picture_ref(file), "file": file, "url": self.picture_url(file), "name": name or "picture",
                "width": image.width, "height": image.height, "format": fmt, "bytes": len(data), "sha256": digest,
                "stored": stored}

    def picture(self, file: str) -> Path:
        """A stored picture's path (404 unless it is a plain file named as the UI names them)."""
        if not isinstance(file, str) or not PICTURE_NAME.fullmatch(file):
            raise UiError(f"{file!r}: not a picture of the UI", status=404)
        try:
            path = self.lock.path(f"{PICTURES}/{file}")
        except FolderError as e:
            raise UiError(str(e), status=404) from None
        if path.is_symlink() or not path.is_file():
            raise UiError(f"{excerpt(file)}: no such picture in {PICTURES}/", status=404)
        return path

    def picture_url(self, file: str) -> str:
        return f"/{PICTURES}/{file}"

    def picture_problems(self, doc) -> list[str]:
        """Every picture a story document names that is not one stored here (the UI reads no other file)."""
        problems = []
        scenes = doc.get("scenes") if isinstance(doc, dict) else None
        for s, scene in enumerate(scenes if isinstance(scenes, list) else []):
            images = scene.get("images") if isinstance(scene, dict) else None
            for i, image in enumerate(images if isinstance(images, list) else []):
                ref = image.get("image") if isinstance(image, dict) else None
                if ref is None or ref == "":
                    continue
                place = f"scenes[{s}].{'identity' if i == 0 else f'frames[{i - 1}]'}"
                file = stored_picture(ref)
                if file is None:
                    problems.append(f"{place}: picture {excerpt(ref)} is not one uploaded to this UI (it reads no "
                                    "other file): choose the picture with the identity's picture button")
                    continue
                try:
                    self.picture(file)
                except UiError:
                    problems.append(f"{place}: picture {file} is no longer in {self.root / PICTURES}: choose it again")
        return problems

    def _stored(self, digest) -> str | None:
        """The stored picture with these bytes (sha256), if any."""
        if not isinstance(digest, str) or len(digest) != 64:
            return None
        from ..picture import file_digest

        for ext in PICTURE_FORMATS.values():
            try:
                path = self.picture(f"{digest[:16]}.{ext}")
            except UiError:
                continue
            if file_digest(path) == digest:
                return path.name
        return None

    def _adopt_pictures(self, doc: dict, manifest: dict) -> None:
        """A story rebuilt from a command-line run's manifest names its pictures where that run read them; the same
        bytes uploaded here are named as the UI names them (the groups stay finished: the picture's sha256 counts)."""
        for scene, group in zip(doc["scenes"], manifest.get("groups") or []):
            identity = scene["images"][0] if scene["images"] else {}
            if identity.get("image") and stored_picture(identity["image"]) is None:
                file = self._stored((group["identity"].get("picture") or {}).get("sha256"))
                if file:
                    identity["image"] = picture_ref(file)

    def stories(self) -> list[dict]:
        found = []
        for path in sorted(self.root.iterdir()):
            if path.is_symlink() or not path.is_dir() or not NAME.fullmatch(path.name):
                continue
            manifest = read_json(path / "manifest.json")
            if manifest is None and not (path / STORY_FILE).is_file():
                continue
            groups = (manifest or {}).get("groups") or []
            found.append({"name": path.name, "title": self._title(path),
                          "groups": len(groups), "done": sum(g.get("status") == "done" for g in groups)})
        return found

    def _title(self, folder: Path) -> str:
        try:
            doc = self._story_file(folder)
        except (InputError, OSError):
            doc = None
        return (doc or {}).get("title") or folder.name

    def _story_file(self, folder: Path) -> dict | None:
        path = folder / STORY_FILE
        if path.is_symlink() or not path.is_file():
            return None
        text = path.read_text(encoding="utf-8")
        return story_document(parse_story(text, str(path)))

    def story(self, name: str) -> dict:
        """A story as the editor opens it: its document (``story.yaml``, else rebuilt from a command-line run's
        manifest), settings, groups with their images, and exports."""
        folder = self.folder(name)
        if not folder.is_dir():
            raise UiError(f"no story {name!r} in {self.root}", status=404)
        manifest = read_json(folder / "manifest.json")
        try:
            doc = self._story_file(folder)
            if doc is None and manifest:
                doc = document_from_manifest(manifest)
                self._adopt_pictures(doc, manifest)
        except InputError as e:
            raise UiError(e.problems if hasattr(e, "problems") else str(e)) from None
        if doc is None:
            raise UiError(f"{folder} has neither {STORY_FILE} nor manifest.json", status=404)
        try:
            settings = Settings.of(StorySettings.from_manifest(manifest["settings"], str(folder / "manifest.json"))) \
                if manifest and manifest.get("settings") else Settings()
        except InputError as e:
            raise UiError(e.problems) from None
        return {"name": name, "story": doc, "settings": dataclasses.asdict(settings),
                "groups": self.gallery(name, manifest), "exports": self.exports(name),
                "command": self.command(folder, settings)}

    def command(self, folder: Path, settings: Settings) -> str | None:
        """The ``characonsist generate`` command that resumes or re-runs this story from the command line."""
        return cli_command(StoryRequest(stories=[str(folder / STORY_FILE)], model=self.model, out=str(folder),
                                        **dataclasses.asdict(settings), **dataclasses.asdict(self.loading)), self.flags)

    def url(self, name: str, rel: str) -> str | None:
        path = self.folder(name) / rel
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            return None
        return f"/files/{name}/{rel}?v={stamp}"

    def gallery(self, name: str, manifest: dict | None = None) -> list[dict]:
        """Every group of the story's manifest with its images' URLs, masks, matches and notes."""
        manifest = manifest if manifest is not None else read_json(self.folder(name) / "manifest.json")
        groups = []
        for group in (manifest or {}).get("groups") or []:
            images = []
            for i, item in enumerate([group["identity"], *group["frames"]]):
                stem = Path(item["path"]).stem
                mask, match = f"{group['name']}/masks/{stem}_mask.png", f"{group['name']}/masks/{stem}_match.png"
                images.append({"index": i, "role": "identity" if i == 0 else "frame", "path": item["path"],
                               "url": self.url(name, item["path"]) if item.get("finished") else None,
                               "seed": item["seed"], "caption": item.get("caption"), "prompt": item["prompt"],
                               "height": item["height"], "width": item["width"],
                               "notes": self.relative(item.get("notes", [])),
                               "mask": self.url(name, mask) if mask in group.get("masks", []) else None,
                               "match": self.url(name, match) if match in group.get("masks", []) else None})
            groups.append({"name": group["name"], "status": group["status"], "error": group.get("error"),
                           "changes": group.get("changes"), "images": images, "picture": self._gallery_picture(group),
                           "storyboard": self.url(name, group["storyboard"]) if group.get("storyboard") else None})
        return groups

    def _gallery_picture(self, group: dict) -> dict | None:
        """A group whose identity is a picture: the picture (its URL when stored here) and, once generated, how
        close the reconstruction is (PSNR), how the picture was fitted and the inversion."""
        record = group["identity"].get("picture")
        if not record:
            return None
        made = (group.get("engine_settings") or {}).get("identity_picture") or {}
        file = Path(str(record.get("path") or "")).name
        if not (PICTURE_NAME.fullmatch(file) and file.startswith(str(record.get("sha256"))[:16])):
            file = self._stored(record.get("sha256"))   # a command-line run's picture, uploaded here too
        url = self.picture_url(file) if file else None
        return {"url": url, "path": record.get("path"), "inversion": made.get("inversion") or record.get("inversion"),
                "psnr": made.get("psnr"), "fit": made.get("fit"), "source_size": made.get("source_size")}

    def exports(self, name: str) -> list[dict]:
        folder = self.folder(name) / "layouts"
        if not folder.is_dir():
            return []
        return [{"path": f"layouts/{p.name}", "url": self.url(name, f"layouts/{p.name}")}
                for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]


def drop_pictures(job: UiJob, keep=(), before: float | None = None) -> None:
    """Drop the pictures of ``job``'s preview events (emitted before ``before``, all without it) except those in
    ``keep``; the events stay, their ``url`` becomes None. Bounds a long job's log: a connected page has read them
    long since."""
    kept = []
    for event in job.previews:
        if any(event is k for k in keep) or (before is not None and event["time"] >= before):
            kept.append(event)
        else:
            event["images"] = [{**im, "url": None} for im in event["images"]]
    job.previews = kept


def preview_mode(value) -> str | None:
    """A job's ``previews`` field: false/absent -> None (no previews), true -> ``"linear"``, or a mode's name."""
    from ..preview import MODES

    if value in (None, False):
        return None
    if value is True:
        return "linear"
    if value not in MODES:
        raise UiError(f"previews: {value!r}; give true, false or one of {', '.join(MODES)}")
    return value


class Worker:
    """One thread, one model, one job at a time; the others wait in the queue (see the module docstring).

    A job that asks for ``previews`` gets ``preview`` events while its groups denoise: small JPEG data URLs of
    every image's x0 estimate (``characonsist.preview``), at most one per image every ``preview_interval``
    seconds, ``preview_size`` px on the long side. They live only in the job's events (superseded pictures are
    dropped from the log after ``PREVIEW_KEEP_S``, and all of a finished job's when the next job starts); nothing
    is written to the story's folder."""

    def __init__(self, workspace: Workspace, model: str, preview_interval: float = 0.5, preview_size: int = 128):
        self.workspace = workspace
        self.model = model
        self.preview_interval = preview_interval
        self.preview_size = preview_size
        self.ref = models.resolve_model(model)          # InputError: a bad --model stops the UI before it starts
        workspace.loading = workspace.loading.check()   # and bad loading options
        self.pipe = None
        self.loads = 0                                  # how often the model was loaded (once)
        self.model_state = "not loaded"
        self.model_error: str | None = None
        self.jobs: dict[str, UiJob] = {}
        self.order: list[str] = []
        self.queue: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="characonsist-ui-worker", daemon=True)

    def start(self, preload: bool = True) -> None:
        if preload:
            self.queue.put(None)        # load the model first, so the first story does not wait for it
        self.thread.start()

    def stop(self) -> None:
        for job in self.jobs.values():
            job.cancel.set()
        self.queue.put(False)
        self.thread.join(timeout=30)

    # ------------------------------------------------------------------ submitting
    def request(self, name: str, doc: dict, settings: Settings, overwrite: bool = False):
        """The story text and the application layer's checked request (InputError / FolderError with every
        problem), exactly as ``characonsist generate`` would check the saved story file."""
        folder = self.workspace.folder(name)
        problems = self.workspace.picture_problems(doc)
        if problems:
            raise InputError(problems)
        text = dump_story(doc, "yaml")
        story = parse_story(text, str(folder / STORY_FILE))
        for group in story.groups:   # ../pictures/<file> from the story's folder (which may not exist yet)
            if group.picture is not None:
                group.picture = str(self.workspace.root / PICTURES / stored_picture(group.picture))
        request = StoryRequest(stories=[story], model=self.model, out=str(folder), overwrite=overwrite,
                               **dataclasses.asdict(settings), **dataclasses.asdict(self.workspace.loading))
        return text, validate_request(request, names=LABELS)

    def validate(self, name: str, doc: dict, settings: Settings) -> dict:
        try:
            _, checked = self.request(name, doc, settings)
        except (InputError, FolderError) as e:
            raise UiError(self.workspace.relative(getattr(e, "problems", None) or [str(e)])) from None
        return {"ok": True, "settings": checked.settings.manifest(), "groups": [g.name for g in checked.stories[0].groups],
                "notes": self.workspace.relative(checked.notes), "command": self.workspace.command(self.workspace.folder(name), settings)}

    def submit(self, kind: str, name: str, payload: dict) -> UiJob:
        check_name(name)
        if kind in ("generate", "regenerate"):
            payload = {**payload, "previews": preview_mode(payload.get("previews"))}
        if kind == "generate":
            settings = Settings.parse(payload.get("settings"))
            try:
                text, checked = self.request(name, payload.get("story"), settings, bool(payload.get("overwrite")))
            except (InputError, FolderError) as e:
                raise UiError(getattr(e, "problems", None) or [str(e)]) from None
            payload = {**payload, "text": text, "checked": checked, "settings": settings}
        elif kind == "regenerate":
            if not isinstance(payload.get("group"), str) or not isinstance(payload.get("index"), int):
                raise UiError("regenerate: give the group's name and the image's index (0 = identity)")
            if payload.get("seed") is not None and not (isinstance(payload["seed"], int) and 0 <= payload["seed"]):
                raise UiError("regenerate: seed must be a non-negative integer")
        elif kind == "export":
            layouts = payload.get("layouts")
            formats = payload.get("formats") or ["png", "pdf"]
            if not isinstance(layouts, list) or not isinstance(formats, list):
                raise UiError(f"export: 'layouts' and 'formats' must be lists (layouts from {', '.join(LAYOUTS)}, "
                              f"formats png/pdf), got {excerpt(layouts)} and {excerpt(formats)}")
            bad = [x for x in layouts if not isinstance(x, str) or x not in LAYOUTS] + \
                [f for f in formats if not isinstance(f, str) or f not in ("png", "pdf")]
            if not layouts or bad:
                raise UiError(f"export: layouts from {', '.join(LAYOUTS)} and formats png/pdf"
                              + (f" (not {', '.join(map(excerpt, bad))})" if bad else ""))
        else:
            raise UiError(f"unknown job kind {kind!r}; valid: generate, regenerate, export")
        with self._lock:
            job = UiJob(f"j{next(self._ids)}", kind, name, payload)
            self.jobs[job.id] = job
            self.order.append(job.id)
        job.emit("queued", kind=kind, name=name, position=self.queue.qsize())
        self.queue.put(job)
        return job

    def cancel(self, job_id: str) -> UiJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise UiError(f"no job {job_id!r}", status=404)
        if not job.finished:
            job.cancel.set()
            if job.state == "queued":
                job.state = "cancelled"
                job.emit("cancelled", message="cancelled before it started")
        return job

    # ------------------------------------------------------------------ running
    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is False:
                return
            if job is None:
                try:
                    self.pipeline()
                except Exception:
                    pass
                continue
            if job.state != "queued":
                continue
            for other in list(self.jobs.values()):   # only the newest finished job's log keeps its previews' pictures
                if other.finished and other.previews:
                    drop_pictures(other)
            job.state = "running"
            job.emit("started", kind=job.kind)
            try:
                getattr(self, f"_run_{job.kind}")(job)
                job.state = "done"
                job.emit("done", **job.result)
            except Cancelled:
                job.state = "cancelled"
                job.emit("cancelled", message="cancelled; finished images are kept")
            except UiError as e:
                job.state = "failed"
                job.emit("error", message=str(e), problems=e.problems)
            except (InputError, FolderError) as e:
                job.state = "failed"
                problems = getattr(e, "problems", None) or [str(e)]
                conflict = isinstance(e, InputError) and "generated with other settings" in str(e)
                job.emit("error", message=str(e), problems=problems, conflict=conflict)
            except Exception as e:  # a failure must not stop the worker: report it, go on with the queue
                job.state = "failed"
                job.emit("error", message=f"{type(e).__name__}: {e}", problems=[f"{type(e).__name__}: {e}"],
                         trace=traceback.format_exc(limit=8))

    def pipeline(self):
        """The model's pipeline, loaded once (the first job waits for it)."""
        with self._lock:
            if self.pipe is None:
                self.model_state = "loading"
                self.loads += 1
                try:
                    how = self.workspace.loading
                    self.pipe = loading.load_pipeline(
                        self.ref, models.resolve_dtype(how.dtype), how.memory, [int(g) for g in how.gpu_ids.split(",")],
                        quantize=how.quantize, vae_tiling=how.vae_tiling, progress=False)
                except Exception as e:
                    self.model_state, self.model_error = "failed", f"{type(e).__name__}: {e}"
                    raise
                # the previews' latent -> RGB map, fitted now rather than in a story's first step (with an
                # offloaded model that would move the VAE onto the GPU in mid-run)
                try:
                    from ..preview import latent_rgb

                    latent_rgb(self.pipe)
                except Exception:
                    pass   # a job that asks for previews then gets preview_failed with the reason
                self.model_state = "ready"
            return self.pipe

    def _engine(self, run: StoryRun):
        """The run's ``generate`` on the loaded pipeline; prompts that only the loaded tokenizer can check are
        checked now (as ``StoryRun.load`` does)."""
        engine = loading.story_engine(self.pipeline(), run.checked.settings)
        run.check_loaded(engine.tokenizer, engine.limits)
        run.engine = engine
        return engine

    def _previewing(self, job: UiJob, run: StoryRun) -> None:
        """Make ``run.engine`` emit the job's ``preview`` events (when the job asked for them)."""
        mode = job.payload.get("previews")
        if not mode or run.engine is None:
            return
        generate = run.engine

        def with_previews(j, progress_callback=None, **kwargs):
            shown: dict = {}      # the rows of a size group -> (time, its last preview event)

            def on_step(pipe, step, timestep, inputs):
                batch, x0 = pipe.step_batch, inputs.get("x0")
                if batch is None or x0 is None or job.payload.get("previews") is None:
                    return {}
                now = time.monotonic()
                last = shown.get(batch.images)
                if last is not None and now - last[0] < self.preview_interval:
                    return {}
                try:
                    from ..preview import data_url, previews

                    start = time.perf_counter()
                    images = [{"index": k, "url": data_url(im), "width": im.width, "height": im.height}
                              for k, im in zip(batch.images, previews(pipe, x0, batch.height, batch.width, mode,
                                                                       self.preview_size), strict=True)]
                    cost = round((time.perf_counter() - start) * 1000, 1)
                except Exception as e:   # a preview must never stop a story: no more previews for this job
                    job.payload["previews"] = None
                    job.emit("preview_failed", group=j.folder, message=f"{type(e).__name__}: {e}")
                    return {}
                job.emit("preview", group=j.folder, step=step + 1, steps=batch.steps, mode=mode, images=images,
                         ms=cost)
                shown[batch.images] = (now, job.events[-1])
                job.previews.append(job.events[-1])
                drop_pictures(job, keep=[e for _, e in shown.values()], before=time.time() - PREVIEW_KEEP_S)
                return {}

            return generate(j, progress_callback=progress_callback, callback_on_step_end=on_step,
                            callback_on_step_end_tensor_inputs=["x0"], **kwargs)

        for attr in ("tokenizer", "limits", "pipe"):
            if hasattr(generate, attr):
                setattr(with_previews, attr, getattr(generate, attr))
        run.engine = with_previews

    def _progress(self, job: UiJob, groups: list[str]):
        def progress(j, phase, done, total):
            job.emit("progress", group=j.folder, group_index=groups.index(j.folder) + 1, groups=len(groups),
                     phase=phase, done=done, total=total)
        return progress

    def _write_story(self, run: StoryRun, text: str) -> None:
        """``story.yaml`` in the story's folder (never replacing a file characonsist did not write)."""
        path = run.folder.path(STORY_FILE)
        if path.is_symlink() or (path.exists() and not path.read_text(encoding="utf-8", errors="replace")
                                 .startswith(MARK)):
            raise FolderError(f"{path} was not written by characonsist: move it away (characonsist never replaces "
                              "files it did not write)", path)
        run.folder.write_bytes(STORY_FILE, text.encode())

    def _group_event(self, job: UiJob, run_job) -> None:
        gallery = {g["name"]: g for g in self.workspace.gallery(job.name)}
        job.emit("group", group=run_job.folder, gallery=gallery.get(run_job.folder))

    def _run_generate(self, job: UiJob) -> None:
        p = job.payload
        with StoryRun(p["checked"]) as run:
            self._write_story(run, p["text"])
            todo = run.todo
            job.emit("plan", groups=[j.folder for j in run.jobs], todo=[j.folder for j in todo],
                     images=sum(j.images for j in todo))
            if todo:
                job.emit("loading", model=self.model, state=self.model_state)
                self._engine(run)
                job.emit("loading", model=self.model, state=self.model_state)   # "ready": the page's header says so
                self._previewing(job, run)
            progress = self._progress(job, [j.folder for j in todo])
            for j in todo:
                job.emit("group_started", group=j.folder, images=j.images)
                if run.run(j, progress=progress, cancel=job.cancel):
                    self._group_event(job, j)
                else:
                    job.emit("group_failed", group=j.folder, message=j.error)
        job.result = {"failed": run.failed, "groups": len(run.jobs)}

    def _run_regenerate(self, job: UiJob) -> None:
        p = job.payload
        folder = self.workspace.folder(job.name)
        story = self.workspace.story(job.name)
        manifest = read_json(folder / "manifest.json") or {}
        doc, settings = story["story"], Settings(**story["settings"])
        names = [g["name"] for g in manifest.get("groups") or []]
        if p["group"] not in names:
            raise UiError(f"story {job.name} has no generated group {p['group']!r}")
        s = names.index(p["group"])
        images = doc["scenes"][s]["images"]
        if not 0 <= p["index"] < len(images):
            raise UiError(f"group {p['group']} has images 0..{len(images) - 1}")
        group = manifest["groups"][s]
        if group.get("status") != "done":
            raise UiError(f"group {p['group']} is not finished: generate the story first")
        _, old_checked = self.request(job.name, doc, settings)
        seed = p.get("seed")
        if seed is None:
            current = [group["identity"], *group["frames"]][p["index"]]["seed"]
            seed = new_seed()
            while seed == current:
                seed = new_seed()
        images[p["index"]]["seed"] = seed
        text, checked = self.request(job.name, doc, settings, overwrite=True)
        old_text = (folder / STORY_FILE).read_text(encoding="utf-8") if (folder / STORY_FILE).is_file() else None
        try:
            with StoryRun(checked) as run:
                target = next(j for j in run.jobs if j.folder == p["group"])
                self._write_story(run, text)
                try:
                    self._engine(run)
                    job.emit("loading", model=self.model, state=self.model_state)
                    self._previewing(job, run)
                    job.emit("group_started", group=target.folder, images=target.images)
                    differing = regenerate(run, target, p["index"], progress=self._progress(job, [target.folder]),
                                           cancel=job.cancel)
                except BaseException:
                    if old_text is not None:   # the story as it was: its images on disk are still the old ones
                        run.folder.write_bytes(STORY_FILE, old_text.encode())
                    else:
                        run.folder.remove(STORY_FILE)
                    raise
                self._group_event(job, target)
        except BaseException:
            try:
                with StoryRun(old_checked):   # the manifest as the old story's images on disk say
                    pass
            except Exception:
                pass
            raise
        job.result = {"group": p["group"], "index": p["index"], "seed": seed,
                      "kept_differing": differing}

    def _run_export(self, job: UiJob) -> None:
        p = job.payload
        folder = self.workspace.folder(job.name)
        manifest = read_json(folder / "manifest.json")
        if not manifest:
            raise UiError(f"story {job.name} has no images yet: generate it first")
        story = self.workspace.story(job.name)
        settings = Settings(**story["settings"])
        _, checked = self.request(job.name, story["story"], settings)
        with StoryRun(checked) as run:
            done = [j for j in run.jobs if j.state == "done"]
            if not done:
                raise UiError(f"story {job.name} has no finished group yet: generate it first")
            files = write_layouts(run.folder, run.jobs, p["layouts"], title=story["story"].get("title") or "",
                                  formats=tuple(p.get("formats") or ("png", "pdf")))
        job.result = {"files": [{"path": f, "url": self.workspace.url(job.name, f)} for f in files],
                      "skipped": [j.folder for j in run.jobs if j.state != "done"]}


__all__ = ["Settings", "UiError", "UiJob", "Worker", "Workspace", "check_name", "cli_command", "picture_ref",
           "preview_mode", "stored_picture"]
