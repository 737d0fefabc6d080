"""Published figures, shown as reference rows by ``characonsist eval --compare --benchmark NAME``.

Only figures from a paper that used the same prompt set are listed under a benchmark. They were measured with
the paper's own models (its CLIP variant is not stated; SAM masks; RetinaFace + FaceNet for ID sim), so they
place a run, they do not certify it: the same images can score differently with other CLIP/mask/face models.
"""

from __future__ import annotations

CHARACONSIST = "CharaConsist (ICCV 2025), Table 1"

BENCHMARKS: dict[str, dict] = {
    "characonsist-fixed-bg": {
        "description": "CharaConsist's own GPT-4 prompt groups, background preserved ([environment], [character], "
                       "[action]; 5-8 prompts a group, environment and character fixed, action varies)",
        "source": CHARACONSIST + ", background preservation",
        "rows": [
            {"label": "StoryDiffusion (SDXL)", "values": {"clip_t": 0.272, "clip_i": 0.875, "clip_i_fg": 0.846,
                                                          "clip_i_bg": 0.870, "id_sim": 0.643}},
            {"label": "ConsiStory (SDXL)", "values": {"clip_t": 0.268, "clip_i": 0.889, "clip_i_fg": 0.860,
                                                      "clip_i_bg": 0.886, "id_sim": 0.721}},
            {"label": "CharaConsist (FLUX.1-dev)", "values": {"clip_t": 0.281, "clip_i": 0.910, "clip_i_fg": 0.876,
                                                              "clip_i_bg": 0.916, "id_sim": 0.748}},
        ],
    },
    "characonsist-switch-bg": {
        "description": "CharaConsist's own GPT-4 prompt groups, background switched (only [character] fixed)",
        "source": CHARACONSIST + ", background switching",
        "rows": [
            {"label": "StoryDiffusion (SDXL)", "values": {"clip_i_fg": 0.834}},
            {"label": "ConsiStory (SDXL)", "values": {"clip_i_fg": 0.856}},
            {"label": "CharaConsist (FLUX.1-dev)", "values": {"clip_i_fg": 0.881}},
        ],
    },
    "consistory+": {
        "description": "ConsiStory+ (1Prompt1Story's resource/consistory+.yaml), converted with "
                       "`characonsist eval convert`",
        "source": "no published figures are included here for this prompt set",
        "rows": [],
    },
}


def references(benchmark: str | None) -> list[dict]:
    """The reference rows of ``benchmark`` (each with its source); [] for None."""
    if benchmark is None:
        return []
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    entry = BENCHMARKS[benchmark]
    return [{**row, "source": entry["source"]} for row in entry["rows"]]
