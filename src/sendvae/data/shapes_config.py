"""The shapes dataset's configuration: its palettes, `ShapesConfig`, the named scenes, the attribute specs.

Kept apart from the renderer and the dataset (`data.shapes`) so that a config, a scene or the attribute
list is read without drawing anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from .shapes_render import BACKGROUND_TYPES, DEFAULT_SHAPES, SHAPES

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 80, 225),
    "purple": (140, 60, 200),
    "pink": (240, 110, 180),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "dark_gray": (70, 70, 70),
    "gray": (128, 128, 128),
    "light_gray": (190, 190, 190),
    "white": (245, 245, 245),
    "navy": (25, 30, 75),
    "brown": (95, 65, 40),
    "beige": (225, 210, 175),
}
MARGIN = 0.02  # minimum gap between an object's farthest vertex and the image border (fraction of side)
OCCLUDED_THRESHOLD = 0.05  # `occluded` = the object in front hides at least this fraction of the main one


@dataclass
class ShapesConfig:
    """Procedural shapes dataset."""

    resolution: int = field(default=64, metadata={"help": "image side in pixels, 32 to 256"})
    seed: int = field(default=0, metadata={"help": "dataset seed; (seed, index) fixes an image"})
    length: int = field(default=1_000_000, metadata={"help": "number of indices (images are made on demand)"})
    shapes: tuple[str, ...] = field(
        default=DEFAULT_SHAPES, metadata={"help": f"shape classes, in label order, from {tuple(SHAPES)}"}
    )
    second_object_prob: float = field(default=0.5, metadata={"help": "probability of a second object"})
    front_prob: float = field(
        default=0.5, metadata={"help": "probability that the second object is in front of the main one"}
    )
    texture_prob: float = field(
        default=0.5, metadata={"help": "probability of a textured (not flat) background"}
    )
    size_range: tuple[float, float] = field(
        default=(0.22, 0.4), metadata={"help": "main object size: sqrt(area) / image side, uniform"}
    )
    second_size_range: tuple[float, float] = field(
        default=(0.12, 0.25), metadata={"help": "second object size: sqrt(area) / image side, uniform"}
    )
    colour_jitter: int = field(default=12, metadata={"help": "per-channel uniform fill jitter, +- levels"})
    supersample: int = field(
        default=8, metadata={"help": "sub-rows per pixel row for antialiasing (columns are exact)"}
    )

    def __post_init__(self) -> None:
        self.shapes = tuple(self.shapes)
        self.size_range = cast("tuple[float, float]", tuple(self.size_range))  # lists from JSON
        self.second_size_range = cast("tuple[float, float]", tuple(self.second_size_range))
        if not 32 <= self.resolution <= 256:
            raise ValueError(f"ShapesConfig.resolution must be in [32, 256], got {self.resolution}")
        if self.length < 1:
            raise ValueError(f"ShapesConfig.length must be >= 1, got {self.length}")
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown or len(set(self.shapes)) != len(self.shapes) or len(self.shapes) < 2:
            raise ValueError(
                f"ShapesConfig.shapes must be >= 2 distinct names from {tuple(SHAPES)}, got {self.shapes}"
            )
        for name in ("second_object_prob", "front_prob", "texture_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ShapesConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        reach = max(SHAPES[s].max_radius for s in self.shapes)
        for name in ("size_range", "second_size_range"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi or hi * reach + MARGIN >= 0.5:
                raise ValueError(
                    f"ShapesConfig.{name}={(lo, hi)} must satisfy 0 < lo <= hi and fit the frame: "
                    f"hi * {reach:.3f} (largest shape radius) + {MARGIN} < 0.5"
                )
        if not 0 <= self.colour_jitter <= 64:
            raise ValueError(f"ShapesConfig.colour_jitter must be in [0, 64], got {self.colour_jitter}")
        if not 1 <= self.supersample <= 16:
            raise ValueError(f"ShapesConfig.supersample must be in [1, 16], got {self.supersample}")


@dataclass(frozen=True)
class AttributeSpec:
    """One ground-truth attribute. Values of an attribute that does not apply (see `applies_if`) are
    -1 (categorical) or NaN (continuous)."""

    name: str
    kind: str  # "categorical" | "continuous" | "binary"
    classes: tuple[str, ...] = ()
    help: str = ""
    applies_if: str | None = None


def attribute_specs(config: ShapesConfig) -> tuple[AttributeSpec, ...]:
    """The attributes of every image, in table order; shape classes follow `config.shapes`."""
    cat, cont, binary = "categorical", "continuous", "binary"
    colours, second = tuple(COLOURS), "has_second"
    specs = [
        AttributeSpec("shape", cat, config.shapes, "main object's shape: the class label"),
        AttributeSpec("colour", cat, colours, "main object's palette colour"),
        *(
            AttributeSpec(f"fill_{c}", cont, help=f"main fill {c} level, 0-255 (palette + jitter)")
            for c in "rgb"
        ),
        AttributeSpec("size", cont, help="main object sqrt(area) / image side"),
        AttributeSpec("x", cont, help="main object area centroid, fraction of width from the left"),
        AttributeSpec("y", cont, help="main object area centroid, fraction of height from the top"),
        AttributeSpec("rotation", cont, help="main object rotation, degrees clockwise in [0, 360)"),
        AttributeSpec("background", cat, BACKGROUND_TYPES, "background type"),
        AttributeSpec("background_colour", cat, tuple(BACKGROUND_COLOURS), "background base colour"),
        AttributeSpec("background_angle", cont, (), "texture direction, degrees", "stripes/checker/gradient"),
        AttributeSpec("background_period", cont, (), "texture period / image side", "stripes/checker/noise"),
        AttributeSpec(second, binary, help="a second object is drawn"),
        AttributeSpec("second_shape", cat, config.shapes, "second object's shape", second),
        AttributeSpec("second_colour", cat, colours, "second object's colour (never the main's)", second),
        *(AttributeSpec(f"second_fill_{c}", cont, (), f"second fill {c} level", second) for c in "rgb"),
        AttributeSpec("second_size", cont, (), "second object sqrt(area) / image side", second),
        AttributeSpec("second_x", cont, (), "second object centroid x", second),
        AttributeSpec("second_y", cont, (), "second object centroid y", second),
        AttributeSpec("second_rotation", cont, (), "second object rotation, degrees", second),
        AttributeSpec("second_in_front", binary, help="the second object is in front of the main one"),
        AttributeSpec("occluded_fraction", cont, help="fraction of the main object's area hidden"),
        AttributeSpec("occluded", binary, help=f"occluded_fraction >= {OCCLUDED_THRESHOLD}"),
    ]
    return tuple(specs)


# Named scenes (``--data.shapes_scene``): ShapesConfig fields over the defaults. "simple" is one large object
# on a flat background: the scene the embedded demo generates within CPU minutes (no textures to model, and
# an object of 13-17 px at 32 px, large enough for an f4 latent to keep its shape).
SCENES: dict[str, dict[str, Any]] = {
    "full": {},
    "simple": {"texture_prob": 0.0, "second_object_prob": 0.0, "size_range": (0.4, 0.54)},
}


def scene_config(scene: str = "full", **fields) -> ShapesConfig:
    """ShapesConfig of a named scene (`SCENES`), with `fields` (resolution, seed, length, ...) on top."""
    if scene not in SCENES:
        raise ValueError(f"unknown shapes scene {scene!r}; choose from {', '.join(SCENES)}")
    return ShapesConfig(**{**SCENES[scene], **fields})


ATTRIBUTES = attribute_specs(ShapesConfig())
