"""The application layer: story jobs between the library (``CharaConsistPipeline``) and the front ends.

Every front end (the command line today; a web UI and multi-GPU workers later) calls the same functions, so
the same mistake gets the same message everywhere and the output folder is handled the same way:

    from characonsist.app import StoryRequest, StoryRun, validate_request

    checked = validate_request(StoryRequest(stories=["story.txt"], model="toy", out="results/story"))
    with StoryRun(checked) as run:          # locks the folder, plans against what is on disk (resume)
        for job in run.todo:
            run.run(job, progress=lambda job, phase, done, total: ..., cancel=threading.Event())

Modules: ``settings`` (StorySettings: the one record of a run's settings), ``request`` (StoryRequest and its
validation, which makes the StorySettings), ``model`` (finding the model), ``memory_plan`` (how it will be loaded),
``loading`` (loading it and generating a group with it), ``folder``
(the output folder: lock, owned temporaries, paths), ``jobs`` (plan, run, write one group), ``manifest``,
``session`` (StoryRun), ``parallel`` (one process per GPU on a host) and ``ray_runner`` (a Ray cluster), both
with one process writing the folder. docs/ARCHITECTURE.md shows the layers.
"""

from __future__ import annotations

from .folder import FolderError, OutputFolder
from .jobs import Cancelled, GroupResult, Job
from .request import CheckedRequest, StoryRequest, validate_request
from .session import StoryRun
from .settings import StorySettings

__all__ = ["Cancelled", "CheckedRequest", "FolderError", "GroupResult", "Job", "OutputFolder", "StoryRequest",
           "StoryRun", "StorySettings", "validate_request"]
