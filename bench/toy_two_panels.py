"""The toy model's in-context identity, as a picture: four two-panel samples with what the readout reads in each
panel (docs/img/toy_v3_two_panels.png).

    python bench/toy_two_panels.py --out docs/img/toy_v3_two_panels.png
"""

from __future__ import annotations

import argparse

from PIL import Image, ImageDraw

from characonsist.output import _font
from characonsist.toy import checks, world
from characonsist.toy.model import load_toy_pipeline
from characonsist.toy.training.data import two_panel_prompt

CAPTIONS = (("a sunny beach#a cat#big in the middle", "a grey city#a cat#small on the left"),
            ("a green forest#a robot#small on the right", "a starry night#a robot#big on the left"),
            ("a grey city#a bird#big on the left", "a sunny beach#a bird#small in the middle"),
            ("a starry night#a cat#small in the middle", "a green forest#a cat#big on the right"))
SEEDS = (11, 12, 13, 14)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    pipe, defaults = load_toy_pipeline()
    prompts = [two_panel_prompt(checks._prompt(a), checks._prompt(b)) for a, b in CAPTIONS]
    images = checks.generate(pipe, defaults, prompts, list(SEEDS), batch=4, width=2 * defaults["width"])
    w, h = 2 * defaults["width"], defaults["height"]
    sheet = Image.new("RGB", (2 * w + 30, 2 * (h + 52) + 10), "white")
    draw, font = ImageDraw.Draw(sheet), _font(12)
    for i, image in enumerate(images):
        left, right = checks.read_panels(image)
        x, y = 10 + (i % 2) * (w + 10), 10 + (i // 2) * (h + 52)
        sheet.paste(Image.fromarray(image), (x, y))
        same = sum(left[k] == right[k] for k in world.ATTRIBUTES)
        draw.text((x, y + h + 3), "left: " + " ".join(left[k] for k in world.ATTRIBUTES), fill="black", font=font)
        draw.text((x, y + h + 17), "right: " + " ".join(right[k] for k in world.ATTRIBUTES), fill="black", font=font)
        draw.text((x, y + h + 31), f"{same} of 4 attributes the same", fill="black", font=font)
    sheet.save(args.out)


if __name__ == "__main__":
    main()
