"""Scenes of the synthetic corpus: objects on a 3x3 grid, drawn with PIL, their scene graphs and questions.

An image holds 1..6 objects with distinct colours, distinct shapes and distinct grid cells (so every
question about it has exactly one answer); objects never overlap (one per cell). Everything is drawn at
4x and box-filtered down, on a light background that is plain or lightly textured; large objects may carry
a letter or digit in PIL's default font.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from xllava_jax.data import synth_phrases as ph

KINDS = ("colour", "shape", "count", "position", "binding_shape", "binding_position", "yes_no", "label")
RGB = {"red": (214, 38, 38), "orange": (245, 130, 20), "yellow": (232, 196, 0), "green": (34, 150, 60),
       "blue": (35, 80, 215), "purple": (135, 50, 175), "brown": (125, 75, 35), "black": (25, 25, 25)}
TONE_RGB = {"white": (246, 246, 242), "light gray": (212, 212, 212), "beige": (236, 224, 198)}
LABELS = "ABCDEFGHJKLMNPRSTUVXYZ123456789"
# Object radius as a share of a grid cell. At 0.26 a small shape was about 17 px across at 96 px, and the demo's
# contrastive tower told small shapes apart only 46% of the time (linear probe; large ones 98%); at 0.34, 97%.
RADIUS = {"small": 0.34, "large": 0.44}
SUPERSAMPLE = 4  # shapes and labels are drawn at 4x and box-filtered down (anti-aliasing)
MAX_OBJECTS = len(ph.SHAPES)  # one shape of each kind at most per image


@dataclass(frozen=True)
class Obj:
    """One drawn object: `cell` is its 3x3 grid cell in reading order (row * 3 + col); centre, radius in pixels."""

    shape: str
    colour: str
    size: str
    cell: int
    centre: tuple[float, float]
    radius: float
    label: str | None


@dataclass(frozen=True)
class Scene:
    """An image's content: objects in reading order (by grid cell), the background tone and texture."""

    name: str
    objects: tuple[Obj, ...]
    tone: str
    texture: str

    @property
    def image(self) -> str:
        return f"images/{self.name}.png"


class Question(NamedTuple):
    """A question about a scene. obj: the object asked about (None for count, or a yes/no whose answer is no)."""

    kind: str
    obj: Obj | None
    colour: str | None = None
    shape: str | None = None


def _unit_outline(shape: str) -> list[tuple[float, float]]:
    """The outline of `shape` centred on 0, largest half-extent 1 (square 0.85, so areas look alike)."""
    turn = [2 * math.pi * k / 48 for k in range(48)]
    if shape == "circle":
        points = [(math.cos(t), math.sin(t)) for t in turn]
    elif shape == "square":
        points = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":
        points = [(0, -1), (1, 0.75), (-1, 0.75)]
    elif shape == "diamond":
        points = [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    elif shape == "star":  # five points, inner radius 0.45
        tips = [(1.0 if k % 2 == 0 else 0.45, -math.pi / 2 + k * math.pi / 5) for k in range(10)]
        points = [(r * math.cos(a), r * math.sin(a)) for r, a in tips]
    else:  # heart
        points = [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                             - math.cos(4 * t))) for t in turn]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mid_x, mid_y = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    half = max(max(xs) - min(xs), max(ys) - min(ys)) / 2 / (0.85 if shape == "square" else 1.0)
    return [((x - mid_x) / half, (y - mid_y) / half) for x, y in points]


UNIT_OUTLINES = {shape: _unit_outline(shape) for shape in ph.SHAPES}
LABEL_DROP = {"triangle": 0.3}  # labels sit on the centroid, lower than the middle of a triangle


def outline(obj: Obj, scale: float = 1.0) -> list[tuple[float, float]]:
    """Polygon of `obj` in pixels of an image `scale` times the scene's size."""
    (cx, cy), r = obj.centre, obj.radius
    return [((cx + x * r) * scale, (cy + y * r) * scale) for x, y in UNIT_OUTLINES[obj.shape]]


