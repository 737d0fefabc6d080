"""Regional ``torch.compile`` with the engine: graphs are built once per block type and image size, never per
layer or per step, for plain FLUX and for the methods (CPU, tiny model; dynamo's graph capture is counted with a
counting backend, which runs the captured graphs eagerly, so no C++ compiler is needed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from characonsist import CharaConsistPipeline, memory
from characonsist.testing import tiny_flux_pipeline
from conftest import FRAMES, IDENTITY  # the shared story (conftest.py)

PROMPTS = ["in the park a red cat sitting"] * 3
KW = dict(height=32, width=32, max_sequence_length=32, output_type="np")


@pytest.fixture
def dynamo():
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield CompileCounter(), counters
    torch._dynamo.reset()


def _pipes(layers: int, singles: int):
    flux = tiny_flux_pipeline(num_layers=layers, num_single_layers=singles)
    flux.set_progress_bar_config(disable=True)
    ours = CharaConsistPipeline.from_pipe(flux)
    ours.set_progress_bar_config(disable=True)
    return flux, ours


def _plain(flux, steps):
    gens = [torch.Generator("cpu").manual_seed(2025) for _ in PROMPTS]
    return flux(PROMPTS, generator=gens, num_inference_steps=steps, guidance_scale=3.5, **KW).images


@pytest.mark.slow
def test_compiled_blocks_no_recompile_per_step_or_layer(dynamo):
    count, counters = dynamo
    flux, ours = _pipes(2, 3)
    eager = ours(IDENTITY, FRAMES, num_inference_steps=12, **KW)
    memory.compile_pipeline(ours, backend=count)

    _plain(flux, 2)
    plain_graphs = count.frame_count
    assert 0 < plain_graphs < 5          # 5 blocks of 2 types: one graph per type, not per block
    _plain(flux, 5)
    assert count.frame_count == plain_graphs          # more steps: nothing new

    out = ours(IDENTITY, FRAMES, num_inference_steps=12, **KW)   # pre-run, masks, sharing, merge, plain steps
    first = count.frame_count
    assert first > plain_graphs          # the graphs around the method's attention
    np.testing.assert_allclose(np.stack(out.images), np.stack(eager.images), atol=1e-5)
    ours(IDENTITY, FRAMES, num_inference_steps=20, **KW)
    ours(IDENTITY, FRAMES, num_inference_steps=12, method="vanilla", seed=[1, 2, 3], **KW)
    _plain(flux, 3)                       # back to diffusers' processors: their graphs are still cached
    assert count.frame_count == first     # steady state: no recompilation for steps, schedules or methods

    breaks = {reason for reason in counters["graph_break"]}
    assert breaks and all("_method_attention" in reason for reason in breaks)   # the only graph break

    deeper, deeper_ours = _pipes(3, 4)    # more blocks of the same types reuse the same graphs
    memory.compile_pipeline(deeper_ours, backend=count)
    deeper_ours(IDENTITY, FRAMES, num_inference_steps=12, **KW)
    assert count.frame_count == first
