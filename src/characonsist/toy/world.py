"""The toy world: a procedural renderer of characters in scenes, with the truth known.

A caption names the scene, the character kind and the action (position and size), written
``background#character#action``; the identity attributes (body colour, pattern, accessory, accessory colour)
are sampled at random and never named, so only a consistency method can keep them across a story.

Geometry is given in units of the character height ``H`` (feet at ``v = 0``, top of the head at ``v = 1``)
and painted on a 2x supersampled canvas, then box-filtered: edges are soft, like a decoder's. Palettes are far
apart in RGB and far from the scene colours so that every attribute reads back after blur at the small size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# ---------------------------------------------------------------- vocabulary (named in captions)
SCENES: dict[str, str] = {
    "beach": "a sunny beach",
    "forest": "a green forest",
    "city": "a grey city",
    "night": "a starry night",
}
KINDS: dict[str, str] = {"cat": "a cat", "robot": "a robot", "bird": "a bird"}
POSITIONS: dict[str, str] = {"left": "on the left", "centre": "in the middle", "right": "on the right"}
SIZES: dict[str, str] = {"small": "small", "big": "big"}
# an action is a size and a position: "small-left" -> "small on the left"
ACTIONS: dict[str, str] = {f"{s}-{p}": f"{SIZES[s]} {POSITIONS[p]}" for s in SIZES for p in POSITIONS}

# ---------------------------------------------------------------- identity attributes (never named)
BODY_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 35), "orange": (245, 130, 0), "purple": (125, 45, 205), "teal": (0, 175, 165),
}
PATTERNS: tuple[str, ...] = ("plain", "stripes", "dots", "checks")
ACCESSORIES: tuple[str, ...] = ("hat", "scarf", "glasses", "bow")
ACCESSORY_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250), "yellow": (255, 225, 20), "blue": (30, 70, 235), "pink": (255, 110, 200),
}
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": tuple(BODY_COLORS), "pattern": PATTERNS, "accessory": ACCESSORIES,
    "accessory_color": tuple(ACCESSORY_COLORS),
}
INK = (30, 30, 30)  # pattern, eyes and limbs
# every flat colour a character is painted with (body, accessory and ink)
CHARACTER_COLORS: tuple[tuple[int, int, int], ...] = (*BODY_COLORS.values(), *ACCESSORY_COLORS.values(), INK)
# every flat colour each scene is painted with (the renderer's own; tests/test_toy_world.py checks they match):
# beach: sky, sea, sand, sun; forest: wood, trunk, canopy, floor; city: sky, two wall shades, windows, road;
# night: sky, stars, moon, ground
SCENE_COLORS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "beach": ((135, 200, 245), (40, 90, 180), (240, 220, 160), (255, 240, 120)),
    "forest": ((30, 85, 40), (100, 60, 30), (65, 145, 60), (85, 115, 45)),
    "city": ((170, 190, 215), (105, 105, 115), (140, 140, 150), (225, 225, 150), (75, 75, 80)),
    "night": ((20, 30, 90), (255, 255, 255), (240, 240, 200), (35, 40, 60)),
}

# every field a readout returns, with its values
FIELDS: dict[str, tuple[str, ...]] = {
    "scene": tuple(SCENES), "kind": tuple(KINDS), "action": tuple(ACTIONS), "position": tuple(POSITIONS),
    "size": tuple(SIZES), **ATTRIBUTES,
}
NAMED_FIELDS = ("scene", "kind", "action", "position", "size")

# body parts of a character, as ``render(..., return_parts=True)`` labels its pixels (0 = the scene): the head
# with everything on it (ears, eyes, beak, antenna), the body (torso, its pattern, the neck), legs, tail, and
# the accessory (in front of whatever it covers)
PARTS: tuple[str, ...] = ("scene", "head", "body", "legs", "tail", "accessory")

VOCAB_WORDS: tuple[str, ...] = tuple(sorted({w for table in (SCENES, KINDS, ACTIONS) for p in table.values()
                                             for w in p.split()}))

_HEIGHT = {"small": 0.34, "big": 0.58}     # character height / image size (small ~44 px at 128)
_CENTRE_X = {"left": 0.25, "centre": 0.5, "right": 0.75}
_GROUND = 0.9                              # feet line / image size
_SS = 2                                    # supersampling factor


@dataclass(frozen=True)
class Character:
    """A character: its kind (named) and its identity attributes (never named)."""

    kind: str
    color: str
    pattern: str
    accessory: str
    accessory_color: str

    def __post_init__(self):
        _check("kind", self.kind, KINDS)
        for name, values in ATTRIBUTES.items():
            _check(name, getattr(self, name), values)

    def attributes(self) -> dict[str, str]:
        """The identity attributes only (everything but the kind)."""
        return {k: v for k, v in asdict(self).items() if k != "kind"}


def _check(field: str, value: str, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {field} {value!r}; valid: {', '.join(valid)}")


def sample_character(rng: np.random.Generator, kind: str | None = None) -> Character:
    """A character with uniformly random attributes (and kind, unless given)."""
    kind = kind if kind is not None else str(rng.choice(list(KINDS)))
    return Character(kind, *(str(rng.choice(list(values))) for values in ATTRIBUTES.values()))


# ---------------------------------------------------------------- captions

def _norm(text: str) -> str:
    return " ".join(text.lower().replace(",", " ").split())


def caption(scene: str, kind: str, action: str) -> str:
    """``background#character#action`` in plain words, e.g. ``a sunny beach#a cat#small on the left``."""
    _check("scene", scene, SCENES)
    _check("kind", kind, KINDS)
    _check("action", action, ACTIONS)
    return f"{SCENES[scene]}#{KINDS[kind]}#{ACTIONS[action]}"


