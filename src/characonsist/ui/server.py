"""The UI's web layer (Starlette): one static page, a JSON API and server-sent events. It only translates HTTP
to the worker (``ui/worker.py``) and the workspace (``ui/workspace.py``), which call the application layer.

Safe by default: the server answers only requests whose ``Host`` is the address it serves (a web page elsewhere
cannot reach it by DNS rebinding), writes only through JSON POSTs and picture uploads sent as
``application/octet-stream`` or ``image/*`` (a cross-site form can send neither), takes no file path from the
browser (stories are names, files are looked up inside the story's folder, pictures are stored under a name made
from their bytes), and reads story files the browser uploads as text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import zipfile
from importlib.resources import files

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..app.folder import FolderError
from ..app.layouts import LAYOUTS
from ..app.model import limits_of, load_t5_tokenizer
from ..app.stories import FORMATS, SUFFIX, dump_story, parse_story, story_document
from ..inputs import InputError
from ..seeds import DEFAULT_SEED
from .form import Settings, UiError
from .worker import Worker
from .workspace import (
    MAX_PICTURE_BYTES,
    MAX_PICTURE_PIXELS,
    PICTURE_FORMATS,
    PICTURES,
    Workspace,
    check_name,
    stored_picture,
)

STATIC = {"": ("index.html", "text/html; charset=utf-8"), "app.js": ("app.js", "text/javascript; charset=utf-8"),
          "style.css": ("style.css", "text/css; charset=utf-8")}
SERVED = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif", ".bmp": "image/bmp",
          ".pdf": "application/pdf", ".yaml": "text/yaml; charset=utf-8",
          ".toml": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8", ".json": "application/json"}
MAX_BODY = 2 * 2**20   # a JSON request's bytes (read no further)
MAX_JSON_DEPTH = 32    # its lists and objects nested (a story document needs 5)
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]"]


async def limited_body(request: Request, limit: int, too_big: UiError) -> bytes:
    """The request's body, read as it streams in and refused (``too_big``) once it passes ``limit`` bytes: an
    800 MB request costs the server at most ``limit``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise too_big
    return bytes(data)


def json_depth_problem(data, limit: int = MAX_JSON_DEPTH) -> str | None:
    """Why ``data`` (parsed JSON) nests too deeply, or None (iterative: any depth is measured safely)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (list, dict)):
            if depth > limit:
                return f"JSON nested more than {limit} levels deep (a story needs a few)"
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return None


async def body(request: Request) -> dict:
    """A JSON object sent as ``application/json``, at most ``MAX_BODY`` bytes and ``MAX_JSON_DEPTH`` levels."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise UiError("send JSON (Content-Type: application/json)", status=415)
    raw = await limited_body(request, MAX_BODY, UiError(f"request too large (at most {MAX_BODY} bytes)", status=413))
    try:
        data = json.loads(raw or b"{}")
    except RecursionError:
        raise UiError(f"not JSON a story can be: nested more than {MAX_JSON_DEPTH} levels deep", status=400) from None
    except ValueError as e:
        raise UiError(f"not JSON: {e}", status=400) from None
    if not isinstance(data, dict):
        raise UiError("expected a JSON object", status=400)
    problem = json_depth_problem(data)
    if problem:
        raise UiError(problem, status=400)
    return data


