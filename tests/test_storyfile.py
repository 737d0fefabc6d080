"""Story files: the official text format and the structured YAML/TOML format, with their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from characonsist.inputs import prompt_problems
from characonsist.storyfile import StoryError, load_story, parse_structured, parse_text

ROOT = Path(__file__).resolve().parents[1]


def test_text_groups_identity_first_and_blank_lines():
    story = parse_text("park#a cat#sits\npark#a cat#runs\r\n\n\n  \nbeach#a dog#swims\n", "s.txt")
    assert [g.name for g in story.groups] == ["group_000", "group_001"]
    first = story.groups[0]
    assert first.identity.prompt == "park a cat sits"
    assert [f.action for f in first.frames] == ["runs"]
    assert first.where == ["s.txt:1", "s.txt:2"]
    assert story.groups[1].frames == [] and story.groups[1].where == ["s.txt:6"]


def test_text_errors_are_all_reported_with_line_numbers():
    with pytest.raises(StoryError) as info:
        parse_text("park#a cat#sits\npark#a cat\n\nbeach##swims\na#b#c#d\n", "s.txt")
    problems = info.value.problems
    assert len(problems) == 3
    assert problems[0].startswith("s.txt:2:") and "has 1 '#'" in problems[0]
    assert problems[1].startswith("s.txt:4:") and "character field is empty" in problems[1]
    assert problems[2].startswith("s.txt:5:") and "has 3 '#'" in problems[2]


def test_text_empty_story():
    with pytest.raises(StoryError, match="empty"):
        parse_text("\n \n", "s.txt")


YAML = """
characters: {pip: a small red robot}
defaults: {seed: 11}
scenes:
  - name: Park Day!
    background: a park
    character: pip
    identity: {action: standing}
    frames:
      - {action: waving, caption: hello}
      - {background: a beach, action: running, seed: 7, height: 32, width: 48}
  - frames:
      - {background: a room, character: a cat, action: sleeping}
"""


def test_structured_inheritance_names_and_overrides():
    story = parse_structured(YAML, "s.yaml")
    park, second = story.groups
    assert park.name == "000_park-day" and second.name == "group_001"
    assert park.identity.prompt == "a park a small red robot standing"
    assert park.identity.seed == 11 and park.frames[1].seed == 7
    assert (park.frames[1].background, park.frames[1].height, park.frames[1].width) == ("a beach", 32, 48)
    assert park.captions == [None, "hello", None]
    assert second.identity.character == "a cat" and second.frames == []  # first frame becomes the identity
    assert park.where[2] == "s.yaml: scenes[0].frames[1]"


@pytest.mark.parametrize("text, message", [
    ("scenes:\n  - {name: a}\n", "scenes[0]: empty group"),
    ("scenes:\n  - frames: [{background: a, character: b, action: c, height: 100}]\n", "height=100 is not a positive multiple of 16"),
    ("scenes:\n  - frames: [{background: a, character: b}]\n", "action field is empty"),
    ("scenes:\n  - frames: [{background: a, character: b, action: c, colour: red}]\n", "unknown key 'colour'"),
    ("scenes: []\n", "non-empty list"),
    ("scenes: [\n", "not valid YAML"),
])
def test_structured_errors(text, message):
    with pytest.raises(StoryError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_structured(text, "s.yaml")


def test_toml_and_shipped_examples_parse():
    toml = load_story(ROOT / "examples" / "story.toml")
    assert toml.format == "toml" and toml.groups[0].frames[1].seed == 7
    yaml = load_story(ROOT / "examples" / "story.yaml")
    assert [len(g.images) for g in yaml.groups] == [4, 2]
    text = load_story(ROOT / "examples" / "story-fg_only.txt")
    assert [len(g.images) for g in text.groups] == [4, 3]
    demo = load_story(ROOT / "src" / "characonsist" / "examples" / "demo_story.txt")
    assert [len(g.images) for g in demo.groups] == [5]


def test_prompt_length_counts_tokens():
    class Tok:  # one token per word plus the end-of-text token, like T5
        def __call__(self, text):
            return type("Enc", (), {"input_ids": text.split() + ["</s>"]})()

    story = parse_text("park#a cat#sits\npark#a very very big cat#sits\n", "s.txt")
    images = [im for g in story.groups for im in g.images]
    places = [w for g in story.groups for w in g.where]
    assert prompt_problems(images, places, Tok(), 9) == []
    problems = prompt_problems(images, places, Tok(), 6)
    assert len(problems) == 1 and problems[0].startswith("s.txt:2:") and "8 T5 tokens" in problems[0]
    assert "at most 6" in problems[0]


def test_missing_file():
    with pytest.raises(StoryError, match="not found"):
        load_story("/nonexistent/story.txt")


def test_the_identity_may_name_a_picture(tmp_path):
    (tmp_path / "pics").mkdir()
    text = tmp_path / "pics" / "story.txt"
    text.write_text("park#a cat#sits | me.png\npark#a cat#runs\n\nbeach#a dog#swims|/abs/dog.jpg\nbeach#a dog#digs\n"
                    "\nroom#a fox#naps\nroom#a fox#eats\n")
    story = load_story(text)
    assert [g.picture for g in story.groups] == [str(tmp_path / "pics" / "me.png"), "/abs/dog.jpg", None]
    assert story.groups[0].identity.action == "sits" and story.groups[1].identity.action == "swims"
    yaml = tmp_path / "pics" / "story.yaml"
    yaml.write_text("scenes:\n  - background: park\n    character: a cat\n    identity: {action: sits, image: me.png}\n"
                    "    frames: [{action: runs}]\n  - background: beach\n    character: a dog\n"
                    "    frames: [{action: swims, image: dog.png}, {action: digs}]\n")
    story = load_story(yaml)
    assert [g.picture for g in story.groups] == [str(tmp_path / "pics" / "me.png"), str(tmp_path / "pics" / "dog.png")]
    toml = tmp_path / "story.toml"
    toml.write_text('[[scenes]]\nbackground = "park"\ncharacter = "a cat"\nidentity = {action = "sits", image = '
                    '"me.png"}\nframes = [{action = "runs"}]\n')
    assert load_story(toml).groups[0].picture == str(tmp_path / "me.png")


def test_only_the_identity_takes_a_picture():
    with pytest.raises(StoryError) as info:
        parse_text("park#a cat#sits\npark#a cat#runs | me.png\n\nbeach#a dog#swims |\nbeach#a dog#digs\n", "s.txt")
    assert info.value.problems == [
        "s.txt:2: only a group's first line (its identity) may name a picture ('| picture.png'); this is a frame",
        "s.txt:4: '|' with no picture after it; write background#character#action | picture.png"]
    with pytest.raises(StoryError) as info:
        parse_structured("scenes:\n  - background: park\n    character: a cat\n    identity: {action: sits, image: 3}\n"
                         "    frames: [{action: runs, image: b.png}]\n", "s.yaml")
    assert info.value.problems == [
        "s.yaml: scenes[0].identity: 'image' must be the path of a picture file, got 3",
        "s.yaml: scenes[0].frames[0]: only the identity (a scene's 'identity', else its first frame) may have an "
        "'image'"]