def _lookup(field: str, text: str, table: dict[str, str]) -> str:
    t = _norm(text)
    for key, phrase in table.items():
        if t in (key, phrase):
            return key
    raise ValueError(f"{field} {text!r} is not in the toy vocabulary; valid: "
                     + ", ".join(repr(p) for p in table.values()))


def parse_caption(text: str) -> tuple[str, str, str]:
    """``background#character#action`` -> (scene, kind, action) keys; phrases or keys accepted."""
    parts = text.split("#")
    if len(parts) != 3:
        raise ValueError(f"caption {text!r} needs exactly two '#': background#character#action")
    return (_lookup("scene", parts[0], SCENES), _lookup("character", parts[1], KINDS),
            _lookup("action", parts[2], ACTIONS))


# two characters of different kinds in one image (``render_two``): the i-th character phrase and the i-th action
# phrase are the i-th character's, drawn in the i-th half of a twice-as-wide image (left half first)
TWO_JOIN = " and "


def two_caption(scene: str, kinds: tuple[str, str], actions: tuple[str, str]) -> str:
    """``background#character and character#action and action``, e.g.
    ``a sunny beach#a cat and a robot#small on the left and big on the right`` (the cat small on the left of the
    image's left half, the robot big on the right of its right half)."""
    _check("scene", scene, SCENES)
    kinds, actions = tuple(kinds), tuple(actions)
    if len(kinds) != 2 or len(actions) != 2:
        raise ValueError(f"a two-character caption needs two kinds and two actions, got {kinds} and {actions}")
    for k in kinds:
        _check("kind", k, KINDS)
    for a in actions:
        _check("action", a, ACTIONS)
    if kinds[0] == kinds[1]:
        raise ValueError(f"the two characters must be of different kinds, got {kinds[0]!r} twice")
    return (f"{SCENES[scene]}#{TWO_JOIN.join(KINDS[k] for k in kinds)}#"
            f"{TWO_JOIN.join(ACTIONS[a] for a in actions)}")


