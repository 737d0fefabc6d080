"""A story run: the output folder locked, the jobs planned against what is on disk, then run one at a time.

    checked = validate_request(request)
    with StoryRun(checked) as run:           # lock, resume plan, manifest; InputError / FolderError
        run.load()                           # the model (only if there is work: run.todo)
        for job in run.todo:
            run.run(job, progress=..., cancel=...)   # writes the group and the manifest; False if it failed

Every front end (the command line, a web UI, a worker of a multi-GPU run) drives the same object, so resume,
ownership of files and messages are the same everywhere.
"""

from __future__ import annotations

from ..inputs import InputError, excerpt
from ..storyfile import StoryError
from . import loading
from .folder import FolderError, describe_os_error
from .jobs import Cancelled, GroupResult, Job, plan_jobs, prepare_overwrite, run_job, write_job, write_storyboard
from .manifest import check_manifest_is_ours, earlier_groups, write_manifest
from .memory_plan import free_cuda, is_oom, oom_advice
from .request import CheckedRequest, story_problems
from .settings import StorySettings, setting


class StoryRun:
    """The run of a checked request (see the module docstring)."""

    def __init__(self, checked: CheckedRequest):
        self.checked = checked
        self.folder = checked.folder
        self.jobs: list[Job] = []
        self.engine = None
        self.engine_factory = None   # (ref, settings, progress) -> generate; None: app.loading.load_engine
        self.failed = 0
        self.earlier: list[dict] = []   # groups of an earlier run in the folder that this one does not have

    # ------------------------------------------------------------------ plan
    def __enter__(self) -> StoryRun:
        self.folder.open()
        try:
            self.plan()
        except BaseException:
            self.folder.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.jobs and not self.folder.read_only:
                self.save_manifest()
        except FolderError:
            if exc[0] is None:
                raise
        finally:
            self.folder.close()

    def plan(self) -> list[Job]:
        """What is on disk: finished groups are skipped, groups made with other settings stop the run before any
        work (unless ``overwrite``), files characonsist did not write are never replaced."""
        c, request, save_masks = self.checked, self.checked.request, self.checked.settings.save_masks
        old = check_manifest_is_ours(self.folder)
        self.jobs = plan_jobs(c.stories, c.settings, self.folder)
        self.earlier = earlier_groups(self.folder, old, self.jobs)
        foreign = [f"{j.folder}: {p}" for j in self.jobs for p in j.foreign]
        if foreign:
            raise FolderError(f"{len(foreign)} file(s) in {self.folder.root} that characonsist did not write are where "
                              f"this run writes ({'; '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}): "
                              "move them away or choose another folder", self.folder.root)
        conflicts = [j for j in self.jobs if j.state == "conflict"]
        if conflicts and not request.overwrite:
            lines = [f"  {j.folder}: " + "; ".join(j.changes[:4])
                     + (f" (+{len(j.changes) - 4} more)" if len(j.changes) > 4 else "") for j in conflicts]
            raise InputError(f"{len(conflicts)} group(s) in {self.folder.root} were generated with other settings:\n"
                             + "\n".join(lines) + f"\nRerun with {setting(c.names, 'overwrite', True)} to replace "
                             "them, or choose another output folder.")
        if self.folder.read_only and self.todo:
            why = self.folder.read_only_why
            raise FolderError(f"{self.folder.root} is not writable ({why}) and {len(self.todo)} group(s) remain to "
                              "generate; make it writable or choose another folder", self.folder.root)
        for job in conflicts:   # overwrite: start the group from scratch, without the old group's extra files
            prepare_overwrite(job, self.folder)
        for job in self.jobs:   # all images there, only the storyboard lost: no model needed
            if job.state != "done" and all(job.finished) and not save_masks:
                write_storyboard(job, self.folder, save_masks)
                job.state = "done"
        self.save_manifest()
        return self.jobs

    @property
    def todo(self) -> list[Job]:
        return [j for j in self.jobs if j.state != "done"]

    def save_manifest(self) -> None:
        write_manifest(self.folder, self.checked.stories, self.checked.settings, self.jobs, self.earlier)

    # ------------------------------------------------------------------ run
    def load(self, progress: bool = True):
        """Load the model (``app.loading.load_engine``); prompts the pre-load checks could not read are checked
        now, before any work (StoryError)."""
        c = self.checked
        self.engine = load_engine(c.ref, c.settings, progress, self.engine_factory)
        self.check_loaded(getattr(self.engine, "tokenizer", None), getattr(self.engine, "limits", None))
        return self.engine

    def check_loaded(self, tokenizer, limits) -> None:
        """Check the stories again with the loaded model's tokenizer and limits where the pre-load checks could
        not have them (StoryError); also used with what a remote worker's loaded model reports."""
        c = self.checked
        if (c.tokenizer is None and tokenizer is not None) or (limits is not None and limits != c.limits):
            problems = story_problems(c.stories, c.settings, limits or c.limits, c.tokenizer or tokenizer, c.ref, c.names)
            if problems:
                raise StoryError(problems)

    def run(self, job: Job, progress=None, cancel=None) -> bool:
        """Generate and write one job; the manifest is saved whatever happens. Returns False when the group
        failed (its error is in the manifest and ``job.error``); file-system errors, interruptions and
        cancellation propagate (what is finished stays)."""
        if self.engine is None:
            self.load()
        try:
            result = run_job(job, self.engine, progress=progress, cancel=cancel)
        except (KeyboardInterrupt, Cancelled):
            self._save_quietly()
            raise
        except Exception as error:  # one bad group must not end an overnight run
            return self.fail(job, failure_message(error, self.checked.settings, self.checked.names))
        return self.write(job, result)

    def write(self, job: Job, result: GroupResult) -> bool:
        """Write a group generated here or elsewhere (a worker process or actor of a multi-GPU run hands its
        ``GroupResult`` to the run holding the folder), then the manifest. False if the result could not be
        written for a reason other than the file system (FolderError propagates)."""
        try:
            write_job(job, result, self.folder, self.checked.settings.save_masks)
            return True
        except (KeyboardInterrupt, Cancelled):
            raise
        except FolderError as error:
            job.state, job.error = "failed", str(error)
            raise
        except Exception as error:
            self.failed += 1
            job.state, job.error = "failed", f"{type(error).__name__}: {error}"
            return False
        finally:
            self._save_quietly()

    def fail(self, job: Job, message: str) -> bool:
        """Record that a group failed (here or in a worker: ``message`` says why) and save the manifest."""
        self.failed += 1
        job.state, job.error = "failed", message
        self._save_quietly()
        return False

    def _save_quietly(self) -> None:
        try:
            self.save_manifest()
        except FolderError:
            pass   # the error that stopped the write is the one reported


