import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*torchvision.*")


@pytest.fixture(scope="session")
def tiny_pipe():
    """A tiny random FluxPipeline (shared; tests must not modify it)."""
    from characonsist.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