def parse_two_caption(text: str) -> tuple[str, tuple[str, str], tuple[str, str]]:
    """``background#character and character#action and action`` -> (scene, (kind, kind), (action, action)) keys;
    phrases or keys accepted (``beach#cat and robot#small-left and big-right``)."""
    parts = text.split("#")
    if len(parts) != 3:
        raise ValueError(f"caption {text!r} needs exactly two '#': background#character and character#action and "
                         "action")
    fields = []
    for name, part, table in (("character", parts[1], KINDS), ("action", parts[2], ACTIONS)):
        items = f" {_norm(part)} ".split(TWO_JOIN)
        if len(items) != 2:
            raise ValueError(f"{name} field {part!r} of {text!r} must name two {name}s joined by 'and', e.g. "
                             f"{TWO_JOIN.join(list(table.values())[:2])!r}")
        fields.append(tuple(_lookup(name, item, table) for item in items))
    kinds, actions = fields
    if kinds[0] == kinds[1]:
        raise ValueError(f"caption {text!r} names two characters of one kind ({kinds[0]}); they must differ")
    return _lookup("scene", parts[0], SCENES), kinds, actions


# ---------------------------------------------------------------- painting helpers

class _Mask:
    """A boolean mask with the window it lives in (painting touches only the window)."""

    def __init__(self, full: np.ndarray, window: tuple[slice, slice]):
        self.full, self.window = full, window

    def __or__(self, other: _Mask) -> _Mask:
        (a, b), (c, d) = self.window, other.window
        win = (slice(min(a.start, c.start), max(a.stop, c.stop)), slice(min(b.start, d.start), max(b.stop, d.stop)))
        return _Mask(self.full | other.full, win)

    def __and__(self, other: np.ndarray) -> _Mask:
        return _Mask(self.full & other, self.window)


class _Canvas:
    """A float RGB canvas with shape masks in pixel coordinates (supersampled); ``width`` (default: square) makes
    it wider than tall. ``clip_x`` (supersampled columns ``lo, hi``) limits every later shape to those columns."""

    def __init__(self, size: int, width: int | None = None):
        self.nh, self.nw = size * _SS, (width or size) * _SS
        self.img = np.zeros((self.nh, self.nw, 3), np.float32)
        self.y = ((np.arange(self.nh, dtype=np.float32) + 0.5) / _SS)[:, None]   # pixel centres, output-pixel units
        self.x = ((np.arange(self.nw, dtype=np.float32) + 0.5) / _SS)[None, :]
        self.clip_x = (0, self.nw)

    def paint(self, mask: _Mask, color) -> None:
        ys, xs = mask.window
        self.img[ys, xs][mask.full[ys, xs]] = color

    def _window(self, x0, y0, x1, y1) -> tuple[slice, slice]:
        """Index slices of the supersampled pixels whose centres may lie in the box."""
        def idx(a, b, lo, hi):
            return slice(int(np.clip(np.floor(min(a, b) * _SS - 1), lo, hi)),
                         int(np.clip(np.ceil(max(a, b) * _SS + 1), lo, hi)))
        return idx(y0, y1, 0, self.nh), idx(x0, x1, *self.clip_x)

    def _mask(self, box, fn) -> _Mask:
        ys, xs = self._window(*box)
        m = np.zeros((self.nh, self.nw), bool)
        m[ys, xs] = fn(self.x[:, xs], self.y[ys, :])
        return _Mask(m, (ys, xs))

    def rect(self, x0, y0, x1, y1) -> _Mask:
        xa, xb, ya, yb = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
        return self._mask((xa, ya, xb, yb), lambda x, y: (x >= xa) & (x < xb) & (y >= ya) & (y < yb))

    def ellipse(self, cx, cy, rx, ry) -> _Mask:
        return self._mask((cx - rx, cy - ry, cx + rx, cy + ry),
                          lambda x, y: ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0)

    def triangle(self, p0, p1, p2) -> _Mask:
        xs, ys = (p0[0], p1[0], p2[0]), (p0[1], p1[1], p2[1])

        def inside(x, y):
            def side(a, b):
                return (b[0] - a[0]) * (y - a[1]) - (b[1] - a[1]) * (x - a[0])
            s0, s1, s2 = side(p0, p1), side(p1, p2), side(p2, p0)
            return ((s0 >= 0) & (s1 >= 0) & (s2 >= 0)) | ((s0 <= 0) & (s1 <= 0) & (s2 <= 0))
        return self._mask((min(xs), min(ys), max(xs), max(ys)), inside)

    def _pool(self, a: np.ndarray) -> np.ndarray:
        """Supersampled (nh, nw, ...) -> (h, w, s*s, ...): each output pixel's supersamples."""
        s, h, w = _SS, self.nh // _SS, self.nw // _SS
        return a.reshape(h, s, w, s, *a.shape[2:]).swapaxes(1, 2).reshape(h, w, s * s, *a.shape[2:])

    def result(self) -> np.ndarray:
        s, h, w = _SS, self.nh // _SS, self.nw // _SS
        img = self.img.reshape(h, s, w, s, 3).mean(axis=(1, 3))
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