def failure_message(error: BaseException, settings: StorySettings, names: dict | None = None) -> str:
    """What the manifest says about a group whose generation raised ``error`` (out of GPU memory: the memory
    modes that would fit, and the CUDA cache is freed)."""
    if is_oom(error):
        free_cuda()
        return oom_advice(settings.memory, settings.gpu_ids, names)
    return f"{type(error).__name__}: {error}"


def load_engine(ref, settings: StorySettings, progress: bool = True, factory=None):
    """``factory`` (default ``app.loading.load_engine``) with unreadable or missing weights as one FolderError
    line."""
    try:
        return (factory or loading.load_engine)(ref, settings, progress=progress)
    except OSError as error:   # unreadable or missing weights, a broken download: one line, not a traceback
        where = getattr(error, "filename", None) or (ref.folder or ref.name)
        what = describe_os_error(error, where, "loading the model from") if error.errno else \
            f"loading the model {ref.name}: {excerpt(str(error), 300)}; check the model's files and rerun"
        raise FolderError(what, where) from None
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as error:
        if is_oom(error) or isinstance(error, InputError):
            raise                # out of memory has its own advice; an InputError is already one line
        # a config.json the model classes cannot be built from, a weights file of another shape: one line
        raise FolderError(f"loading the model {ref.name}: {type(error).__name__}: {excerpt(str(error), 300)}; check "
                          "the model's files (its config.json files and weights) and rerun", ref.folder or ref.name) \
            from None
