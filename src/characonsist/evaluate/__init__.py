"""Evaluation with the papers' metrics (``characonsist eval``): CLIP-T, CLIP-I (whole, foreground, background),
DINOv2, DreamSim and face identity similarity over any run folder, plus the ConsiStory+ converter.

    from characonsist.evaluate import EvalConfig, evaluate_run, read_run
    result = evaluate_run(read_run("results/run"), EvalConfig(pairs="all"))
"""

from .evaluator import EvalConfig, ModelBank, evaluate_run
from .runfolder import RunError, read_run
from .unavailable import ModelUnavailable

__all__ = ["EvalConfig", "ModelBank", "ModelUnavailable", "RunError", "evaluate_run", "read_run"]
