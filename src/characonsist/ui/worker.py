"""The UI's work: one worker thread owns the model (loaded once) and runs queued jobs one at a time through the
application layer, the same ``validate_request`` / ``StoryRun`` as ``characonsist generate``. Each job keeps the
list of its events (queued, progress, images, done, ...), which the server streams to the browser. The stories
live in the workspace (``workspace.py``); the settings the form sends are ``form.Settings``.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field

from ..app import Cancelled, FolderError, StoryRequest, StoryRun, loading, validate_request
from ..app import model as models
from ..app.layouts import LAYOUTS, write_layouts
from ..app.regenerate import regenerate
from ..app.stories import MARK, dump_story, parse_story
from ..inputs import InputError, excerpt
from ..output import read_json
from .form import LABELS, STORY_FILE, Settings, UiError, new_seed
from .workspace import PICTURES, Workspace, check_name, stored_picture

PREVIEW_KEEP_S = 30     # a job's superseded preview pictures stay in its log this long (then only the newest)


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


__all__ = ["PREVIEW_KEEP_S", "UiJob", "Worker", "drop_pictures", "preview_mode"]
