import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from characonsist.methods import METHODS
from characonsist.toy import bench, runner, scoring, suite, world
from characonsist.toy.runner import parse_method
from characonsist.toy.scoring import aggregate, background_agreement, background_mask, score_story


def test_method_specs_and_ablations():
    assert parse_method("vanilla") == ("vanilla", {})
    assert parse_method("characonsist-no-tracking") == ("characonsist", {"point_tracking": False})
    assert parse_method("characonsist-no-merge") == ("characonsist", {"use_token_merge": False})
    assert parse_method("characonsist-no-mask") == ("characonsist", {"use_mask": False})
    assert parse_method("characonsist+share_bg=false+sim_thr=0.4+merge_end=31") == (
        "characonsist", {"share_bg": False, "sim_thr": 0.4, "merge_end": 31})
    with pytest.raises(ValueError, match="key=value"):
        parse_method("characonsist+share_bg")


def test_method_spec_values_read_as_the_option_flag_reads_them():
    """``name+opt=value`` takes what ``--option opt=value`` takes (``methods.base.parse_option``)."""
    assert parse_method("characonsist+point_tracking=off+use_mask=yes+share_bg=0") == (
        "characonsist", {"point_tracking": False, "use_mask": True, "share_bg": False})
    assert parse_method("characonsist+seeding=per_image+inversion=euler:follow=start") == (
        "characonsist", {"seeding": "per_image", "inversion": "euler:follow=start"})   # the bench's own: text
    assert parse_method("characonsist+sim_thr=high") == ("characonsist", {"sim_thr": "high"})  # its Config says why