class _TrackingCanvas(_Canvas):
    """A canvas that, once ``track`` is set, also records every supersampled pixel painted (the character's
    coverage) and which body part (``part``, an index into ``PARTS``) painted it last, as the image shows it.
    Painting itself is :class:`_Canvas`'s, so the image is byte-identical to an untracked render."""

    def __init__(self, size: int, width: int | None = None):
        super().__init__(size, width)
        self.track = False
        self.part = 0
        self.cover = np.zeros((self.nh, self.nw), bool)
        self.parts = np.zeros((self.nh, self.nw), np.uint8)

    def paint(self, mask: _Mask, color) -> None:
        super().paint(mask, color)
        if self.track:
            ys, xs = mask.window
            hit = mask.full[ys, xs]
            self.cover[ys, xs] |= hit
            self.parts[ys, xs][hit] = self.part

    def coverage(self) -> np.ndarray:
        """Fraction (float32, 0-1) of each output pixel's supersamples painted while tracking."""
        return self._pool(self.cover).mean(axis=2, dtype=np.float32)

    def part_map(self) -> np.ndarray:
        """uint8 (h, w): per output pixel, the part painted on most of its supersamples (0 = scene) where at least
        half of them are the character's (the ``return_mask`` rule), else 0."""
        blocks = self._pool(self.parts)
        counts = np.stack([(blocks == k).sum(-1) for k in range(len(PARTS))], -1)
        counts[..., 0] = 0
        out = counts.argmax(-1).astype(np.uint8)
        out[self.coverage() < 0.5] = 0
        return out


# ---------------------------------------------------------------- scenes

