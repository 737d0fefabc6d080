"""The GPU benchmark's workload, shared by ``gpu_bench.py`` and ``memory_table.py``: one story (an identity and up
to 12 frames of one character in one scene), its seed, the prompt the model sees, and a run's figures relative to
its baseline (the same prompts through plain ``FluxPipeline``)."""

from __future__ import annotations

SEED = 2025
BACKGROUND, CHARACTER = "a sunny park with green trees", "a small red robot with a blue hat"
IDENTITY_ACTION = "standing"
ACTIONS = ["waving", "running", "sitting on a bench", "jumping", "reading a book", "eating", "sleeping",
           "dancing", "playing guitar", "walking left", "looking right", "smiling"]


def story(n_frames: int) -> tuple[str, list[str]]:
    """``background#character#action`` prompts: one identity and ``n_frames`` frames in the same scene."""
    if n_frames > len(ACTIONS):
        raise ValueError(f"at most {len(ACTIONS)} frames")
    identity = f"{BACKGROUND}#{CHARACTER}#{IDENTITY_ACTION}"
    return identity, [f"{BACKGROUND}#{CHARACTER}#{a}" for a in ACTIONS[:n_frames]]


def full_prompt(spec: str) -> str:
    """The prompt the model sees (``StoryImage.prompt``: the three fields joined by spaces)."""
    return " ".join(p.strip() for p in spec.split("#") if p.strip())


def comparison(record: dict, base: dict) -> dict:
    """A run's figures relative to its baseline (the same N + 1 prompts through plain FluxPipeline)."""
    out = {"x_baseline": record["wall_s"] / base["wall_s"],
           "transformer_x_baseline": record["transformer_s"] / max(base["transformer_s"], 1e-9),
           "host_peak_delta_gib": record["rss_peak_gib"] - base["rss_peak_gib"]}
    for key in ("gpu_peak_alloc_gib", "gpu_peak_reserved_gib"):
        if key in record and key in base:
            out[key.replace("_gib", "_x_baseline")] = record[key] / base[key]
    return out
