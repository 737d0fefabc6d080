"""The application layer: story jobs between the library (``CharaConsistPipeline``) and the front ends.

Every front end (the command line today; a web UI and multi-GPU workers later) calls the same functions, so
the same mistake gets the same message everywhere and the output folder is handled the same way:

    from characonsist.app import StoryRequest, StoryRun, validate_request

    checked = validate_request(StoryRequest(stories=["story.txt"], model="toy", out="results/story"))
    with StoryRun(checked) as run:          # locks the folder, plans against what is on disk (resume)
        for job in run.todo:
            run.run(job, progress=lambda job, phase, done, total: ..., cancel=threading.Event())

Modules: ``request`` (StoryRequest and its validation), ``model`` (finding and loading the model), ``folder``
(the output folder: lock, owned temporaries, paths), ``jobs`` (plan, run, write one group), ``manifest``,
``session`` (StoryRun), ``parallel`` (one process per GPU on a host) and ``ray_runner`` (a Ray cluster), both
with one process writing the folder. docs/ARCHITECTURE.md shows the layers.
"""

from __future__ import annotations

from .folder import FolderError, OutputFolder
from .jobs import Cancelled, Job
from .model import GroupResult
from .request import CLI_NAMES, CheckedRequest, StoryRequest, validate_request
from .session import StoryRun

__all__ = ["CLI_NAMES", "Cancelled", "CheckedRequest", "FolderError", "GroupResult", "Job", "OutputFolder",
           "StoryRequest", "StoryRun", "validate_request"]