def _scene(cv: _Canvas, scene: str, size: int, rng: np.random.Generator, width: int | None = None) -> None:
    """Paint ``scene``'s random layout, ``size`` tall and ``width`` (default ``size``) wide: a wider scene has
    proportionally more trees, buildings and stars, and still one sun or moon."""
    S, W = size, width or size
    ground = _GROUND * S
    if scene == "beach":
        horizon = rng.uniform(0.50, 0.56) * S
        cv.paint(cv.rect(0, 0, W, S), (135, 200, 245))                     # sky
        cv.paint(cv.rect(0, horizon, W, horizon + 0.12 * S), (40, 90, 180))  # sea
        cv.paint(cv.rect(0, horizon + 0.12 * S, W, S), (240, 220, 160))      # sand
        sx = rng.uniform(0.1, W / S - 0.1) * S
        cv.paint(cv.ellipse(sx, 0.12 * S, 0.07 * S, 0.07 * S), (255, 240, 120))  # sun
    elif scene == "forest":
        cv.paint(cv.rect(0, 0, W, S), (30, 85, 40))
        for _ in range(round(7 * W / S)):
            tx, w = rng.uniform(0, W), rng.uniform(0.04, 0.07) * S
            cv.paint(cv.rect(tx - w / 2, 0.2 * S, tx + w / 2, ground), (100, 60, 30))       # trunk
            cv.paint(cv.ellipse(tx, rng.uniform(0.12, 0.25) * S, 0.13 * S, 0.1 * S), (65, 145, 60))  # canopy
        cv.paint(cv.rect(0, 0.8 * S, W, S), (85, 115, 45))                # forest floor
    elif scene == "city":
        cv.paint(cv.rect(0, 0, W, S), (170, 190, 215))                    # sky
        x = -rng.uniform(0, 0.1) * S
        while x < W:
            w, top = rng.uniform(0.14, 0.24) * S, rng.uniform(0.15, 0.45) * S
            shade = (105, 105, 115) if rng.random() < 0.5 else (140, 140, 150)
            cv.paint(cv.rect(x, top, x + w - 0.02 * S, 0.8 * S), shade)
            for wy in np.arange(top + 0.04 * S, 0.72 * S, 0.09 * S):        # windows
                for wx in np.arange(x + 0.03 * S, x + w - 0.06 * S, 0.07 * S):
                    cv.paint(cv.rect(wx, wy, wx + 0.03 * S, wy + 0.04 * S), (225, 225, 150))
            x += w
        cv.paint(cv.rect(0, 0.8 * S, W, S), (75, 75, 80))                 # road
    elif scene == "night":
        cv.paint(cv.rect(0, 0, W, S), (20, 30, 90))                       # sky
        for _ in range(round(14 * W / S)):
            r = 0.008 * S
            cv.paint(cv.ellipse(rng.uniform(0, W), rng.uniform(0, 0.6) * S, r, r), (255, 255, 255))
        mx = rng.uniform(0.15, W / S - 0.15) * S
        cv.paint(cv.ellipse(mx, 0.14 * S, 0.08 * S, 0.08 * S), (240, 240, 200))  # moon
        cv.paint(cv.rect(0, 0.8 * S, W, S), (35, 40, 60))                 # ground
    else:
        _check("scene", scene, SCENES)


# ---------------------------------------------------------------- characters

def _pattern_mask(cv: _Canvas, pattern: str, cx: float, feet: float, H: float) -> np.ndarray | None:
    u, v = (cv.x - cx) / H, (feet - cv.y) / H          # local coordinates, in character heights
    if pattern == "plain":
        return None
    if pattern == "stripes":                           # horizontal bands, period 0.14 H
        return (np.floor(v / 0.07) % 2 == 1) & np.ones_like(u, bool)
    if pattern == "dots":                              # dots of radius 0.05 H on a 0.16 H grid
        du, dv = (u % 0.16) - 0.08, (v % 0.16) - 0.08
        return du ** 2 + dv ** 2 <= 0.05 ** 2
    if pattern == "checks":                            # 0.1 H squares
        return (np.floor(u / 0.1) + np.floor(v / 0.1)) % 2 == 1
    _check("pattern", pattern, PATTERNS)
    return None


