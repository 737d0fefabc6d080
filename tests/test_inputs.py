"""One validation layer: the Python API (``CharaConsistPipeline.check_inputs``, ``StoryImage``, method Configs) and
the application layer (``validate_request``, what the CLI uses) apply the same rules with the same messages, all
before any work; the toy model loads in float32 and knows its own vocabulary."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest

from characonsist import CharaConsistPipeline, StoryImage
from characonsist.inputs import InputError, closed_vocabulary, excerpt, unknown_words

IDENTITY = "in the park#a red cat#sitting"
FRAMES = ["in the park#a red cat#running", "in the city#a red cat#jumping"]
KW = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=32, output_type="np")


@pytest.fixture
def no_work(story_pipe, monkeypatch):
    """Any forward pass fails the test: bad input must be refused before the engine runs."""
    from characonsist import engine

    def forbidden(*args, **kwargs):
        raise AssertionError("the engine ran")

    monkeypatch.setattr(engine.Engine, "generate", forbidden)
    return story_pipe


@pytest.mark.parametrize("call, message", [
    (dict(identity=None), "identity: expected a 'background#character#action' string or a StoryImage, got NoneType"),
    (dict(identity=123), "identity: expected a 'background#character#action' string or a StoryImage, got int 123"),
    (dict(frames=[123]), "frames[0]: expected a 'background#character#action' string or a StoryImage, got int"),
    (dict(frames="a#b#c"), "frames must be a list of images"),
    (dict(frames=["park#cat"]), "frames[0]: prompt 'park#cat' has 1 '#'"),
    (dict(num_inference_steps=0), "num_inference_steps=0 must be between 1 and 1000"),
    (dict(num_inference_steps=-1), "num_inference_steps=-1 must be between 1 and 1000"),
    (dict(num_inference_steps=2.5), "num_inference_steps=2.5 must be an integer"),
    (dict(height=-16), "height=-16 is not a positive multiple of 16"),
    (dict(height=100), "height=100 is not a positive multiple of 16"),
    (dict(height="128"), "height='128' must be an integer (pixels)"),
    (dict(width=100_000), "width=100000 is larger than this model takes: at most 2048"),
    (dict(guidance_scale=float("nan")), "guidance_scale=nan must be a finite number"),
    (dict(max_sequence_length=0), "max_sequence_length=0 must be between 1 and 512"),
    (dict(max_sequence_length=600), "max_sequence_length=600 must be between 1 and 512"),
    (dict(batch_size=1), "batch_size=1 must be >= 2"),
    (dict(seed=-3), "seed=-3 is out of range"),
    (dict(seed=[1, 2]), "seed: got 2 seeds for 3 images"),
    (dict(generator="abc"), "generator: expected a torch.Generator"),
    (dict(output_type="jpeg"), "output_type='jpeg'; valid: 'pil', 'np', 'pt', 'latent'"),
    (dict(callback_on_step_end_tensor_inputs=["prompt_embeds"]), "'prompt_embeds' not available"),
    (dict(mask_step="ten"), "method 'characonsist': option mask_step='ten': must be an integer"),
    (dict(mask_step=-5), "option mask_step=-5: must be >= 0"),
    (dict(sim_threshold=float("nan")), "option sim_threshold=nan: must be a finite number"),
    (dict(share_start=30, share_end=2), "options share_start=30 and share_end=2: share_start must not be after"),
    (dict(volatile_backend="bogus"), "option volatile_backend='bogus': valid: 'flash', 'default'"),
    (dict(share_bg="yes"), "option share_bg='yes': must be true or false"),
    (dict(colour="red"), "method 'characonsist' has no option(s) colour; valid options: share_bg"),
    (dict(method="storysync", gamma=float("inf")), "option gamma=inf: must be a finite number"),
    (dict(method="consistory", anchors=-1), "option anchors=-1: must be >= 0"),
    (dict(method="storydiffusion", blocks="middle"), "option blocks='middle': valid: 'single', 'double', 'all'"),
    (dict(method="magic"), "unknown method 'magic'"),
    (dict(num_inference_steps=10**7), "num_inference_steps=10000000 must be between 1 and 1000 (the scheduler has"),
    (dict(sim_threshold=2), "option sim_threshold=2.0: must be in [-1, 1]"),
    (dict(mask_step=60), "option mask_step=60: the step options are written for schedule_steps=50 steps"),
    (dict(method="consistory", inject_threshold=5), "option inject_threshold=5.0: must be in [-1, 1]"),
    (dict(share_end=60), "option share_end=60: the step options are written for schedule_steps=50 steps (and "
                         "rescaled to the run's), so it must be <= 50; or set schedule_steps"),
    (dict(method="consistory", feature_step=50), "option feature_step=50: the step options are written for"),
    (dict(method="storysync", bli_end=51), "option bli_end=51: the step options are written for"),
    (dict(method="storydiffusion", skip_switch=80), "option skip_switch=80: the step options are written for"),
    # FluxPipeline's arguments get a hint, not "no such option"
    (dict(prompt="a cat"), "prompt: a story call has no prompt: give identity="),
    (dict(latents=np.zeros(3)), "latents: a story call makes its own starting noise from seed= or generator="),
    (dict(negative_prompt="ugly"), "negative_prompt: FLUX.1 has no negative prompt"),
    (dict(identity=IDENTITY + " and" * 40), "T5 tokens, but the text encoder takes at most 32 (max_sequence_length)"),
])
def test_bad_calls_are_refused_before_any_work(no_work, call, message):
    call = {"identity": IDENTITY, "frames": FRAMES, **KW, **call}
    with pytest.raises(ValueError) as info:
        no_work(**call)
    assert isinstance(info.value, InputError)
    assert message in str(info.value)


def test_every_problem_is_reported_at_once(no_work):
    with pytest.raises(InputError) as info:
        no_work(None, [123], **{**KW, "height": 100, "num_inference_steps": 0}, mask_step=-1)
    assert len(info.value.problems) == 5


@pytest.mark.parametrize("fields, message", [
    (dict(background="a", character=None), "StoryImage: character must be text, got NoneType None"),
    (dict(background=None, character="b"), "StoryImage: background must be text"),
    (dict(background="a", character="  "), "the character field is empty"),
    (dict(background="a", character="b", height="128"), "StoryImage: height='128' must be an integer (pixels)"),
    (dict(background="a", character="b", width=-16), "StoryImage: width=-16 is not a positive multiple of 16"),
    (dict(background="a", character="b", seed=2**64), "StoryImage: seed=18446744073709551616 is out of range"),
    (dict(background="a", character="b", seed=1.5), "StoryImage: seed=1.5 must be an integer"),
])
def test_story_image_checks_its_fields(fields, message):
    with pytest.raises(InputError, match=None) as info:
        StoryImage(**fields)
    assert message in str(info.value)
    assert StoryImage("a", "b", height=np.int64(32)).height == 32 and type(StoryImage("a", "b", seed=np.int32(3)).seed) is int


def test_the_command_line_and_the_api_say_the_same(story_pipe, tmp_path):
    """The same mistake, one message: the application layer (before loading) and the pipeline (after)."""
    from characonsist.app import StoryRequest, validate_request

    folder = tmp_path / "model"
    story_pipe.save_pretrained(folder)
    story = tmp_path / "s.txt"
    story.write_text(f"{IDENTITY}\n{FRAMES[0]}\n")
    cases = [dict(num_inference_steps=0), dict(height=100), dict(guidance_scale=float("inf")),
             dict(max_sequence_length=0), dict(method_options={"mask_step": "ten"}),
             dict(method_options={"share_start": 9, "share_end": 3})]
    for case in cases:
        request = StoryRequest(stories=[str(story)], model=str(folder), out=str(tmp_path / "out"),
                               **{"max_sequence_length": 32, **case})
        with pytest.raises(InputError) as app_error:
            validate_request(request)
        call = {k: v for k, v in case.items() if k != "method_options"}
        with pytest.raises(InputError) as api_error:
            story_pipe(IDENTITY, FRAMES[:1], **{**KW, **call}, **case.get("method_options", {}))
        assert app_error.value.problems == api_error.value.problems, case


def test_long_values_are_cut_in_messages():
    assert len(excerpt("x" * 200_000)) < 120 and "(200000 characters)" in excerpt("x" * 200_000)
    with pytest.raises(InputError) as info:
        StoryImage.parse("y" * 200_000)
    assert len(str(info.value)) < 300


# ------------------------------------------------------------------ the toy model

@pytest.fixture(scope="module")
def toy_pipe():
    from characonsist.toy.model import TOY_MODEL_DIR

    pipe = CharaConsistPipeline.from_pretrained(TOY_MODEL_DIR)   # no dtype: the first call of a Python user
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_toy_model_loads_in_float32_and_just_works(toy_pipe):
    import torch

    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert getattr(toy_pipe, name).dtype == torch.float32, name
    defaults = toy_pipe.story_defaults()
    seen = []
    out = toy_pipe("a sunny beach#a robot#big in the middle", ["a green forest#a robot#small on the left"],
                   method="vanilla", num_inference_steps=2, output_type="np",
                   progress_callback=lambda phase, done, total: seen.append((phase, done, total)))
    assert out.identity.shape == (defaults["height"], defaults["width"], 3)   # the model's size, not 1024
    assert out.settings["max_sequence_length"] == defaults["max_sequence_length"]
    assert np.isfinite(out.identity).all() and seen[-1] == ("main", 2, 2)


def test_toy_vocabulary_comes_from_its_tokenizer(toy_pipe, tiny_pipe):
    vocabulary = closed_vocabulary(toy_pipe.tokenizer_2)
    assert vocabulary and {"robot", "beach", "left"} <= set(vocabulary)
    assert closed_vocabulary(tiny_pipe.tokenizer_2) is None   # sub-word pieces: an open vocabulary
    assert unknown_words(toy_pipe.tokenizer_2, "a Robot, on the beach! waving at bob", vocabulary) == [
        "Robot,", "waving", "at", "bob"]
    with pytest.raises(InputError) as info:   # a short prompt would silently give noise; a long one a length error
        toy_pipe("a quiet park in autumn#a girl with a red scarf#feeding pigeons by the old fountain", [])
    message = str(info.value)
    assert "identity: 12 word(s) the model does not know: 'quiet', 'park', 'autumn'" in message
    assert "The model knows only these words (its tokenizer is word-level): " + ", ".join(vocabulary) in message
    assert "T5 tokens" not in message
    with pytest.raises(InputError, match="height=1024 is larger than this model takes: at most 256"):
        toy_pipe("a sunny beach#a robot#big in the middle", [StoryImage("a grey city", "a robot", "small on the left",
                                                                        height=1024, width=768)])


# ------------------------------------------------------------------ progress and noise

def test_step_bars_count_each_pass(story_pipe):
    stream = io.StringIO()
    story_pipe.set_progress_bar_config(file=stream, ascii=True, mininterval=0)
    seen = []
    try:
        story_pipe(IDENTITY, FRAMES[:1], **{**KW, "num_inference_steps": 10}, mask_step=15,   # 10 + 3 pre-run
                   progress_callback=lambda phase, done, total: seen.append((phase, done, total)))
    finally:
        story_pipe.set_progress_bar_config(disable=True)
    text = stream.getvalue()
    assert "steps: 100%" in text and "10/10" in text and "/13" not in text and "layout pre-run" in text
    assert seen[0] == ("prerun", 1, 4) and seen[-1] == ("main", 10, 10)


def test_from_pipe_does_not_warn_about_an_empty_fp32_list(tiny_pipe):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers.models.modeling_utils")
    logger.addHandler(handler)
    try:
        CharaConsistPipeline.from_pipe(tiny_pipe)
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "kept in float32" in r.getMessage()]


def test_toy_model_on_the_command_line_refuses_before_loading(tmp_path, monkeypatch, capsys):
    """`generate --model toy`: words outside its vocabulary and sizes it cannot take, before the weights load."""
    from characonsist import cli
    from characonsist.app import loading as app_loading

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(app_loading, "load_engine", forbidden)
    story = tmp_path / "story.txt"
    story.write_text("a quiet park#a robot#big in the middle\na sunny beach#a robot#small on the left\n")
    assert cli.main(["generate", str(story), "--model", "toy", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{story}:1: 2 word(s) the toy model does not know: 'quiet', 'park'\n" in err
    assert "The toy model knows only these words (its tokenizer is word-level): a, beach, big" in err
    assert f"{story}:2" not in err
    story.write_text("a sunny beach#a robot#big in the middle\na sunny beach#a robot#small on the left\n")
    assert cli.main(["generate", str(story), "--model", "toy", "--out", str(tmp_path / "o"), "--quiet",
                     "--height", "1024", "--width", "768"]) == 2
    err = capsys.readouterr().err
    assert "--height 1024 is larger than this model takes: at most 256" in err and "--width 768" in err
    assert not (tmp_path / "o").exists()


def test_what_only_the_loaded_model_tells_is_checked_before_any_group(tmp_path, monkeypatch, capsys, toy_pipe):
    """A model folder without a separate tokenizer: its vocabulary and size limit are read once it is loaded,
    still before the first group is generated."""
    from characonsist import cli
    from characonsist.app import loading as app_loading
    from conftest import FakeEngine

    engine = FakeEngine()
    engine.tokenizer, engine.limits = toy_pipe.tokenizer_2, toy_pipe.input_limits()
    monkeypatch.setattr(app_loading, "load_engine", lambda *a, **k: engine)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    story = tmp_path / "story.txt"
    story.write_text("a sunny beach#a robot#big in the middle\na sunny beach#a robot#waving\n")
    assert cli.main(["generate", str(story), "--model", str(folder), "--out", str(tmp_path / "o"), "--quiet",
                     "--height", "512", "--width", "128"]) == 2
    err = capsys.readouterr().err
    assert "--height 512 is larger than this model takes: at most 256" in err
    assert f"{story}:2: 1 word(s) model {folder} does not know: 'waving'" in err
    assert engine.calls == []


def test_step_options_past_the_schedule_are_valid_once_the_schedule_says_so():
    from characonsist.methods.characonsist import CharaConsistConfig, step_schedule

    config = CharaConsistConfig(mask_step=60, schedule_steps=100)
    assert step_schedule(config, 100)["mask_step"] == 60
    with pytest.raises(InputError, match="must be < 50"):
        CharaConsistConfig(mask_step=50)


def test_the_readmes_torch_dtype_keyword_loads_without_a_deprecation_warning(recwarn):
    import torch

    from characonsist.toy.model import TOY_MODEL_DIR

    pipe = CharaConsistPipeline.from_pretrained(TOY_MODEL_DIR, torch_dtype=torch.float16)
    assert pipe.transformer.dtype == torch.float16 and pipe.text_encoder_2.dtype == torch.float16
    again = CharaConsistPipeline.from_pipe(pipe, torch_dtype=torch.float32)
    assert again.transformer.dtype == torch.float32
    assert not [w for w in recwarn if "torch_dtype" in str(w.message)]
