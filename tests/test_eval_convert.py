"""``characonsist eval convert``: ConsiStory+-form story lists to this tool's story files, guesses reported."""

from __future__ import annotations

import pytest

from characonsist import cli
from characonsist.evaluate.convert import ConvertError, convert_sets, read_sets, split_setting, subset, write_story
from characonsist.storyfile import load_story

SOURCE = """\
animals:
- concept_token: dog
  settings:
  - chasing a frisbee
  - running on a beach
  - in a city alley
  - dressed in a raincoat
  style: A photo of
  subject: A dog
- concept_token: fox
  settings:
  - sleeping under a tree
  - jumping
  style: ''
  subject: a red fox
humans:
- settings:
  - reading a book in a library
  - cooking in the kitchen
  style: A watercolor illustration of
  subject: An old man with a grey beard
"""


def test_split_setting_guesses_place_and_action():
    assert split_setting("running on a beach") == ("running", "a beach")
    assert split_setting("in a city alley") == ("", "a city alley")
    assert split_setting("chasing a frisbee") == ("chasing a frisbee", None)
    assert split_setting("dressed in a raincoat") == ("dressed in a raincoat", None)
    assert split_setting("protecting its young in the savannah") == ("protecting its young", "the savannah")


def test_converter_maps_style_subject_settings_and_reports_its_guesses(tmp_path, capsys):
    source = tmp_path / "consistory+.yaml"
    source.write_text(SOURCE)
    out = tmp_path / "stories.yaml"
    assert cli.main(["eval", "convert", str(source), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 of 3 sets, 8 images" in printed and "4 settings split" in printed and "1 place-only" in printed
    story = load_story(out)  # the tool's own parser accepts it
    assert [len(g.images) for g in story.groups] == [4, 2, 2]
    dog = story.groups[0]
    assert dog.identity.spec() == "A photo of#a dog#chasing a frisbee"          # identity = first setting
    assert dog.frames[0].spec() == "A photo of a beach,#a dog#running"
    assert dog.frames[1].spec() == "A photo of a city alley,#a dog#in a city alley"
    assert dog.frames[2].spec() == "A photo of#a dog#dressed in a raincoat"
    assert dog.captions == ["A photo of A dog chasing a frisbee", "A photo of A dog running on a beach",
                            "A photo of A dog in a city alley", "A photo of A dog dressed in a raincoat"]
    fox = story.groups[1]
    assert fox.identity.background == "A picture of a tree," and fox.frames[0].background == "A picture of"
    assert fox.captions[1] == "a red fox jumping"
    assert story.groups[2].identity.spec() == ("A watercolor illustration of a library,#an old man with a grey beard#"
                                               "reading a book")
    text = out.read_text()
    assert text.startswith("# characonsist: converted story list") and "1 empty styles" in text
    # rerun replaces its own file; a file it did not write is kept unless --force
    assert cli.main(["eval", "convert", str(source), "--out", str(out), "--limit", "1"]) == 0
    foreign = tmp_path / "mine.yaml"
    foreign.write_text("scenes: []\n")
    assert cli.main(["eval", "convert", str(source), "--out", str(foreign)]) == 2
    assert "not written by the converter" in capsys.readouterr().err and foreign.read_text() == "scenes: []\n"


def test_limit_and_seeded_subset(tmp_path):
    source = tmp_path / "list.yaml"
    source.write_text("\n".join(f"- {{style: A photo of, subject: A cat {i}, settings: [sitting, running]}}"
                                for i in range(20)))
    sets = read_sets(source)
    assert len(sets) == 20 and sets[3]["id"] == "set_3"
    assert [s["id"] for s in subset(sets, 3, None)] == ["set_0", "set_1", "set_2"]
    a, b, c = (subset(sets, 5, seed) for seed in (1, 1, 2))
    assert [s["id"] for s in a] == [s["id"] for s in b] != [s["id"] for s in c]
    assert [s["id"] for s in a] == sorted((s["id"] for s in a), key=lambda n: int(n.split("_")[1]))
    converted = convert_sets(a)
    assert converted.counts == {"sets": 5, "images": 10, "split": 0, "place_only": 0, "no_place": 10, "empty_style": 0}
    write_story(converted, tmp_path / "out.yaml", source)
    assert len(load_story(tmp_path / "out.yaml").groups) == 5


def test_bad_source_names_the_entry(tmp_path):
    source = tmp_path / "bad.yaml"
    source.write_text("animals:\n- {style: A photo of, settings: [running]}\n- {subject: A cat, settings: []}\n")
    with pytest.raises(ConvertError) as error:
        read_sets(source)
    assert "bad.yaml: animals[0]: 'subject'" in str(error.value) and "animals[1]: 'settings'" in str(error.value)
    source.write_text("just text")
    with pytest.raises(ConvertError, match="expected a mapping"):
        read_sets(source)