def _character(cv: _Canvas, ch: Character, cx: float, feet: float, H: float) -> tuple[float, float, float, float]:
    """Paint ``ch`` with feet at (cx, feet) and height H; return its box (x0, y0, x1, y1) in pixels."""
    body = BODY_COLORS[ch.color]

    def P(u, v):                                   # local -> pixel
        return cx + u * H, feet - v * H

    def ell(u, v, ru, rv):
        x, y = P(u, v)
        return cv.ellipse(x, y, ru * H, rv * H)

    def rect(u0, v0, u1, v1):
        (x0, y0), (x1, y1) = P(u0, v0), P(u1, v1)
        return cv.rect(x0, y0, x1, y1)

    def tri(a, b, c):
        return cv.triangle(P(*a), P(*b), P(*c))

    def part(name):                                # what a tracking canvas labels the next paints with
        cv.part = PARTS.index(name)

    if ch.kind == "cat":
        part("tail")
        cv.paint(ell(0.3, 0.3, 0.06, 0.22), body)                      # tail
        torso = ell(0, 0.3, 0.26, 0.29)
        part("head")
        cv.paint(tri((-0.19, 0.8), (-0.03, 0.86), (-0.15, 1.0)) | tri((0.19, 0.8), (0.03, 0.86), (0.15, 1.0)), body)
        head = ell(0, 0.72, 0.2, 0.19)
        eyes = ell(-0.08, 0.74, 0.035, 0.035) | ell(0.08, 0.74, 0.035, 0.035)
        hu, hv, hr, top, neck = 0.0, 0.72, 0.2, 0.97, 0.55
    elif ch.kind == "robot":
        part("legs")
        cv.paint(rect(-0.18, 0, -0.07, 0.14) | rect(0.07, 0, 0.18, 0.14), INK)   # legs
        part("head")
        cv.paint(rect(-0.02, 0.87, 0.02, 0.96), INK)                             # antenna
        cv.paint(ell(0, 0.96, 0.04, 0.04), body)
        torso = rect(-0.25, 0.13, 0.25, 0.6)
        head = rect(-0.18, 0.62, 0.18, 0.88)
        part("body")
        cv.paint(rect(-0.05, 0.59, 0.05, 0.63), INK)                             # neck
        eyes = rect(-0.12, 0.72, -0.04, 0.79) | rect(0.04, 0.72, 0.12, 0.79)
        hu, hv, hr, top, neck = 0.0, 0.75, 0.18, 0.9, 0.6
    elif ch.kind == "bird":
        part("legs")
        cv.paint(rect(-0.1, 0, -0.07, 0.12) | rect(0.07, 0, 0.1, 0.12), INK)     # legs
        part("tail")
        cv.paint(tri((-0.25, 0.45), (-0.45, 0.6), (-0.45, 0.3)), body)            # tail
        torso = ell(0, 0.38, 0.3, 0.27)
        head = ell(0.1, 0.76, 0.17, 0.17)
        part("head")
        cv.paint(tri((0.25, 0.8), (0.25, 0.7), (0.38, 0.75)), INK)               # beak
        eyes = ell(0.04, 0.79, 0.035, 0.035) | ell(0.16, 0.79, 0.035, 0.035)
        hu, hv, hr, top, neck = 0.1, 0.76, 0.17, 0.93, 0.6
    else:
        _check("kind", ch.kind, KINDS)
    part("body")
    cv.paint(torso, body)
    pat = _pattern_mask(cv, ch.pattern, cx, feet, H)
    if pat is not None:
        cv.paint(torso & pat, INK)
    part("head")
    cv.paint(head, body)
    cv.paint(eyes, INK)

    part("accessory")
    acc = ACCESSORY_COLORS[ch.accessory_color]
    if ch.accessory == "hat":                      # brim and crown on top of the head
        cv.paint(rect(hu - hr * 1.15, top - 0.02, hu + hr * 1.15, top + 0.04), acc)
        cv.paint(rect(hu - hr * 0.7, top + 0.03, hu + hr * 0.7, top + 0.2), acc)
        top_v = top + 0.2
    elif ch.accessory == "scarf":                  # band at the neck and a hanging end
        cv.paint(rect(hu - hr * 1.1, neck - 0.04, hu + hr * 1.1, neck + 0.06), acc)
        cv.paint(rect(hu + hr * 0.3, neck - 0.25, hu + hr * 0.85, neck), acc)
        top_v = 1.0
    elif ch.accessory == "glasses":                # two big lenses and a bridge over the eyes
        ey = hv + 0.02
        cv.paint(ell(hu - 0.085, ey, 0.075, 0.07) | ell(hu + 0.085, ey, 0.075, 0.07)
                 | rect(hu - 0.03, ey - 0.012, hu + 0.03, ey + 0.012), acc)
        top_v = 1.0
    elif ch.accessory == "bow":                    # butterfly bow on the upper left of the head
        bu, bv = hu - hr * 0.75, top - 0.02
        cv.paint(tri((bu, bv), (bu - 0.16, bv + 0.1), (bu - 0.16, bv - 0.08))
                 | tri((bu, bv), (bu + 0.16, bv + 0.1), (bu + 0.16, bv - 0.08)), acc)
        cv.paint(ell(bu, bv, 0.04, 0.04), acc)
        top_v = 1.05
    else:
        _check("accessory", ch.accessory, ACCESSORIES)
    x0, y0 = P(-0.5, top_v)
    x1, y1 = P(0.5, 0)
    return x0, y0, x1, y1


