"""The UI's workspace (``characonsist ui --out DIR``): ``DIR/<name>/`` is an ordinary run folder of
``characonsist generate`` plus its ``story.yaml``, so the command line resumes or re-runs what the UI made.
Pictures uploaded as identities are kept in ``DIR/pictures/<sha256 prefix>.<ext>`` (their bytes as uploaded) and
named in ``story.yaml`` as ``image: ../pictures/...``, which the command line reads from the story file's folder.
Nothing is read or written outside ``DIR``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from pathlib import Path

from ..app import FolderError, StoryRequest, StorySettings
from ..app.folder import OutputFolder
from ..app.stories import document_from_manifest, parse_story, story_document
from ..inputs import InputError, excerpt
from ..output import read_json
from ..picture import bytes_digest, file_digest, load_picture_bytes
from .form import STORY_FILE, Loading, Settings, UiError, cli_command

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
PICTURES = "pictures"   # DIR/pictures: the uploaded identity pictures (not a story name)
PICTURE_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}   # what browsers show
PICTURE_NAME = re.compile(r"[0-9a-f]{16}\.(?:png|jpg|webp|gif|bmp)")
MAX_PICTURE_BYTES = 16 * 2**20      # an upload's size (a large phone photo is 5-10 MB)
MAX_PICTURE_PIXELS = 50_000_000     # its pixels, checked before decoding (the identity is fitted to ~1 MP anyway)


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
        for scene, group in zip(doc["scenes"], manifest.get("groups") or [], strict=True):
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


__all__ = ["MAX_PICTURE_BYTES", "MAX_PICTURE_PIXELS", "NAME", "PICTURES", "PICTURE_FORMATS", "PICTURE_NAME",
           "Workspace", "check_name", "picture_ref", "stored_picture", "upload_name"]