async def picture_bytes(request: Request) -> bytes:
    """An uploaded picture's bytes: sent as ``application/octet-stream`` or ``image/*`` (never a form), at most
    ``MAX_PICTURE_BYTES`` (read no further)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/octet-stream" and not kind.startswith("image/"):
        raise UiError("send the picture's bytes (Content-Type: application/octet-stream or image/...)", status=415)
    too_big = UiError(f"picture: more than the UI takes ({MAX_PICTURE_BYTES // 2**20} MiB); scale it down or save it "
                      "as JPEG", status=413)
    return await limited_body(request, MAX_PICTURE_BYTES, too_big)


def create_app(worker: Worker, allowed_hosts: list[str] | None = None) -> Starlette:
    """The ASGI app over a started (or test-driven) worker; it answers only requests whose ``Host`` is one of
    ``allowed_hosts`` (default: this machine's loopback names; ``ui.allowed_hosts`` gives a served address's)."""
    space: Workspace = worker.workspace

    def handle(fn):
        async def endpoint(request: Request):
            try:
                return await fn(request)
            except UiError as e:
                return JSONResponse({"problems": e.problems}, status_code=e.status)
            except InputError as e:
                return JSONResponse({"problems": space.relative(getattr(e, "problems", [str(e)]))}, status_code=422)
            except FolderError as e:
                return JSONResponse({"problems": space.relative([str(e)])}, status_code=409)
        return endpoint

    async def page(request: Request):
        name, kind = STATIC[request.path_params.get("asset", "")]
        text = (files("characonsist.ui") / "static" / name).read_bytes()
        return Response(text, media_type=kind, headers={"Cache-Control": "no-cache"})

    async def info(request: Request):
        from ..inversion import MODES
        from ..methods import METHODS, method_class
        from ..preview import MODES as PREVIEW_MODES

        ref = worker.ref
        limits = limits_of(ref, load_t5_tokenizer(ref))
        methods = {}
        for name in sorted(METHODS):

            cls = method_class(name)
            methods[name] = {"seeding": cls.seeding, "options": {
                f.name: f.default for f in dataclasses.fields(cls.Config)
                if isinstance(f.default, (bool, int, float, str, type(None)))}}
        return JSONResponse({
            "model": worker.model, "model_state": worker.model_state, "model_error": worker.model_error,
            "loading": " ".join(space.loading.flags(space.flags)),    # how the model is loaded, as generate's flags
            "defaults": ref.defaults, "seed": DEFAULT_SEED, "out": str(space.root), "methods": methods, "layouts": list(LAYOUTS),
            "formats": list(FORMATS), "limits": {"multiple": limits.multiple, "max_side": limits.max_side,
                                                 "vocabulary": list(limits.vocabulary or [])},
            "previews": {"modes": list(PREVIEW_MODES), "interval": worker.preview_interval, "size": worker.preview_size},
            "inversions": list(MODES), "pictures": {"max_bytes": MAX_PICTURE_BYTES, "max_pixels": MAX_PICTURE_PIXELS,
                                                    "formats": list(PICTURE_FORMATS)}})

    async def stories(request: Request):
        return JSONResponse({"stories": await run_in_threadpool(space.stories)})

    async def story(request: Request):
        return JSONResponse(await run_in_threadpool(space.story, request.path_params["name"]))

    async def parse(request: Request):
        data = await body(request)
        filename, text = str(data.get("filename") or "story.txt"), data.get("text")
        if not isinstance(text, str):
            raise UiError("give the story file's text")
        name = filename.replace("\\", "/").rsplit("/", 1)[-1] or "story.txt"   # a name for messages, never a path
        return JSONResponse({"story": story_document(await run_in_threadpool(parse_story, text, name))})

    async def storyfile(request: Request):
        data = await body(request)
        fmt = data.get("format", "yaml")
        text = dump_story(data.get("story"), fmt) if fmt in FORMATS else dump_story({}, fmt)
        name = data.get("name") if isinstance(data.get("name"), str) and data.get("name") else "story"
        return JSONResponse({"text": text, "filename": f"{name[:64]}{SUFFIX[fmt]}"})

    async def validate(request: Request):
        data = await body(request)
        name = check_name(data.get("name"))
        settings = Settings.parse(data.get("settings"))
        return JSONResponse(await run_in_threadpool(worker.validate, name, data.get("story"), settings))

    async def jobs(request: Request):
        if request.method == "GET":
            return JSONResponse({"jobs": [worker.jobs[i].summary() for i in worker.order],
                                 "model_state": worker.model_state})
        data = await body(request)
        job = await run_in_threadpool(worker.submit, str(data.get("kind")), data.get("name"), data)
        return JSONResponse(job.summary(), status_code=202)

    async def job(request: Request):
        found = worker.jobs.get(request.path_params["id"])
        if found is None:
            raise UiError(f"no job {request.path_params['id']!r}", status=404)
        return JSONResponse({**found.summary(), "log": found.events})

    async def cancel(request: Request):
        await body(request)
        return JSONResponse(worker.cancel(request.path_params["id"]).summary())

    async def events(request: Request):
        found = worker.jobs.get(request.path_params["id"])
        if found is None:
            raise UiError(f"no job {request.path_params['id']!r}", status=404)
        try:   # the id of the last event the browser has; anything else (negative, not a number): from the start
            start = max(int(request.headers.get("last-event-id", "-1")) + 1, 0)
        except ValueError:
            start = 0

        async def stream():
            seen, idle = start, 0
            while True:
                new = found.events[seen:]
                for event in new:
                    yield f"id: {event['seq']}\ndata: {json.dumps(event)}\n\n"
                seen += len(new)
                if found.finished and seen >= len(found.events):
                    return
                idle = 0 if new else idle + 1
                if idle and idle % 150 == 0:
                    yield ": still working\n\n"
                    if await request.is_disconnected():
                        return
                await asyncio.sleep(0.1)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def upload_picture(request: Request):
        data = await picture_bytes(request)
        stored = await run_in_threadpool(space.store_picture, data, request.query_params.get("filename"))
        return JSONResponse(stored, status_code=201 if stored["stored"] else 200)

    async def serve_picture(request: Request):
        path = space.picture(request.path_params["file"])
        return FileResponse(path, media_type=SERVED[path.suffix], headers={"Cache-Control": "no-cache"})

    async def serve_file(request: Request):
        name, rel = request.path_params["name"], request.path_params["path"]
        path = space.file(name, rel)
        kind = SERVED.get(path.suffix.lower())
        if kind is None:
            raise UiError(f"{rel!r}: not a file the UI serves", status=404)
        return FileResponse(path, media_type=kind, headers={"Cache-Control": "no-cache"})

    async def archive(request: Request):
        name = check_name(request.path_params["name"])
        folder = space.folder(name)
        if not folder.is_dir():
            raise UiError(f"no story {name!r}", status=404)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(folder.rglob("*")):
                rel = path.relative_to(folder)
                if path.is_symlink() or not path.is_file() or any(p.startswith(".") for p in rel.parts):
                    continue   # the lock, temporaries and anything hidden stay out; links are never followed
                if any(parent.is_symlink() for parent in path.parents if folder in parent.parents):
                    continue
                zf.write(path, f"{name}/{rel.as_posix()}")
            for file in sorted(await run_in_threadpool(story_pictures, space, name)):   # beside the story folder,
                zf.write(space.picture(file), f"{PICTURES}/{file}")    # where its story.yaml's ../pictures/ points
        return Response(buffer.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{name}.zip"'})

    routes = [
        Route("/", handle(page)), Route("/api/info", handle(info)), Route("/api/stories", handle(stories)),
        Route("/api/stories/{name}", handle(story)), Route("/api/stories/{name}/zip", handle(archive)),
        Route("/api/parse", handle(parse), methods=["POST"]), Route("/api/storyfile", handle(storyfile), methods=["POST"]),
        Route("/api/validate", handle(validate), methods=["POST"]),
        Route("/api/jobs", handle(jobs), methods=["GET", "POST"]), Route("/api/jobs/{id}", handle(job)),
        Route("/api/jobs/{id}/events", handle(events)),
        Route("/api/jobs/{id}/cancel", handle(cancel), methods=["POST"]),
        Route("/api/pictures", handle(upload_picture), methods=["POST"]),
        Route(f"/{PICTURES}/{{file}}", handle(serve_picture)),
        Route("/files/{name}/{path:path}", handle(serve_file)), Route("/{asset:str}", handle(static_asset(page))),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts or LOOPBACK_HOSTS),
                             www_redirect=False)]
    return Starlette(routes=routes, middleware=middleware)


def story_pictures(space: Workspace, name: str) -> set[str]:
    """The stored pictures a story's ``story.yaml`` names (those still there)."""
    try:
        doc = space.story(name)["story"]
    except UiError:
        return set()
    files = {stored_picture(im.get("image")) for scene in doc["scenes"] for im in scene["images"]}
    found = set()
    for file in files - {None}:
        try:
            space.picture(file)
            found.add(file)
        except UiError:
            pass
    return found


def static_asset(page):
    async def endpoint(request: Request):
        if request.path_params["asset"] not in STATIC:
            raise UiError(f"no page {request.path_params['asset']!r}", status=404)
        return await page(request)
    return endpoint