def action_geometry(action: str, size: int = 128) -> tuple[float, float, float]:
    """Nominal (centre x, feet y, height) in pixels of a character doing ``action`` (before jitter)."""
    _check("action", action, ACTIONS)
    s, p = action.split("-")
    return _CENTRE_X[p] * size, _GROUND * size, _HEIGHT[s] * size


def _place(action: str, size: int, rng: np.random.Generator, jitter: bool) -> tuple[float, float, float]:
    """(centre x, feet y, height) of a character doing ``action``, jittered when ``jitter``."""
    cx, feet, H = action_geometry(action, size)
    if jitter:
        cx += rng.uniform(-0.03, 0.03) * size
        feet += rng.uniform(-0.02, 0.02) * size
        H *= rng.uniform(0.95, 1.05)
    return cx, feet, H


def _extras(cv: _Canvas, boxes: list, return_box: bool, return_mask: bool, return_parts: bool,
            half: int = 0) -> tuple:
    """The requested extras in the order (box, mask, parts). With ``half`` (two characters, ``half`` columns
    each), each is a pair: the characters' boxes, and each character's full-image mask and part map, zero outside
    its half."""
    out: list = [tuple(boxes) if half else boxes[0]] if return_box else []
    for want, make in ((return_mask, lambda: cv.coverage() >= 0.5), (return_parts, lambda: cv.part_map())):
        if want:
            a = make()
            out.append(tuple(np.where(np.arange(a.shape[1]) // half == i, a, 0).astype(a.dtype) for i in range(2))
                       if half else a)
    return tuple(out)


def render(scene: str, character: Character, action: str, size: int = 128,
           rng: np.random.Generator | None = None, return_box: bool = False, return_mask: bool = False,
           return_parts: bool = False):
    """Draw ``character`` doing ``action`` in ``scene``: uint8 (size, size, 3).

    ``rng`` jitters the scene layout and the character's place and size a little; ``None`` draws the nominal
    image. With ``return_box`` also return the character's box (x0, y0, x1, y1) in pixels. With
    ``return_mask`` also return the character's true pixel mask: bool (size, size), True where at least half
    of the pixel's supersamples belong to the character (its body, pattern, eyes, limbs and accessory). The
    image is the same, byte for byte, with or without it. With ``return_parts`` also return the body part of
    every pixel: uint8 (size, size), an index into ``PARTS`` (0 = scene; nonzero exactly where the mask is True).
    Extras come in that order: ``(img, box, mask, parts)``.
    """
    _check("scene", scene, SCENES)
    jitter = rng is not None
    rng = rng if rng is not None else np.random.default_rng(0)
    track = return_mask or return_parts
    cv = _TrackingCanvas(size) if track else _Canvas(size)
    _scene(cv, scene, size, rng)
    cx, feet, H = _place(action, size, rng, jitter)
    if track:
        cv.track = True
    box = _character(cv, character, cx, feet, H)
    img = cv.result()
    if not (return_box or return_mask or return_parts):
        return img
    return (img, *_extras(cv, [box], return_box, return_mask, return_parts))


def render_two(scene: str, characters: tuple[Character, Character], actions: tuple[str, str], size: int = 128,
               rng: np.random.Generator | None = None, return_box: bool = False, return_mask: bool = False,
               return_parts: bool = False):
    """Draw two characters in one ``scene``: uint8 (size, 2 * size, 3), the i-th character doing the i-th action
    in the i-th half (left half first).

    The scene is one continuous layout across the whole width (twice the trees, buildings and stars of a single
    render, one sun or moon). Each character's action places it within its own half, as ``render`` places one in a
    ``size`` image, and it is drawn only inside its half (clipped at the middle as a single render is clipped at
    its border), so the two never overlap and each half is a single render's view of its character: the readout
    reads each half (``readout.read_pairs``). ``rng`` jitters the layout and each character as in ``render``.

    Extras as in ``render``, each a pair (one per character): boxes (x0, y0, x1, y1) in the wide image's pixels,
    clipped to the character's half; masks and part maps (size, 2 * size), zero outside the character's half.
    """
    _check("scene", scene, SCENES)
    characters, actions = tuple(characters), tuple(actions)
    if len(characters) != 2 or len(actions) != 2:
        raise ValueError(f"render_two draws two characters doing two actions, got {len(characters)} and "
                         f"{len(actions)}")
    jitter = rng is not None
    rng = rng if rng is not None else np.random.default_rng(0)
    track = return_mask or return_parts
    cv = _TrackingCanvas(size, 2 * size) if track else _Canvas(size, 2 * size)
    _scene(cv, scene, size, rng, width=2 * size)
    if track:
        cv.track = True
    boxes = []
    for i, (character, action) in enumerate(zip(characters, actions, strict=True)):
        cx, feet, H = _place(action, size, rng, jitter)
        cv.clip_x = (i * size * _SS, (i + 1) * size * _SS)
        x0, y0, x1, y1 = _character(cv, character, cx + i * size, feet, H)
        boxes.append((max(x0, i * size), y0, min(x1, (i + 1) * size), y1))
    img = cv.result()
    if not (return_box or return_mask or return_parts):
        return img
    return (img, *_extras(cv, boxes, return_box, return_mask, return_parts, half=size))


def labels_of(scene: str, character: Character, action: str) -> dict[str, str]:
    """Every field of an image, as a readout should return it."""
    s, p = action.split("-")
    return {"scene": scene, "kind": character.kind, "action": action, "position": p, "size": s,
            **character.attributes()}


def sample_example(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, dict[str, str], str]:
    """A random (image, labels, caption): uniform scene, character and action."""
    scene = str(rng.choice(list(SCENES)))
    ch = sample_character(rng)
    action = str(rng.choice(list(ACTIONS)))
    img = render(scene, ch, action, size=size, rng=rng)
    return img, labels_of(scene, ch, action), caption(scene, ch.kind, action)


def sample_two_fields(rng: np.random.Generator) -> tuple[str, tuple[str, str], tuple[str, str]]:
    """Random named fields of a two-character image: (scene, kinds, actions), a uniform scene, two different kinds
    in random order and an action each."""
    scene = str(rng.choice(list(SCENES)))
    kinds = tuple(str(k) for k in rng.choice(list(KINDS), size=2, replace=False))
    return scene, kinds, tuple(str(rng.choice(list(ACTIONS))) for _ in kinds)


def sample_two_example(rng: np.random.Generator, size: int = 128
                       ) -> tuple[np.ndarray, tuple[dict[str, str], dict[str, str]], str]:
    """A random two-character (image, (left labels, right labels), caption): ``sample_two_fields``, each character
    with its own random identity (``render_two``, ``two_caption``)."""
    scene, kinds, actions = sample_two_fields(rng)
    chars = tuple(sample_character(rng, k) for k in kinds)
    img = render_two(scene, chars, actions, size=size, rng=rng)
    labels = tuple(labels_of(scene, ch, a) for ch, a in zip(chars, actions, strict=True))
    return img, labels, two_caption(scene, kinds, actions)