def test_bench_toy_help_shows_the_defaults(capsys):
    from characonsist import cli

    with pytest.raises(SystemExit):
        cli.main(["bench", "toy", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("vanilla,characonsist", "toy", "cpu", "float32", "2025", "official"):
        assert f"(default: {default})" in text


def _read(scene="beach", kind="cat", action="small-left", **attrs):
    base = {"color": "red", "pattern": "plain", "accessory": "hat", "accessory_color": "white"}
    size, pos = action.split("-")
    return {"scene": scene, "kind": kind, "action": action, "position": pos, "size": size, **base, **attrs}


def test_score_story_arithmetic():
    truth = [("beach", "cat", "small-left"), ("beach", "cat", "big-right"), ("beach", "cat", "big-right"),
             ("beach", "cat", "small-centre")]
    reads = [_read(), _read(action="big-right", color="teal"),          # one attribute off
             _read(action="big-right"),                                  # consistent
             _read(scene="city", kind="bird", action="small-left", pattern="dots", accessory="bow")]  # 2 off
    s = score_story(truth, reads)
    assert s["frames"] == 3 and s["identity_hits"] == 1
    assert s["attribute_hits"] == {"color": 2, "pattern": 2, "accessory": 2, "accessory_color": 3}
    # last frame: scene, kind and position wrong (size right); everything else right
    assert s["adherence_hits"] == {"scene": 3, "kind": 3, "position": 3, "size": 4}
    # read actions of frames: big-right, big-right, small-left -> 2 of 3 pairs differ; prompted: 2 of 3
    assert (s["pairs"], s["diverse_pairs"], s["prompted_diverse_pairs"]) == (3, 2, 2)
    assert s["bg_scene_hits"] == 2                                      # fixed story (all truth scenes equal)
    m = aggregate([{**s, "mode": "fixed", "seconds": 2.0},
                   {**score_story(truth[:2], reads[:2]), "mode": "fixed", "seconds": 4.0},
                   {"name": "x", "mode": "mixed", "error": "boom"}])
    assert m["identity_consistency"] == pytest.approx(1 / 4)
    assert m["attribute_agreement"]["color"] == pytest.approx(2 / 4)
    assert m["prompt_adherence"] == pytest.approx((13 + 8) / (6 * 4))
    assert m["seconds_per_story"] == 3.0 and m["failed"] == 1 and m["stories"] == 3
    assert m["identity_by_mode"]["fixed"] == pytest.approx(1 / 4) and np.isnan(m["identity_by_mode"]["changing"])


def test_background_agreement_sees_layout_changes_but_not_characters():
    a_ch = world.Character("cat", "red", "plain", "hat", "white")
    b_ch = world.Character("cat", "teal", "checks", "bow", "pink")
    a = world.render("forest", a_ch, "big-left", rng=np.random.default_rng(1))
    same = world.render("forest", b_ch, "big-left", rng=np.random.default_rng(1))
    moved = world.render("forest", a_ch, "big-left", rng=np.random.default_rng(2))
    mask = background_mask(["big-left"])
    assert 0.5 < mask.mean() < 0.85
    assert background_agreement(a, same, mask) == 1.0      # only the character differs, and it is masked out
    assert background_agreement(a, moved, mask) < 0.9       # trees moved
    assert background_agreement(a, 255 - a, mask) == 0.0


def test_suite_composition():
    stories = suite.make_suite()
    assert len(stories) == 60 and suite.make_suite() == stories
    assert len({s.name for s in stories}) == 60
    for mode in suite.MODES:
        these = [s for s in stories if s.mode == mode]
        assert len(these) == 20 and {t[1] for s in these for t in s.truth[:1]} == set(world.KINDS)
    for s in stories:
        truth = s.truth
        assert len(truth) == 5 and len({t[1] for t in truth}) == 1
        home, scenes = truth[0][0], [t[0] for t in truth[1:]]
        assert suite.story_mode(truth) == s.mode
        assert len({t[2] for t in truth[1:]}) == 4                     # the frames' actions vary
        if s.mode == "changing":
            assert all(a != b for a, b in zip(scenes, scenes[1:], strict=False))   # consecutive pairs
        if s.mode == "mixed":
            away = [x for x in scenes if x != home]
            assert len(away) > len(set(away))                           # a switched scene comes back
    red = suite.reduced_suite()
    assert len(red) == 9 and red == stories[:9] and suite.reduced_suite() == red
    # balanced: every mode with every kind exactly once; the stories keep their names and seeds from the full suite
    assert sorted((s.mode, s.truth[0][1]) for s in red) == sorted(
        (m, k) for m in suite.MODES for k in world.KINDS)
    assert [s.seed for s in red] == list(range(9))


def test_story_file_round_trip_and_errors(tmp_path):
    from characonsist.storyfile import StoryError

    path = tmp_path / "s.txt"
    suite.write_stories(suite.make_suite()[:3], path)
    loaded = suite.load_stories(path)
    assert [s.truth for s in loaded] == [s.truth for s in suite.make_suite()[:3]]
    assert [s.mode for s in loaded] == ["fixed", "changing", "mixed"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a sunny beach#a cat#small on the left\na moon base#a cat#big on the left\n\n"
                   "a grey city#a robot#big on the left\na grey city#a bird#big on the right\n\n"
                   "a grey city#a robot#big on the left\n")
    with pytest.raises(StoryError) as err:
        suite.load_stories(bad)
    msg = str(err.value)
    assert "bad.txt:2" in msg and "a starry night" in msg            # unknown scene, valid ones listed
    assert "bad.txt:4" in msg and "kind" in msg                       # kind changes inside a story
    assert "bad.txt:7" in msg and "at least one frame" in msg


def test_oracle_run_and_cli_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main(["--methods", "oracle", "--limit", "3", "--quiet", "--json", str(out),
                       "--images", str(tmp_path / "img")]) == 0
    strip = np.asarray(Image.open(tmp_path / "img" / "oracle" / "fixed-00.png"))
    assert strip.shape == (128, 5 * 128, 3)
    printed = capsys.readouterr().out
    assert "oracle" in printed and "identity" in printed and "mask IoU" in printed and "total" in printed
    res = json.loads(out.read_text())
    m = res["methods"]["oracle"]["metrics"]
    assert m["identity_consistency"] == 1.0 and m["prompt_adherence"] == 1.0
    assert m["background_consistency"] == 1.0 and m["stories"] == 3
    # the oracle's masks are the truth pooled to tokens: all inside the boxes, a small share of the image, and the
    # IoU is the token grid's ceiling (well under 1, well over what an all-foreground mask gets)
    assert m["mask_in_box"] == 1.0 and 0.03 < m["mask_fg"] < 0.25 and 0.6 < m["mask_iou"] < 0.95
    assert m["masked_images"] == 15 and m["wall_seconds"] > 0
    rec = res["methods"]["oracle"]["stories"][0]
    assert len(rec["masks"]) == 5 and len(rec["masks"][0]) == 16 and set("".join(rec["masks"][0])) <= {"0", "1"}
    st = res["settings"]
    assert st["device"] == "cpu" and "torch threads" in st["device_name"] and st["torch_threads"] >= 1
    assert st["total_seconds"] >= st["run_seconds"] > 0
    assert bench.main(["--methods", "oracle+x", "--quiet"]) == 2


def test_methods_all_and_device_checks(tmp_path, capsys, monkeypatch):
    assert runner.expand_methods("all") == list(runner.ALL_METHODS)
    assert runner.ALL_METHODS == ("vanilla", "characonsist", "characonsist-no-tracking", "characonsist-no-merge",
                                 "characonsist-no-mask", "consistory", "storysync", "storydiffusion")
    assert runner.expand_methods("oracle, all,vanilla,") == ["oracle", *runner.ALL_METHODS]
    assert all(parse_method(spec)[0] in METHODS for spec in runner.ALL_METHODS)
    assert bench.check_device("cpu") is None
    assert "use cpu" in bench.check_device("xla")
    assert bench.main(["--methods", "oracle", "--device", "nonsense", "--quiet"]) == 2
    assert bench.main(["--methods", "oracle", "--threads", "0", "--quiet"]) == 2
    before, out = torch.get_num_threads(), tmp_path / "t.json"
    assert bench.main(["--methods", "oracle", "--limit", "1", "--threads", "1", "--quiet", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["torch_threads"] == 1
    assert torch.get_num_threads() == before                       # the caller's setting is restored
    for omp, want in (("1", 1), ("", None), ("zero", None)):           # OMP_NUM_THREADS caps it when --threads is not given
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
        assert bench.main(["--methods", "oracle", "--limit", "1", "--quiet", "--json", str(out)]) == 0
        assert json.loads(out.read_text())["settings"]["torch_threads"] == (want or bench.cpu_cores())
    if not torch.cuda.is_available():
        assert "CUDA is not available" in bench.check_device("cuda")
        assert bench.main(["--methods", "oracle", "--device", "cuda", "--quiet"]) == 2
        assert "CUDA" in capsys.readouterr().err


def test_device_readout_wrapper_reads_like_the_plain_readout():
    from characonsist.toy.readout import load_readout, read_batch

    rng = np.random.default_rng(4)
    images = [world.sample_example(rng)[0] for _ in range(3)]
    net = load_readout()
    wrapped = runner.device_readout(net, "cpu")
    assert wrapped.net is not net and next(net.parameters()).device.type == "cpu"
    assert read_batch(images, wrapped) == read_batch(images, net)
    assert runner.readout_on("cpu") is None


def test_character_pixels_follow_the_true_mask():
    from PIL import ImageFilter

    rng = np.random.default_rng(21)
    clean, blurred = [], []
    for _ in range(16):
        scene, ch, action = str(rng.choice(list(world.SCENES))), world.sample_character(rng), str(
            rng.choice(list(world.ACTIONS)))
        img, truth = world.render(scene, ch, action, rng=rng, return_mask=True)
        region = scoring.character_region([action])
        assert not (truth & ~region).any()                          # the boxes hold the whole character
        soft = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(1)))
        for out, im in ((clean, img), (blurred, soft)):
            seg = scoring.character_pixels(im, [scene], region)
            out.append((seg & truth).sum() / (seg | truth).sum())
    assert np.mean(clean) > 0.93 and min(clean) > 0.8
    assert np.mean(blurred) > 0.8
    # nothing outside the region, and an image of the bare scene has (almost) no character pixels in it
    assert not scoring.character_pixels(img, [scene], np.zeros_like(region)).any()


def test_mask_scores_tell_all_foreground_from_a_good_mask():
    ch = world.Character("robot", "orange", "stripes", "scarf", "blue")
    img, truth = world.render("city", ch, "big-centre", rng=np.random.default_rng(2), return_mask=True)
    region = scoring.character_region(["big-centre"])
    chars = scoring.character_pixels(img, ["city"], region)
    good = scoring.mask_scores(scoring.pool_mask(truth), chars, region)
    everything = scoring.mask_scores(np.ones((16, 16), bool), chars, region)
    nothing = scoring.mask_scores(np.zeros((16, 16), bool), chars, region)
    assert good["in_box"] == 1.0 and good["iou"] > 0.7 and good["covered"] > 0.8 and good["fg"] < 0.3
    assert everything["fg"] == 1.0 and everything["covered"] == 1.0
    assert everything["in_box"] == pytest.approx(region.mean()) and everything["iou"] < 0.3
    assert everything["iou"] == pytest.approx(good["iou_all_fg"]) and good["in_box_all_fg"] == pytest.approx(
        everything["in_box"])                                         # the all-foreground reference
    assert nothing["fg"] == 0.0 and np.isnan(nothing["in_box"]) and nothing["iou"] == 0.0
    # a token grid of another size is upsampled to the image
    assert scoring.upsample_mask(np.eye(2, dtype=bool), 4, 6).tolist() == [[1, 1, 1, 0, 0, 0]] * 2 + [[0, 0, 0, 1, 1, 1]] * 2
    # in a story: images without a mask are skipped, methods without masks get no mask metrics ("-" in the table)
    truth3 = [("city", "robot", "big-centre")] * 3
    reads = [{**dict(zip(("scene", "kind", "action"), t, strict=True)), "position": "centre", "size": "big",
              **ch.attributes()} for t in truth3]
    s = score_story(truth3, reads, [img] * 3, "fixed", [np.ones((16, 16), bool), None, scoring.pool_mask(truth)])
    assert s["mask_scores"][1] is None
    m = aggregate([{**s, "mode": "fixed", "seconds": 1.0}])
    assert m["masked_images"] == 2 and m["mask_fg"] == pytest.approx((1 + good["fg"]) / 2)
    plain = aggregate([{**score_story(truth3, reads, [img] * 3, "fixed"), "mode": "fixed", "seconds": 1.0}])
    assert plain["masked_images"] == 0 and np.isnan(plain["mask_iou"])
    table = scoring.format_tables({"methods": {"a": {"metrics": {**m, "wall_seconds": 2.0}},
                                             "b": {"metrics": {**plain, "wall_seconds": 1.0}}}})
    row_a, row_b = (line.split() for line in table.splitlines()[2:4])
    assert row_a[7:11] == [f"{100 * m[k]:.1f}" for k in ("mask_fg", "mask_in_box", "mask_iou", "mask_iou_all_fg")]
    assert row_b[7:11] == ["-", "-", "-", "-"]


def test_engine_plumbing_with_tiny_pipeline():
    from characonsist import CharaConsistPipeline
    from characonsist.testing import tiny_flux_pipeline

    pipe = CharaConsistPipeline.from_pipe(tiny_flux_pipeline())
    pipe.set_progress_bar_config(disable=True)
    story = suite.make_suite()[:1]
    with pytest.raises(ValueError, match="max_sequence_length"):
        runner.run_bench(pipe, story, ["vanilla"], max_sequence_length=8)
    res = runner.run_bench(pipe, story, ["vanilla", "characonsist"], height=32, width=32, num_inference_steps=1,
                          max_sequence_length=64)
    for spec in ("vanilla", "characonsist"):
        rec = res["methods"][spec]["stories"][0]
        assert "error" not in rec, rec
        assert len(rec["reads"]) == 5 and rec["seconds"] > 0
        assert res["methods"][spec]["metrics"]["stories"] == 1
        assert res["methods"][spec]["metrics"]["wall_seconds"] >= rec["seconds"]
    # CharaConsist returns a token mask per image (a 2x2 grid at 32 px on the tiny model), vanilla none
    assert "mask_scores" not in res["methods"]["vanilla"]["stories"][0]
    rec = res["methods"]["characonsist"]["stories"][0]
    assert len(rec["mask_scores"]) == 5 and all(x is not None for x in rec["mask_scores"])
    assert res["methods"]["characonsist"]["metrics"]["masked_images"] == 5


def test_each_method_runs_with_its_official_seeding(story_pipe, tmp_path):
    """CharaConsist and vanilla: one noise for every image (official); the peers: one noise per image (ConsiStory
    ``same_latent=False``, StoryDiffusion's continued generator); the JSON records which was used."""
    story = suite.make_suite()[:1]
    kw = dict(height=32, width=32, num_inference_steps=1, max_sequence_length=64)
    res = runner.run_bench(story_pipe, story, ["vanilla", "storydiffusion"], **kw)
    assert res["settings"]["seeding"] == {"vanilla": "shared", "storydiffusion": "per_image"}
    s = 2025 + story[0].seed
    plain, peer = (res["methods"][m] for m in ("vanilla", "storydiffusion"))
    assert plain["seeding"] == "shared" and plain["stories"][0]["seeds"] == [s] * 5
    seeds = peer["stories"][0]["seeds"]
    assert peer["seeding"] == "per_image" and seeds[0] == s and len(set(seeds)) == 5 and "error" not in peer["stories"][0]
    forced = runner.run_bench(story_pipe, story, ["consistory", "vanilla+seeding=per_image"], seeding="shared", **kw)
    assert forced["methods"]["consistory"]["stories"][0]["seeds"] == [s] * 5
    own = forced["methods"]["vanilla+seeding=per_image"]                # a spec's own convention wins
    assert own["seeding"] == "per_image" and own["options"] == {} and len(set(own["stories"][0]["seeds"])) == 5
    assert [runner.method_seeding(m) for m in ("characonsist", "consistory", "storysync", "oracle")] == [
        "shared", "per_image", "per_image", None]
    with pytest.raises(ValueError, match="seeding"):
        runner.method_seeding("vanilla", "random")
    out = tmp_path / "o.json"
    assert bench.main(["--methods", "oracle", "--limit", "1", "--quiet", "--seeding", "per_image", "--json",
                       str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["seeding"] == {"oracle": None}


def test_heldout_suite_is_another_suite_of_the_same_form():
    from characonsist.toy.suite import heldout_suite, make_suite

    full, held = make_suite(), heldout_suite()
    assert len(held) == len(full) == 60
    assert [s.mode for s in held] == [s.mode for s in full]
    assert all(s.name.startswith("heldout-") for s in held)
    assert {s.seed for s in held}.isdisjoint({s.seed for s in full})
    assert [(s.identity, s.frames) for s in held] != [(s.identity, s.frames) for s in full]


def test_story_pictures_show_a_known_character():
    """The picture kinds: a render of a sampled character in the identity's scene and action; offgrid: that
    character 1.375x larger, off the trained positions; degraded: the readout's degradations. Deterministic."""
    from characonsist.toy import pictures
    from characonsist.toy.readout import read_batch

    images, chars = {}, {}
    for kind in pictures.PICTURE_KINDS:
        images[kind], chars[kind] = pictures.story_picture("city", "bird", "small-left", 77, kind)
        again, _ = pictures.story_picture("city", "bird", "small-left", 77, kind)
        assert images[kind].shape == (128, 128, 3) and np.array_equal(images[kind], again)
    assert len({c for c in chars.values()}) == 1 and chars["render"].kind == "bird"
    assert not np.array_equal(images["render"], images["degraded"])
    reads = read_batch([images["render"], images["degraded"]])
    assert all(r[a] == getattr(chars["render"], a) for r in reads for a in world.ATTRIBUTES)
    # offgrid: the character is bigger than any trained height and not centred at 0.25/0.5/0.75 of the width
    _, mask = world.render("city", chars["render"], "small-left", rng=np.random.default_rng(0), return_mask=True)
    region = scoring.character_region(["small-left"])
    big = scoring.character_pixels(images["offgrid"], ["city"], np.ones_like(region))
    assert big.sum() > 1.5 * mask.sum()
    cols = np.nonzero(big.any(0))[0]
    assert abs((cols.min() + cols.max()) / 2 / 128 - 0.25) > 0.03
    with pytest.raises(ValueError, match="valid: render"):
        pictures.story_picture("city", "bird", "small-left", 77, "sketch")


def test_picture_scores_and_table():
    from characonsist.toy.pictures import aggregate_pictures, format_picture_table, score_picture

    truth = {"color": "red", "pattern": "dots", "accessory": "hat", "accessory_color": "blue"}
    other = {**truth, "color": "teal"}
    s = score_picture(truth, [truth, truth, other, truth], 31.5)
    assert s["truth_hits"] == 2 and s["truth_attribute_hits"] == {**dict.fromkeys(truth, 3), "color": 2}
    assert all(s["reconstruction_truth"].values())
    s2 = score_picture(truth, [other, other, other], None)
    s.update(frames=3, frame_adherence_hits=4, frame_adherence_fields=4)
    s2.update(frames=2, frame_adherence_hits=4, frame_adherence_fields=4)
    m = aggregate_pictures([s, s2, {"error": "x"}])
    assert m["stories"] == 2 and m["truth_consistency"] == pytest.approx(2 / 5)
    assert m["reconstruction_truth"] == 0.5 and m["reconstruction_psnr"] == 31.5 and m["frame_adherence"] == 1.0
    text = format_picture_table({"settings": {"identity_picture": "render", "inversion": "renoise"},
                                 "methods": {"cc": {"metrics": {"picture": m}}, "x": {"metrics": {}}}})
    assert text.splitlines()[2].split()[:3] == ["cc", "40.0", "40.0"] and "render, inversion renoise" in text


def test_bench_with_an_identity_picture_on_the_tiny_pipeline(story_pipe, tmp_path):
    story = suite.make_suite()[:1]
    kw = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=64)
    res = runner.run_bench(story_pipe, story, ["oracle", "vanilla", "characonsist+inversion=euler"],
                          identity_picture="render", image_dir=tmp_path, **kw)
    assert res["settings"]["identity_picture"] == "render" and res["settings"]["inversion"] == "euler"
    oracle, vanilla, cc = (res["methods"][m] for m in ("oracle", "vanilla", "characonsist+inversion=euler"))
    assert oracle["metrics"]["picture"]["truth_consistency"] == 1.0                     # the picture's own character
    assert oracle["metrics"]["picture"]["reconstruction_truth"] == 1.0
    for run in (vanilla, cc):
        rec = run["stories"][0]
        assert "error" not in rec and rec["psnr"] is not None and set(rec["truth"]) == set(world.ATTRIBUTES)
        assert rec["frame_adherence_fields"] == 16
    assert cc["options"] == {"inversion": "euler"}
    with Image.open(tmp_path / "vanilla" / f"{story[0].name}.png") as strip:
        assert strip.size == (32 * 6, 32)                                      # the picture, then the 5 images
    with pytest.raises(ValueError, match="identity picture"):
        runner.run_bench(story_pipe, story, ["vanilla"], identity_picture="photo", **kw)
    from characonsist.inputs import InputError

    with pytest.raises(InputError, match="inversion"):
        runner.run_bench(story_pipe, story, ["vanilla+inversion=nope"], identity_picture="render", **kw)


def test_picture_comparison_script(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "toy_picture_compare.py"
    spec = importlib.util.spec_from_file_location("toy_picture_compare", path)
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)

    def story(name, hits, attr):
        return {"name": name, "frames": 4, "truth_hits": hits,
                "truth_attribute_hits": dict.fromkeys(("color", "pattern", "accessory", "accessory_color"), attr)}

    def spec_entry(stories):
        picture = {"stories": len(stories), "truth_consistency": 0.5, "truth_attribute_agreement":
                   dict.fromkeys(("color", "pattern", "accessory", "accessory_color"), 0.5), "frame_adherence": 1.0,
                   "reconstruction_psnr": 30.0, "reconstruction_truth": 1.0}
        return {"metrics": {"picture": picture, "seconds_per_story": 1.0, "background_consistency": None},
                "stories": stories}

    data = {"methods": {"a": spec_entry([story("s1", 1, 2), story("s2", 1, 2)]),
                        "b": spec_entry([story("s1", 3, 4), story("s2", 3, 4), story("s3", 0, 0)])}}
    (tmp_path / "r.json").write_text(json.dumps(data))
    runs = compare.load([str(tmp_path / "r.json")])
    assert list(runs) == ["a", "b"] and len(compare.table(runs)) == 3
    line = compare.paired(runs, "a")[0]
    assert line.startswith("b - a (2 stories): all 4 +50.0 [+50.0, +50.0], mean attribute +50.0")
    assert compare.main([str(tmp_path / "r.json"), "--reference", "zz"]) == 2


@pytest.mark.slow
def test_a_run_cut_short_keeps_the_methods_it_finished(tmp_path, monkeypatch):
    """--json holds each finished method before the next starts (a GPU call can be cut at its time limit)."""
    out = tmp_path / "r.json"
    calls = []
    real = runner._oracle_images

    def oracle_then_interrupt(*a, **k):
        calls.append(1)
        if len(calls) > 2:               # the second method's first story
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "_oracle_images", oracle_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--methods", "oracle,oracle+seeding=per_image", "--limit", "2", "--quiet", "--json", str(out)])
    res = json.loads(out.read_text())
    assert list(res["methods"]) == ["oracle"] and res["settings"]["partial"] == "1 of 2 methods"
    assert bench.is_report(out)
    monkeypatch.setattr(runner, "_oracle_images", real)
    assert bench.main(["--methods", "oracle,oracle+seeding=per_image", "--limit", "2", "--quiet", "--json",
                       str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["methods"]) == ["oracle", "oracle+seeding=per_image"] and "partial" not in res["settings"]
