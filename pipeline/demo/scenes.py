"""Synthetic pictures and the captions that describe them, for the demo pool and the tiny CLIP.

A *scene* is one coloured, textured shape of some size at some position over a background. The
same renderer and caption writer serve two purposes with different seeds and distributions:

* the demo pool (:mod:`pipeline.demo.pool`): common kinds plus a few *rare* kinds at about 1%;
* the tiny CLIP's training pairs (:mod:`pipeline.demo.train_tiny_clip`): every attribute value
  equally likely, as a large web-trained CLIP has seen every word often (it is the *pool* that is
  skewed, not the model's knowledge).

Pictures are drawn at :data:`CANVAS` pixels (big enough to read in the report); the model sees
them resized to its own input size by open_clip's preprocessing, exactly as a user's images.
Everything is a pure function of a ``numpy.random.Generator``, so a seed fixes every byte.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 96

COMMON_SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
RARE_SHAPES = ("heart",)
SHAPES = COMMON_SHAPES + RARE_SHAPES

COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 210, 35),
    "purple": (135, 55, 175),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "cyan": (40, 215, 225),
}
RARE_COLOURS = ("cyan",)
COMMON_COLOURS = tuple(c for c in COLOURS if c not in RARE_COLOURS)

SIZES = {"small": 13, "large": 27}  # shape radius in canvas pixels
TEXTURES = ("solid", "striped", "dotted")
POSITIONS = {  # centre of the shape, as fractions of the canvas
    "left": (0.30, 0.50),
    "right": (0.70, 0.50),
    "top": (0.50, 0.30),
    "bottom": (0.50, 0.70),
    "centre": (0.50, 0.50),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
BACKGROUNDS = {
    "grey": (128, 128, 128),
    "beige": (222, 206, 172),
    "navy": (22, 30, 82),
    "olive": (110, 115, 40),
    "pink": (235, 170, 195),
}
TEXTURE_PERIOD = 8  # pixels between stripes / dots on the canvas
# How often each shape and colour occurs in the demo pool (and in the tiny CLIP's training pairs,
# which are drawn from the same kind of data the model is later asked to filter, as a web-trained
# CLIP is): rare kinds are rare for the model too, so it scores them less confidently.
RARE_RATE = 0.01
POOL_SHAPE_PROBS = {**{s: (1 - RARE_RATE) / len(COMMON_SHAPES) for s in COMMON_SHAPES},
                    **{s: RARE_RATE / len(RARE_SHAPES) for s in RARE_SHAPES}}
POOL_COLOUR_PROBS = {**{c: (1 - RARE_RATE) / len(COMMON_COLOURS) for c in COMMON_COLOURS},
                     **{c: RARE_RATE / len(RARE_COLOURS) for c in RARE_COLOURS}}
# A shape must stand out from its background: pairs closer than this (RGB distance) are redrawn.
MIN_CONTRAST = 90.0


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    texture: str
    position: str
    background: str
    jitter_x: int = 0  # pixel offsets of the shape centre, so no two pictures are identical
    jitter_y: int = 0
    background_seed: int = 0  # seed of the background's gradient and grain
    texture_phase: int = 0  # offset (pixels) of the stripes/dots, so a shifted copy is still in-distribution
    template: int = 0  # which caption wording

    @property
    def kind(self) -> str:
        """The coverage unit of the demo's evaluation: shape and colour."""
        return f"{self.colour} {self.shape}"

    @property
    def is_rare(self) -> bool:
        return self.shape in RARE_SHAPES or self.colour in RARE_COLOURS

    def as_dict(self) -> dict:
        return asdict(self)


# -- sampling -------------------------------------------------------------------------------------

def _contrast(colour: str, background: str) -> float:
    a = np.asarray(COLOURS[colour], float)
    b = np.asarray(BACKGROUNDS[background], float)
    return float(np.linalg.norm(a - b))


