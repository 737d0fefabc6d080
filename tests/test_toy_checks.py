"""The toy model's checks (characonsist.toy.checks): known answers on constructed inputs, and every check run end to
end on a tiny random pipeline (its figures are noise; the code paths are the real ones)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from characonsist.toy import checks, world
from characonsist.toy.training import config, networks


@pytest.fixture(scope="module")
def tiny():
    tr = dict(networks.TRANSFORMER_CONFIG, num_layers=1, num_single_layers=2, num_attention_heads=2)
    vae = dict(networks.VAE_CONFIG, block_out_channels=(8, 8, 16), norm_num_groups=4)
    pipe = networks.build_pipeline(0, transformer_config=tr, vae_config=vae)
    pipe.vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)   # what the VAE stage measures and sets
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(config.DEFAULTS, num_inference_steps=2)


def test_token_parts_take_the_majority_part_of_character_tokens():
    parts = np.zeros((16, 16), np.uint8)
    parts[:8, :8] = 1                       # token (0, 0): all head
    parts[:8, 8:] = 2                       # token (0, 1): 36 body, 28 head
    parts[:4, 8:15] = 1
    parts[8:, :8][:3] = 3                   # token (1, 0): 24 of 64 legs, under half: scene
    out = checks.token_parts(parts)
    assert out.tolist() == [1, 2, 0, 0]


def test_pair_scores_known_answers():
    parts = np.array([0, 1, 1, 2, 5, 0])
    exact = checks._pair_scores(torch.eye(6), parts, parts, threshold=0.5)
    assert exact["tokens"] == 4 and exact["right_part"] == 4 and exact["to_scene"] == 0
    assert exact["per_part"] == {"head": [2, 2], "body": [1, 1], "legs": [0, 0], "tail": [0, 0], "accessory": [1, 1]}
    assert exact["above_threshold"] == 4
    assert exact["chance_all"] == pytest.approx(2 / 6 + 2 / 6 + 1 / 6 + 1 / 6)
    assert exact["chance_character"] == pytest.approx(2 / 4 + 2 / 4 + 1 / 4 + 1 / 4)
    to_scene = torch.zeros(6, 6)
    to_scene[:, 0] = 0.4                    # every token's best match is the scene token 0, under the threshold
    s = checks._pair_scores(to_scene, parts, parts, threshold=0.5)
    assert s["right_part"] == 0 and s["to_scene"] == 4 and s["above_threshold"] == 0


def test_chance_agreement_and_verdicts():
    reads = [dict(color=c, pattern="plain", accessory="hat", accessory_color="white") for c in ("red", "teal")]
    assert checks.chance_agreement(reads) == pytest.approx(0.5)
    ok = {"adherence": {"all_named_correct": 1.0}, "schedule": {"max_abs_diff": 0.001},
          "in_context": {"agree_all_four": 0.95, "two_seeds_agree": 0.0, "chance": 0.01},
          "correspondence": {"other_scene": {"right_part": 0.79}}}
    assert checks.verdicts(ok) == {"adherence": True, "schedule": True, "correspondence": False, "in_context": True}


def test_read_panels_splits_along_the_long_side():
    ch = world.Character("cat", "teal", "dots", "hat", "pink")
    other = world.Character("cat", "red", "plain", "bow", "white")
    a, b = world.render("beach", ch, "big-left"), world.render("city", other, "small-right")
    for image in (np.concatenate([a, b], 1), np.concatenate([a, b], 0)):
        ra, rb = checks.read_panels(image)
        assert (ra["color"], ra["scene"], rb["color"], rb["scene"]) == ("teal", "beach", "red", "city")


def test_every_check_runs_on_a_tiny_pipeline(tiny):
    pipe, defaults = tiny
    sched = checks.schedule(pipe, defaults)
    assert len(sched["rows"]) == 2 and sched["official"]["mask_step"]["toy_step"] == 0
    corr = checks.correspondence(pipe, defaults, pairs=4, batch=2)
    assert corr["step"] == 0 and len(corr["rows"]) == 4
    assert sum(r["same_scene"] for r in corr["rows"]) == 1
    for part in ("right_part", "to_scene", "above_threshold", "chance_all", "chance_character"):
        assert 0.0 <= corr["other_scene"][part] <= 1.0
    by_part = corr["other_scene"]["by_part"]
    assert set(by_part) == set(world.PARTS[1:]) and by_part["body"] is not None
    ic = checks.in_context(pipe, defaults, n=2, batch=2)
    assert [r["vertical"] for r in ic["rows"]] == [False, True] and 0 <= ic["agree_all_four"] <= 1
    ct = checks.commit_times(pipe, defaults, n=2, batch=2)
    assert all(len(v) == 2 and v[-1] == 1.0 for v in ct["committed_by_step"].values())
    text = checks.format_report({"schedule": sched, "correspondence": corr, "in_context": ic, "commit_times": ct})
    assert "verdict: schedule" in text and "correspondence" in text


def test_similarity_of_an_image_with_itself_is_one(tiny):
    pipe, defaults = tiny
    img = world.render("night", world.Character("robot", "purple", "checks", "scarf", "blue"), "big-centre")
    prompt = "a starry night a robot big in the middle"
    (sim,) = checks.single_block_similarity(pipe, defaults, [img, img], [prompt, prompt], 0.9, seed=0)
    assert sim.shape == (256, 256)
    assert torch.allclose(sim.diagonal(), torch.ones(256), atol=1e-4)


def test_two_character_scores_known_answers():
    rng = np.random.default_rng(8)
    truths = [world.sample_two_fields(rng) for _ in range(6)]
    chars = [tuple(world.sample_character(rng, k) for k in kinds) for _, kinds, _ in truths]
    images = [world.render_two(s, ch, a, rng=rng) for (s, _, a), ch in zip(truths, chars, strict=True)]
    right = checks.score_two_characters(truths, images)        # the renderer as the model: everything reads back
    assert right["n"] == 6 and all(v == 1.0 for v in right["adherence"].values()), right["adherence"]
    assert right["rows"][0]["caption"] == world.two_caption(*truths[0])
    expect = np.mean([all(getattr(a, x) == getattr(b, x) for x in checks.ATTRS) for a, b in chars])
    assert right["same_all_four"] == expect and 0 < right["chance_all_four"] < 1
    swapped = [np.concatenate([im[:, 128:], im[:, :128]], 1) for im in images]   # each kind in the other half
    s = checks.score_two_characters(truths, swapped)["adherence"]
    assert s["kinds"] == 1.0 and s["kinds_in_order"] == 0.0 and s["scene"] == 1.0
    copied = [world.render_two(s, (ch[0], world.Character(ch[1].kind, **ch[0].attributes())), a, rng=rng)
              for (s, _, a), ch in zip(truths, chars, strict=True)]                      # one identity on both: a full leak
    leak = checks.score_two_characters(truths, copied)
    assert leak["same_all_four"] == 1.0 and all(v == 1.0 for v in leak["same_attribute"].values())


def test_two_character_measure_runs_end_to_end(tiny, tmp_path):
    pipe, defaults = tiny
    res = checks.two_characters(pipe, defaults, n=2, batch=2)
    assert (res["n"], res["width"], res["height"]) == (2, 256, 128) and len(res["rows"]) == 2
    assert set(res["adherence"]) == {"all_named", "scene", "kinds", "kinds_in_order", "actions", "bound"}
    assert all(0 <= v <= 1 for v in [*res["adherence"].values(), *res["same_attribute"].values(), res["unsure"]])
    assert all(len(r["reads"]) == 2 and world.parse_two_caption(r["caption"]) for r in res["rows"])
    assert "two characters (2 images of 256x128" in checks.format_report({"two_characters": res})
    # the command line, on the tiny pipeline saved as a model folder
    import json

    pipe.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "characonsist_defaults.json").write_text(json.dumps(defaults))
    assert checks.main(["--model-dir", str(tmp_path / "model"), "--only", "schedule", "--two-characters", "2",
                        "--batch", "2", "--json", str(tmp_path / "out.json")]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["two_characters"]["n"] == 2 and out["verdicts"] == {"schedule": out["verdicts"]["schedule"]}


def test_copy_and_panel_attention_run_on_a_tiny_pipeline(tiny):
    pipe, defaults = tiny
    cp = checks.copy_given(pipe, defaults, n=2, batch=2)
    assert cp["n"] == 2 and len(cp["rows"]) == 2 and 0 <= cp["all_four"] <= 1
    assert set(cp["per_attribute"]) == set(checks.ATTRS)
    pa = checks.panel_attention(pipe, defaults, n=2, sigmas=(0.9,))
    r = pa["by_sigma"]["0.900"]
    blocks, heads = len(pipe.transformer.single_transformer_blocks), pipe.transformer.config.num_attention_heads
    assert np.array(r["to_other_char"]).shape == (blocks, heads) == np.array(r["right_part"]).shape
    assert 0 < r["uniform"] < 1 and all(0 <= x <= 1 for row in r["to_other_char"] for x in row)
    text = checks.format_report({"copy": cp, "panel_attention": pa})
    assert "copy (no bar)" in text and "panel attention" in text


def test_copy_holds_the_reference_on_its_trajectory(tiny):
    pipe, defaults = tiny
    ref = torch.randn(2, 16, 32, 32)
    noise = torch.randn(2, 16, 32, 32)
    hold = checks._ReferenceHold(pipe, ref, noise, 128, 128)
    packed = pipe._pack_latents(torch.randn(2, 16, 32, 64), 2, 16, 32, 64)
    out = pipe._unpack_latents(hold(packed, 0.25), 128, 256, pipe.vae_scale_factor)
    assert torch.allclose(out[..., :32], 0.75 * ref + 0.25 * noise)
    assert torch.equal(out[..., 32:], pipe._unpack_latents(packed, 128, 256, pipe.vae_scale_factor)[..., 32:])
