"""The shipped toy model loads as a plain FluxPipeline and samples; the training recipe's pieces run on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from characonsist._compat import dtype_kwarg
from characonsist.toy import world
from characonsist.toy.model import TOY_MODEL_DIR, load_toy_defaults, load_toy_pipeline
from characonsist.toy.training import config, data, loop, losses, networks

PROMPT = "a sunny beach a cat big in the middle"


@pytest.fixture(scope="module")
def toy():
    return load_toy_pipeline()


def _sample(pipe, defaults, seed: int, steps: int = 2) -> np.ndarray:
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                height=defaults["height"], width=defaults["width"], guidance_scale=defaults["guidance_scale"],
                max_sequence_length=defaults["max_sequence_length"], output_type="np").images[0]


def test_shipped_folder_is_a_flux_pipeline():
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(TOY_MODEL_DIR, **dtype_kwarg(torch.float32))
    assert pipe.transformer.config.num_layers >= 1 and pipe.transformer.config.num_single_layers >= 1
    assert pipe.transformer.config.guidance_embeds is False
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 4
    defaults = json.loads((TOY_MODEL_DIR / "characonsist_defaults.json").read_text())
    assert defaults == load_toy_defaults()
    assert set(defaults) >= {"height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length"}
    size = sum(p.stat().st_size for p in TOY_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 30 * 2 ** 20


def test_samples_128px_deterministic(toy):
    pipe, defaults = toy
    a, b, c = _sample(pipe, defaults, 0), _sample(pipe, defaults, 0), _sample(pipe, defaults, 1)
    assert a.shape == (128, 128, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_every_vocabulary_word_is_one_t5_token(toy):
    pipe, _ = toy
    for word in world.VOCAB_WORDS:
        assert len(pipe.tokenizer_2(word, add_special_tokens=False).input_ids) == 1, word
        assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_missing_weights_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="toy model weights are missing"):
        load_toy_pipeline(path=tmp_path)


def test_training_step_runs_on_cpu():
    tiny_tr = dict(networks.TRANSFORMER_CONFIG, num_layers=1, num_single_layers=1, num_attention_heads=2)
    tiny_vae = dict(networks.VAE_CONFIG, block_out_channels=(8, 8, 16), norm_num_groups=4)
    pipe = networks.build_pipeline(0, transformer_config=tiny_tr, vae_config=tiny_vae)
    images, prompts = data.render_dataset(2, seed=0, chunk=2, workers=1)
    assert images.shape == (2, 128, 128, 3) and images.dtype == np.uint8
    assert all(p == " ".join(p.split()) and "#" not in p for p in prompts)

    x = data.to_pixels(images)
    assert x.shape == (2, 3, 128, 128) and -1 <= x.min() and x.max() <= 1
    loss, _, _ = losses.vae_loss(pipe.vae, x, 1e-4, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)

    with torch.no_grad():
        lat = pipe.vae.encode(x).latent_dist.mean
    assert lat.shape == (2, 16, 32, 32)
    embeds, pooled = loop.encode_prompts(pipe, prompts, 32, torch.device("cpu"))
    assert embeds.shape == (2, 32, 64) and pooled.shape == (2, 64)
    gen = torch.Generator().manual_seed(0)
    sig = losses.sample_sigmas(2, losses.pipeline_mu(256), 0.1, gen, "cpu")
    assert ((sig > 0) & (sig <= 1)).all()
    loss = losses.flow_loss(pipe.transformer, lat, torch.randn(lat.shape, generator=gen), sig, embeds, pooled)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in pipe.transformer.parameters() if p.requires_grad)


def test_schedule_and_shift_match_the_pipeline():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = config.TrainConfig(steps=1000, warmup=100, decay_frac=0.25)
    lrs = [losses.lr_at(s, cfg) for s in range(1000)]
    assert lrs[0] < lrs[99] == cfg.lr == lrs[749] and lrs[999] < 0.01 * cfg.lr
    c = networks.SCHEDULER_CONFIG
    assert losses.pipeline_mu(256) == pytest.approx(calculate_shift(
        256, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"]))


def _tiny_pipe():
    tiny_tr = dict(networks.TRANSFORMER_CONFIG, num_layers=1, num_single_layers=1, num_attention_heads=2)
    tiny_vae = dict(networks.VAE_CONFIG, block_out_channels=(8, 8, 16), norm_num_groups=4)
    return networks.build_pipeline(0, transformer_config=tiny_tr, vae_config=tiny_vae)


def test_text_reaches_the_image_through_attention_only():
    """Pooled CLIP output is the same (zero) for every prompt; T5 tokens are context free."""
    pipe = _tiny_pipe()
    prompts = ["a sunny beach a cat big on the left", "a grey city a robot small in the middle"]
    embeds, pooled = loop.encode_prompts(pipe, prompts, 32, torch.device("cpu"))
    assert torch.count_nonzero(pooled) == 0
    # "a" is the first token of both prompts, "big"/"small" differ in context but "a" must not
    assert torch.equal(embeds[0, 0], embeds[1, 0])
    assert not torch.equal(embeds[0, 1], embeds[1, 1])
    _, pooled_v1 = loop.encode_prompts(networks.build_pipeline(0, null_pooled=False), prompts, 32,
                                        torch.device("cpu"))
    assert not torch.equal(pooled_v1[0], pooled_v1[1])


def test_ema_export_round_trip(tmp_path):
    from characonsist.toy.model import load_toy_pipeline

    pipe = _tiny_pipe()
    run = tmp_path / "run"
    run.mkdir()
    stale = run / "pipeline" / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old shard")
    networks.save_run_pipeline(pipe, run)
    assert not stale.exists()
    named = dict(pipe.transformer.named_parameters())
    ema = {n: torch.full_like(p, 0.25) for n, p in named.items()}
    loop._save_ema(ema, run / "ema.safetensors")
    loop._save_state(run, {"config": {"max_sequence_length": 32}})
    loop.export(run, tmp_path / "shipped")
    loaded, defaults = load_toy_pipeline(path=tmp_path / "shipped")
    assert defaults["max_sequence_length"] == 32
    assert all(torch.all(p == 0.25) for p in loaded.transformer.parameters())
    loop.export(run, tmp_path / "raw", use_ema=False)
    raw, _ = load_toy_pipeline(path=tmp_path / "raw")
    first = next(iter(named))
    assert torch.equal(dict(raw.transformer.named_parameters())[first], named[first].detach().half().float())
    assert loop._load_ema(named, run / "ema.safetensors")[first].eq(0.25).all()


def test_ema_decay_warms_up():
    assert loop.ema_decay(0, 0.999) == pytest.approx(0.1)
    assert loop.ema_decay(10**6, 0.999) == 0.999


def test_identities_are_drawn_several_times_and_shards_make_the_same_data_set():
    whole, prompts = data.render_dataset(16, seed=3, chunk=4, workers=1, per_identity=4)
    kinds = [next(k for k in world.KINDS if k in p.split()) for p in prompts]
    for k in range(0, 16, 4):                   # one kind per identity (its four draws)
        assert len(set(kinds[k:k + 4])) == 1, prompts[k:k + 4]
    assert len(set(kinds)) > 1
    from characonsist.toy import readout

    reads = readout.read_batch(list(whole))       # the renders read back exactly: same identity within a group
    for k in range(0, 16, 4):
        assert len({tuple(r[a] for a in world.ATTRIBUTES) for r in reads[k:k + 4]}) == 1
    a, pa = data.render_dataset(16, seed=3, chunk=4, workers=1, per_identity=4, shard=(0, 2))
    b, pb = data.render_dataset(16, seed=3, chunk=4, workers=1, per_identity=4, shard=(1, 2))
    # chunks 0, 2 go to process 0 and chunks 1, 3 to process 1
    assert np.array_equal(np.concatenate([a[:4], b[:4], a[4:], b[4:]]), whole)
    assert pa + pb != prompts and sorted(pa + pb) == sorted(prompts)
    with pytest.raises(ValueError, match="multiple of per_identity"):
        data.render_dataset(8, seed=0, chunk=6, per_identity=4)
    with pytest.raises(ValueError, match="leave nothing for process 1"):
        data.render_dataset(4, seed=0, chunk=4, per_identity=4, shard=(1, 2))


def test_two_panel_batch_puts_two_draws_of_one_identity_side_by_side():
    lat = torch.arange(12, dtype=torch.float32).view(12, 1, 1, 1).expand(12, 2, 4, 4).contiguous()
    gen = torch.Generator().manual_seed(0)
    x, a, b = data.two_panel_batch(lat, per_identity=3, n=50, generator=gen)
    assert x.shape == (50, 2, 4, 8)
    assert torch.equal(a // 3, b // 3) and bool((a != b).all())
    assert torch.equal(x[:, 0, 0, 0], a.float()) and torch.equal(x[:, 0, 0, -1], b.float())
    y, a2, b2 = data.two_panel_batch(lat, per_identity=3, n=5, generator=gen, vertical=True)
    assert y.shape == (5, 2, 8, 4) and torch.equal(y[:, 0, -1, 0], b2.float())
    assert data.two_panel_prompt("a b", "c d") == "a b c d"


def test_schedule_is_flux_dev_at_1024_and_two_panels_get_their_own_shift():
    from characonsist.toy import checks

    toy = checks.sigmas_of(networks.SCHEDULER_CONFIG, 20, 256)
    flux = checks.sigmas_of(networks.FLUX_DEV_SCHEDULER_CONFIG, 50, 4096)
    assert np.abs(toy[:-1] - np.interp(np.arange(20) * 2.5, np.arange(51), flux)).max() < 1e-3
    assert losses.pipeline_mu(256) == pytest.approx(1.15) and losses.pipeline_mu(64) == pytest.approx(0.5)
    assert losses.pipeline_mu(512) > losses.pipeline_mu(256)


def test_step_kind_mixes_two_character_steps_only_when_asked():
    kinds = lambda **kw: [data.step_kind(s, config.TrainConfig(**kw)) for s in range(8)]   # noqa: E731
    assert kinds() == ["single", "pair"] * 4                                   # the shipped recipe
    assert kinds(two_character_every=2) == ["single", "pair", "two", "pair"] * 2
    assert kinds(two_character_every=3) == ["single", "pair", "single", "pair", "two", "pair", "single", "pair"]
    assert kinds(two_panel_every=0, two_character_every=4) == ["single"] * 3 + ["two"] + ["single"] * 3 + ["two"]
    assert kinds(two_panel_every=0) == ["single"] * 8


def test_two_character_data_set_renders_wide_images_with_their_prompts():
    images, prompts = data.render_dataset(4, seed=1, chunk=2, workers=1, two_characters=True)
    assert images.shape == (4, 128, 256, 3) and len(prompts) == 4
    for p in prompts:     # the story line's prompt: every word in the toy vocabulary or "and"
        assert set(p.split()) <= set(world.VOCAB_WORDS) | {"and"} and p.split().count("and") == 2
    a, pa = data.render_dataset(4, seed=1, chunk=2, workers=1, two_characters=True, shard=(0, 2))
    b, pb = data.render_dataset(4, seed=1, chunk=2, workers=1, two_characters=True, shard=(1, 2))
    assert np.array_equal(np.concatenate([a, b]), images) and pa + pb == prompts    # one chunk each
    tok = networks.build_pipeline(0).tokenizer_2
    assert max(len(tok(p).input_ids) for p in prompts) <= config.TrainConfig.max_sequence_length


def test_training_mixes_in_two_character_images_on_cpu(tmp_path, monkeypatch):
    import time

    pipe = _tiny_pipe()
    pipe.vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)   # what the VAE stage measures and sets
    run = tmp_path / "run"
    run.mkdir()
    networks.save_run_pipeline(pipe, run)
    cfg = config.TrainConfig(steps=4, batch=2, warmup=1, per_identity=2, two_character_every=2)
    images, prompts = data.render_dataset(4, seed=0, chunk=4, workers=1, per_identity=2)
    two_images, two_prompts = data.render_dataset(2, seed=0, chunk=2, workers=1, two_characters=True)
    calls = []
    batch = data.two_character_batch
    monkeypatch.setattr(loop, "two_character_batch", lambda *a, **k: calls.append(a[1]) or batch(*a, **k))
    with pytest.raises(ValueError, match="no two-character data set"):
        loop.train_transformer(run, cfg, images, prompts, torch.device("cpu"), time.time() + 600, "fp32")
    loop.train_transformer(run, cfg, images, prompts, torch.device("cpu"), time.time() + 600, "fp32",
                            two_images=two_images, two_prompts=two_prompts)
    assert calls == [1]                                  # step 2 of 4 (single, pair, two, pair), batch // 2 images
    state = loop._state(run)
    assert state["transformer_step"] == 4 and state["config"]["two_character_every"] == 2
    assert (run / "ema.safetensors").exists()


def test_reference_noise_makes_one_panel_a_cleaner_reference_left_out_of_the_loss():
    gen = torch.Generator().manual_seed(0)
    sig = torch.tensor([0.9, 0.5, 0.7, 0.3])
    for vertical, shape in ((False, (4, 16, 8, 16)), (True, (4, 16, 16, 8))):
        levels, weights = data.reference_noise(sig, shape, vertical, 1.0, gen)
        assert levels.shape == weights.shape == (4, 1, *shape[2:])
        halves = (levels.chunk(2, dim=2 if vertical else 3), weights.chunk(2, dim=2 if vertical else 3))
        for i in range(4):
            (la, lb), (wa, wb) = [(a[i], b[i]) for a, b in halves]
            # each half is uniform; exactly one of them is the reference: weight 0, noise at most the image's
            assert all(len(t.unique()) == 1 for t in (la, lb, wa, wb))
            assert sorted([wa.max().item(), wb.max().item()]) == [0.0, 1.0]
            ref, target = (la, lb) if wa.max() == 0 else (lb, la)
            assert target.max().item() == pytest.approx(sig[i].item()) and ref.max().item() <= sig[i].item()
    levels, weights = data.reference_noise(sig, (4, 16, 8, 16), False, 0.0, gen)
    assert (weights == 1).all() and torch.equal(levels, sig.view(4, 1, 1, 1).expand(4, 1, 8, 16))


def test_flow_loss_with_levels_and_weights():
    pipe = _tiny_pipe()
    gen = torch.Generator().manual_seed(0)
    lat, noise = torch.randn(2, 16, 8, 16, generator=gen), torch.randn(2, 16, 8, 16, generator=gen)
    sig = torch.tensor([0.8, 0.4])
    embeds, pooled = torch.randn(2, 32, 64, generator=gen), torch.zeros(2, 64)
    with torch.no_grad():
        plain = losses.flow_loss(pipe.transformer, lat, noise, sig, embeds, pooled)
        ones = losses.flow_loss(pipe.transformer, lat, noise, sig, embeds, pooled,
                               sig.view(2, 1, 1, 1).expand(2, 1, 8, 16), torch.ones(2, 1, 8, 16))
        levels, weights = data.reference_noise(sig, (2, 16, 8, 16), False, 1.0, gen)
        ref = losses.flow_loss(pipe.transformer, lat, noise, sig, embeds, pooled, levels, weights)
        # the reference panel's content does not enter the loss through its own error, only as context
        lat2 = lat.clone()
        lat2[weights.expand_as(lat2) == 0] += 5.0                  # every reference panel, wherever it is
        moved = losses.flow_loss(pipe.transformer, lat2, noise, sig, embeds, pooled, levels, weights)
    assert ones.item() == pytest.approx(plain.item(), rel=1e-5)
    assert torch.isfinite(ref) and ref.item() != pytest.approx(plain.item(), rel=1e-3)
    assert moved.item() != pytest.approx(ref.item(), rel=1e-6)      # context changes the target panel's prediction


def test_training_with_reference_panels_and_counting_on_from_carried_weights(tmp_path):
    import time

    pipe = _tiny_pipe()
    pipe.vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    src = tmp_path / "src"
    pipe.vae.save_pretrained(src / "vae")
    pipe.transformer.save_pretrained(src / "transformer")
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="at_step needs"):
        loop.init_from_vae(run, config.TrainConfig(), src / "vae", None, at_step=5)
    cfg = config.TrainConfig(steps=8, batch=2, warmup=1, per_identity=2, reference_frac=1.0)
    loop.init_from_vae(run, cfg, src / "vae", src / "transformer", at_step=6)
    state = loop._state(run)
    assert state["transformer_step"] == 6 and state["ema_updates"] == 6
    images, prompts = data.render_dataset(4, seed=0, chunk=4, workers=1, per_identity=2)
    loop.train_transformer(run, cfg, images, prompts, torch.device("cpu"), time.time() + 600, "fp32", rewarm=1)
    state = loop._state(run)
    assert state["transformer_step"] == 8 and state["config"]["reference_frac"] == 1.0