CAPTION_TEMPLATES = (
    "a {size} {colour} {texture}{shape} {where} over {a_bg} {bg} background",
    "photo of {a_colour} {colour} {texture}{shape}, {size}, {where}, {bg} background",
    "{size} {colour} {texture}{shape} {where} on {bg}",
    "{a_bg} {bg} picture with a {size} {texture}{colour} {shape} {where}",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sample_scene(rng: np.random.Generator, shape_probs: dict[str, float] | None = None,
                 colour_probs: dict[str, float] | None = None) -> Scene:
    """One random scene. Probabilities default to uniform over every value (rare ones included)."""
    shapes = list(shape_probs) if shape_probs else list(SHAPES)
    p_shape = np.asarray(list(shape_probs.values()), float) if shape_probs else None
    colours = list(colour_probs) if colour_probs else list(COLOURS)
    p_colour = np.asarray(list(colour_probs.values()), float) if colour_probs else None
    shape = shapes[rng.choice(len(shapes), p=None if p_shape is None else p_shape / p_shape.sum())]
    colour = colours[rng.choice(len(colours), p=None if p_colour is None else p_colour / p_colour.sum())]
    backgrounds = [b for b in BACKGROUNDS if _contrast(colour, b) >= MIN_CONTRAST]
    return Scene(
        shape=shape,
        colour=colour,
        size=list(SIZES)[rng.integers(len(SIZES))],
        texture=TEXTURES[rng.integers(len(TEXTURES))],
        position=list(POSITIONS)[rng.integers(len(POSITIONS))],
        background=backgrounds[rng.integers(len(backgrounds))],
        jitter_x=int(rng.integers(-4, 5)),
        jitter_y=int(rng.integers(-4, 5)),
        background_seed=int(rng.integers(2**31)),
        texture_phase=int(rng.integers(TEXTURE_PERIOD)),
        template=int(rng.integers(len(CAPTION_TEMPLATES))),
    )


def caption(scene: Scene) -> str:
    """A one-line description of everything visible in the picture."""
    texture = "" if scene.texture == "solid" and scene.template % 2 else f"{scene.texture} "
    return CAPTION_TEMPLATES[scene.template].format(
        size=scene.size, colour=scene.colour, texture=texture, shape=scene.shape,
        where=POSITION_PHRASES[scene.position], bg=scene.background,
        a_bg=_article(scene.background), a_colour=_article(scene.colour),
    )


# Captions DataComp's basic filter removes (not English, or too short to say anything): planted in
# benchmark pools (``PoolSpec.junk_caption_rate``), never in the tiny CLIP's training pairs.
FOREIGN_CAPTIONS = {
    "fr": ("une image avec un {shape} {colour}, fond {bg}",
           {"circle": "cercle", "square": "carré", "triangle": "triangle", "star": "étoile", "diamond": "losange",
            "cross": "croix", "heart": "cœur"},
           {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "purple": "violet",
            "orange": "orange", "white": "blanc", "black": "noir", "cyan": "cyan"}),
    "de": ("ein Bild mit einem {colour} {shape} auf {bg} Hintergrund",
           {"circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck", "star": "Stern", "diamond": "Raute",
            "cross": "Kreuz", "heart": "Herz"},
           {"red": "roten", "green": "grünen", "blue": "blauen", "yellow": "gelben", "purple": "violetten",
            "orange": "orangen", "white": "weißen", "black": "schwarzen", "cyan": "türkisen"}),
    "es": ("una imagen con un {shape} {colour} sobre fondo {bg}",
           {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo", "star": "estrella",
            "diamond": "rombo", "cross": "cruz", "heart": "corazón"},
           {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo", "purple": "morado",
            "orange": "naranja", "white": "blanco", "black": "negro", "cyan": "cian"}),
}
FOREIGN_BACKGROUNDS = {"grey": "gris", "beige": "beige", "navy": "marino", "olive": "oliva", "pink": "rosa"}


def foreign_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A true description of the picture in French, German or Spanish."""
    template, shapes, colours = FOREIGN_CAPTIONS[list(FOREIGN_CAPTIONS)[rng.integers(len(FOREIGN_CAPTIONS))]]
    return template.format(shape=shapes[scene.shape], colour=colours[scene.colour],
                           bg=FOREIGN_BACKGROUNDS[scene.background])


def short_caption(rng: np.random.Generator) -> str:
    """A caption of one or two tokens that says nothing about the picture (a file name, a stock word)."""
    kind = int(rng.integers(3))
    if kind == 0:
        return f"IMG_{int(rng.integers(1000, 9999))}.jpg"
    if kind == 1:
        return f"DSC{int(rng.integers(10000, 99999))}"
    return ("image", "untitled", "photo", "thumbnail")[int(rng.integers(4))]


# -- rendering ------------------------------------------------------------------------------------

def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.42
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.36
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    if shape == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + x * r / 16.5, cy - y * r / 16.5 - r * 0.1))
        return pts
    return None  # circle


def _texture_layer(scene: Scene, size: int) -> Image.Image:
    """The shape's fill: its colour, with stripes or dots in a contrasting tone."""
    base = COLOURS[scene.colour]
    luminance = 0.299 * base[0] + 0.587 * base[1] + 0.114 * base[2]
    contrast = (25, 25, 25) if luminance > 110 else (235, 235, 235)
    layer = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(layer)
    period = TEXTURE_PERIOD
    phase = scene.texture_phase % period
    if scene.texture == "striped":
        for x0 in range(-size - period + phase, size, period):  # diagonal stripes
            draw.polygon([(x0, 0), (x0 + period // 2, 0), (x0 + period // 2 + size, size), (x0 + size, size)],
                         fill=contrast)
    elif scene.texture == "dotted":
        for y in range(phase - period // 2, size + period, period):
            for x in range(phase - period // 2, size + period, period):
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=contrast)
    return layer


def _background(scene: Scene, size: int) -> Image.Image:
    """A flat colour with a gentle gradient and grain (seeded), so backgrounds vary."""
    rng = np.random.default_rng(scene.background_seed)
    base = np.asarray(BACKGROUNDS[scene.background], np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * rng.uniform(20, 50)
    grain = rng.normal(0, 6, (size, size, 1)).astype(np.float32)
    return Image.fromarray(np.clip(base + ramp + grain, 0, 255).astype(np.uint8))


def render(scene: Scene, size: int = CANVAS) -> Image.Image:
    """Draw the scene as an RGB picture of `size`×`size` pixels."""
    scale = size / CANVAS
    fx, fy = POSITIONS[scene.position]
    cx = fx * size + scene.jitter_x * scale
    cy = fy * size + scene.jitter_y * scale
    r = SIZES[scene.size] * scale
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    poly = _polygon(scene.shape, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(poly, fill=255)
    picture = _background(scene, size)
    picture.paste(_texture_layer(scene, size), (0, 0), mask)
    return picture


def encode_jpeg(picture: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# -- near-duplicate variants ---------------------------------------------------------------------

DUPLICATE_VARIANTS = ("reencoded", "shifted", "recoloured")


def near_duplicate(picture: Image.Image, variant: str, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """A near-copy of `picture` as the web makes them; returns (picture, JPEG quality to save it at)."""
    if variant == "reencoded":  # the same picture, saved again at a much lower quality
        return picture, int(rng.integers(35, 60))
    arr = np.asarray(picture).astype(np.int16)
    if variant == "shifted":  # moved a few pixels, the uncovered edge filled by repeating the border
        dx, dy = (int(v) * int(rng.choice([-1, 1])) for v in rng.integers(2, 5, size=2))
        arr = np.roll(arr, (dy, dx), axis=(0, 1))
        if dy > 0:
            arr[:dy] = arr[dy]
        elif dy < 0:
            arr[dy:] = arr[dy - 1]
        if dx > 0:
            arr[:, :dx] = arr[:, dx:dx + 1]
        elif dx < 0:
            arr[:, dx:] = arr[:, dx - 1:dx]
        return Image.fromarray(arr.astype(np.uint8)), 90
    if variant == "recoloured":  # a slight colour cast and brightness change
        gains = rng.uniform(0.95, 1.05, size=3)
        arr = np.clip(arr * gains + rng.uniform(-6, 6), 0, 255)
        return Image.fromarray(arr.astype(np.uint8)), 90
    raise ValueError(f"unknown near-duplicate variant {variant!r}; variants are {', '.join(DUPLICATE_VARIANTS)}")
