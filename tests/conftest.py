"""Shared fixtures and constants: the tiny FLUX pipeline (in memory and saved to disk), the fake engine of the
application-layer tests, and the story most engine tests generate (``IDENTITY``, ``FRAMES``, ``KW``)."""

import hashlib
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from characonsist.app.jobs import GroupResult

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*torchvision.*")

# the story most engine tests generate: an identity and two frames at 32x32, six steps
IDENTITY = "in the park#a red cat#sitting"
FRAMES = ["in the park#a red cat#running", "on a beach#a red cat#jumping"]
KW = dict(height=32, width=32, num_inference_steps=6, max_sequence_length=32, output_type="np")


def effects_off(steps: int) -> dict[str, dict]:
    """Every method's options with its effects switched off for a run of ``steps`` steps (each method's own tests
    check that these reproduce the plain pipeline; CharaConsist's sharing starts at the last step, i.e. never)."""
    return {"characonsist": dict(share_start=steps, schedule_steps=None, use_token_merge=False),
            "consistory": dict(sdsa=False, injection=False, query_blending=False),
            "storysync": dict(share=False, rfh=False, bli=False),
            "storydiffusion": dict(sample_rate=0.0, early_full_read=False)}


@pytest.fixture(scope="session")
def tiny_pipe():
    """A tiny random FluxPipeline (shared; tests must not modify it)."""
    from characonsist.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny FLUX pipeline (``testing.tiny_flux_pipeline()``) saved as a diffusers folder, as a user loads one;
    shared: tests must not write into it."""
    from characonsist.testing import tiny_flux_pipeline

    folder = tmp_path_factory.mktemp("tiny") / "flux"
    tiny_flux_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def story_pipe(tiny_pipe):
    from characonsist import CharaConsistPipeline

    pipe = CharaConsistPipeline.from_pipe(tiny_pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(autouse=True)
def _keep_the_attention_backend():
    """diffusers' ``set_attention_backend`` also sets the process-wide active backend: a test that picks one (the
    memory tests) must not change the numerics of the tests after it (the byte-for-byte comparisons)."""
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    except ImportError:   # pragma: no cover
        yield
        return
    before = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(before)


@pytest.fixture(scope="session")
def tiny_eval_models(tmp_path_factory):
    """Tiny random models of every eval metric, saved like real ones (``characonsist.evaluate.tiny``); shared."""
    from characonsist.evaluate.tiny import save_tiny_models

    return save_tiny_models(tmp_path_factory.mktemp("tiny_eval_models"))


@pytest.fixture
def model_dir(tmp_path):
    """A folder that passes the model checks (the fake engine never reads it)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    return folder


class FakeMatches:
    def __init__(self, n):
        self.frame_idx, self.id_idx, self.sim = np.arange(n), np.arange(n)[::-1].copy(), np.linspace(1, 0.5, n)


class FakeEngine:
    """Deterministic images from (prompt, seed); records every group it is asked for; can fail on demand."""

    def __init__(self, fail_on: dict | None = None):
        self.calls: list[str] = []
        self.fail_on = fail_on or {}
        self.tokenizer = None
        self.notes: dict[int, list[str]] = {}     # image index -> the notes the engine reports for it

    def __call__(self, job, progress_callback=None):
        self.calls.append(job.folder)
        if job.folder in self.fail_on:
            raise self.fail_on[job.folder]
        images, masks = [], []
        for r in job.records:
            digest = hashlib.sha256(f"{r['prompt']}|{r['seed']}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            images.append(Image.fromarray(rng.integers(0, 255, (r["height"], r["width"], 3), dtype=np.uint8)))
            masks.append(rng.random((r["height"] // 16, r["width"] // 16)) > 0.5)
        matches = [FakeMatches(4) for _ in job.records[1:]]
        notes = [list(self.notes.get(i, [])) for i in range(len(job.records))]
        return GroupResult(images, masks, matches, notes, {"method": job.records[0]["method"], "fake": True})


@pytest.fixture
def fake(monkeypatch):
    """The engine replaced by a ``FakeEngine`` (``app.loading.load_engine`` monkeypatched); ``fake.loads`` lists
    every load as (model, memory mode, GPUs)."""
    engine = FakeEngine()
    loads = []

    def load_engine(ref, settings, progress=True):
        loads.append((ref.name, settings.memory, list(settings.gpu_ids)))
        return engine

    from characonsist.app import loading as app_loading

    monkeypatch.setattr(app_loading, "load_engine", load_engine)
    engine.loads = loads
    return engine
