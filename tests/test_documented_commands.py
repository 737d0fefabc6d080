"""Every toy-model command of README.md and examples/README.md works as written (the shipped toy model, CPU).

Commands are read from the documents' code blocks, so a changed document is tested as it reads: shell lines
that run ``characonsist`` on the toy model (``--model toy``, ``demo``, ``bench toy``) go through the CLI's
``main`` in a folder holding a copy of ``examples/``; Python blocks on the toy model are executed (also those of
docs/API.md).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

from characonsist import cli

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "examples/README.md")


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def toy_commands() -> list[str]:
    found = []
    for doc in DOCUMENTS:
        for block in code_blocks((ROOT / doc).read_text(), "bash"):
            for line in block.splitlines():
                for part in line.split("&&"):
                    words = shlex.split(part, comments=True)
                    if not words or Path(words[0]).name != "characonsist":
                        continue
                    args = words[1:]
                    model = args[args.index("--model") + 1] if "--model" in args else "toy"
                    if (args[:1] == ["demo"] or args[:2] == ["bench", "toy"] or args[:1] == ["generate"]) \
                            and model == "toy" and (args[:1] != ["generate"] or "--model" in args):
                        command = " ".join(shlex.quote(w) for w in args)
                        if command not in found:
                            found.append(command)
    return found


def toy_python() -> list[str]:
    """Python blocks on the toy model (docs/API.md's application-layer example too)."""
    return [block for doc in (*DOCUMENTS, "docs/API.md") for block in code_blocks((ROOT / doc).read_text(), "python")
            if "TOY_MODEL_DIR" in block or 'model="toy"' in block]


def test_the_demo_folder_is_ignored_by_git():
    """``characonsist demo`` run from a checkout leaves its folder there: git must not list it as untracked."""
    from characonsist.cli import build_parser

    default = build_parser().parse_args(["demo"]).out
    assert f"/{default}/" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_documents_have_toy_commands():
    commands = toy_commands()
    assert any(c.startswith("demo") for c in commands)
    assert any(c.startswith("generate") for c in commands) and any(c.startswith("bench toy") for c in commands)
    assert len(toy_python()) == 3


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """One folder for all the commands, as a user runs them one after the other in a checkout (so the examples'
    command after the README's same story, with fewer options, resumes: nothing to do)."""
    folder = tmp_path_factory.mktemp("checkout")
    shutil.copytree(ROOT / "examples", folder / "examples")
    here = os.getcwd()
    os.chdir(folder)
    yield folder
    os.chdir(here)


@pytest.mark.slow
@pytest.mark.parametrize("command", toy_commands())
def test_documented_toy_command_works_as_written(checkout, command, capsys):
    args = shlex.split(command)
    assert cli.main(args) == 0, capsys.readouterr().err
    if args[0] in ("generate", "demo"):
        out = checkout / (args[args.index("--out") + 1] if "--out" in args else "characonsist-demo")
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["groups"] and all(g["status"] == "done" for g in manifest["groups"])
        for group in manifest["groups"]:
            assert (out / group["storyboard"]).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("block", toy_python())
def test_documented_toy_python_works_as_written(checkout, block):
    exec(compile(block, "<README python block>", "exec"), {})