def sample_scene(name: str, rng: random.Random, image_size: int, n: int, label_share: float) -> Scene:
    """n objects with distinct cells, colours and shapes; large objects carry a label with p = label_share."""
    cell_px = image_size / 3
    cells = sorted(rng.sample(range(9), n))
    objects = []
    for cell, colour, shape in zip(cells, rng.sample(list(RGB), n), rng.sample(list(ph.SHAPES), n)):
        size = rng.choice(("small", "large"))
        radius = cell_px * RADIUS[size]
        slack = max(cell_px / 2 - radius - 1, 0.0)
        row, col = divmod(cell, 3)
        centre = ((col + 0.5) * cell_px + rng.uniform(-slack, slack),
                  (row + 0.5) * cell_px + rng.uniform(-slack, slack))
        label = rng.choice(LABELS) if size == "large" and rng.random() < label_share else None
        objects.append(Obj(shape, colour, size, cell, centre, radius, label))
    return Scene(name, tuple(objects), rng.choice(list(TONE_RGB)), rng.choice(list(ph.TEXTURES)))


def _background(scene: Scene, size: int, noise: np.random.Generator) -> np.ndarray:
    """uint8[size, size, 3]: the tone, plain or with a light texture."""
    image = np.empty((size, size, 3))
    image[:] = TONE_RGB[scene.tone]
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = noise.uniform(0, math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    if scene.texture == "noise":
        image += noise.normal(0, 5, (size, size, 1))
    elif scene.texture == "stripes":
        image += 6 * np.sin(2 * math.pi * noise.uniform(4, 8) * along)[..., None]
    elif scene.texture == "gradient":
        image += 18 * (along - along.mean())[..., None]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """The RGB image of `scene`, image_size x image_size; `rng` seeds the background texture."""
    big = image_size * SUPERSAMPLE
    noise = np.random.default_rng(rng.getrandbits(64))
    image = Image.fromarray(_background(scene, image_size, noise)).resize((big, big), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        rgb = RGB[obj.colour]
        draw.polygon(outline(obj, SUPERSAMPLE), fill=rgb)
        if obj.label:
            ink = (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 150 else (255, 255, 255)
            x, y = obj.centre[0], obj.centre[1] + LABEL_DROP.get(obj.shape, 0.0) * obj.radius
            draw.text((x * SUPERSAMPLE, y * SUPERSAMPLE), obj.label, fill=ink, anchor="mm",
                      font=_font(round(obj.radius * SUPERSAMPLE * 1.1)))
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def scene_graph(scene: Scene, split: str, image_size: int) -> dict:
    """The JSON scene graph: objects (id = index in reading order) and relations left_of, above, next_to."""
    objects, relations = [], []
    for i, obj in enumerate(scene.objects):
        xs, ys = zip(*outline(obj))
        bbox = [max(math.floor(min(xs)), 0), max(math.floor(min(ys)), 0),
                min(math.ceil(max(xs)), image_size), min(math.ceil(max(ys)), image_size)]
        objects.append({"id": i, "shape": obj.shape, "colour": obj.colour, "size": obj.size, "bbox": bbox,
                        "grid": list(divmod(obj.cell, 3)), "position": ph.POSITIONS[obj.cell][0], "label": obj.label})
        for j, other in enumerate(scene.objects):
            (ra, ca), (rb, cb) = divmod(obj.cell, 3), divmod(other.cell, 3)
            adjacent = i < j and abs(ra - rb) + abs(ca - cb) == 1  # next_to once per pair, cells sharing an edge
            for predicate, holds in (("left_of", ca < cb), ("above", ra < rb), ("next_to", adjacent)):
                if holds:
                    relations.append({"subject": i, "predicate": predicate, "object": j})
    return {"id": scene.name, "image": scene.image, "split": split, "width": image_size, "height": image_size,
            "background": {"tone": scene.tone, "texture": scene.texture}, "objects": objects, "relations": relations}


def applicable_kinds(scene: Scene) -> list[str]:
    """The question kinds a scene supports (label only when an object carries one)."""
    return [k for k in KINDS if k != "label" or any(obj.label for obj in scene.objects)]


def make_question(kind: str, scene: Scene, rng: random.Random) -> Question:
    """A question of `kind` about a random object; yes/no is "no" half the time, then half of those name a
    present colour on another object's shape (a binding distractor)."""
    if kind == "count":
        return Question(kind, None)
    obj = rng.choice([o for o in scene.objects if o.label] if kind == "label" else scene.objects)
    if kind != "yes_no" or rng.random() < 0.5:
        return Question(kind, obj, obj.colour, obj.shape)
    others = [o for o in scene.objects if o is not obj]
    if others and rng.random() < 0.5:
        return Question(kind, None, obj.colour, rng.choice(others).shape)
    present = {(o.colour, o.shape) for o in scene.objects}
    return Question(kind, None, *rng.choice([(c, s) for c in RGB for s in ph.SHAPES if (c, s) not in present]))
