"""The toy model's checks (characonsist.toy.checks): known answers on constructed inputs, and every check run end to
end on a tiny random pipeline (its figures are noise; the code paths are the real ones)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from characonsist.toy import checks, train, world


@pytest.fixture(scope="module")
def tiny():
    tr = dict(train.TRANSFORMER_CONFIG, num_layers=1, num_single_layers=2, num_attention_heads=2)
    vae = dict(train.VAE_CONFIG, block_out_channels=(8, 8, 16), norm_num_groups=4)
    pipe = train.build_pipeline(0, transformer_config=tr, vae_config=vae)
    pipe.vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)   # what the VAE stage measures and sets
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(train.DEFAULTS, num_inference_steps=2)


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
