"""Procedural blood/bone-marrow cell images: the data everything runs on when no real data is at hand.

`simulate(out)` writes a small dataset in the three source layouts configs/data/taxonomy.yaml
understands (PBC JPEGs, AML-Cytomorphology TIFFs, a lab's PNG folders), with the class imbalance of the
public datasets scaled down. Each image is a field of red blood cells on a pale background with one
centred white cell drawn from its type's morphology: cell and nucleus size, nucleus shape (round,
kidney, band, 2-5 lobes, bilobed), chromatin texture, nucleoli, cytoplasm colour, granules.

Colours are composed the way stains absorb light (Beer-Lambert): every layer adds optical density,
image = background * exp(-density), so overlaps darken naturally and a slide's stain intensity is
one multiplier. Every image draws from its own RNG seeded by (seed, source, type, index), so files
are byte-identical across runs and changing `scale` only adds or drops images at the end of a type.
"""
from __future__ import annotations

import io
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from hpcgan.data.workers import cores, ordered_map
from hpcgan.fsutil import atomic_dir
from hpcgan.jsonfile import write_json
from hpcgan.progress import Progress
from hpcgan.settings import MISSING, SettingsError, check_range

logger = logging.getLogger(__name__)

LAYOUTS = ("pbc", "aml", "lab")
SUMMARY = "simulation.json"  # beside the source folders; marks a directory as simulator output

# --------------------------------------------------------------------------------------------------
# What gets written: per source, (folder, file prefix, fine type, image count in the public dataset).
# PBC: Acevedo et al. 2020 (README of ../shared/data/pbc-sample); AML: Matek et al. 2019 as listed in
# Hazra et al. 2022, Table 1. The lab set is private in the paper: these counts only mimic its shape
# (many neutrophils and lymphocytes, a handful of smudge cells and monoblasts). Lab folder names are
# deliberately spelled in varied ways so the taxonomy's forgiving matcher is exercised.
# --------------------------------------------------------------------------------------------------
CATALOG: dict[str, list[tuple[str, str, str, int]]] = {
    "pbc": [
        ("basophil", "BA", "basophil", 1218),
        ("eosinophil", "EO", "eosinophil", 3117),
        ("erythroblast", "ERB", "erythroblast", 1551),
        ("ig", "IG", "immature granulocyte", 151),
        ("ig", "MMY", "metamyelocyte", 1015),
        ("ig", "MY", "myelocyte", 1137),
        ("ig", "PMY", "promyelocyte", 592),
        ("lymphocyte", "LY", "lymphocyte", 1214),
        ("monocyte", "MO", "monocyte", 1420),
        ("neutrophil", "BNE", "neutrophil band", 1633),
        ("neutrophil", "SNE", "neutrophil segmented", 1646),
        ("neutrophil", "NEUTROPHIL", "neutrophil", 50),
        ("platelet", "PLATELET", "platelet", 2348),
    ],
    "aml": [
        ("NGS", "NGS", "neutrophil segmented", 8484),
        ("LYT", "LYT", "lymphocyte typical", 3937),
        ("MYO", "MYO", "myeloblast", 3268),
        ("MON", "MON", "monocyte", 1789),
        ("EOS", "EOS", "eosinophil", 424),
        ("NGB", "NGB", "neutrophil band", 109),
        ("BAS", "BAS", "basophil", 79),
        ("EBO", "EBO", "erythroblast", 78),
        ("PMO", "PMO", "promyelocyte", 70),
        ("MYB", "MYB", "myelocyte", 42),
        ("MOB", "MOB", "monoblast", 26),
        ("PMB", "PMB", "promyelocyte bilobed", 18),
        ("KSC", "KSC", "smudge cell", 15),
        ("MMZ", "MMZ", "metamyelocyte", 15),
        ("LYA", "LYA", "lymphocyte atypical", 11),
    ],
    "lab": [
        ("Neutrophils_Segmented", "", "neutrophil segmented", 1850),
        ("neutrophil band", "", "neutrophil band", 420),
        ("Lymphocyte Typical", "", "lymphocyte typical", 960),
        ("lymphocytes_atypical", "", "lymphocyte atypical", 70),
        ("Monocytes", "", "monocyte", 520),
        ("EOSINOPHIL", "", "eosinophil", 310),
        ("basophils", "", "basophil", 45),
        ("Erythroblasts", "", "erythroblast", 430),
        ("Immature_Granulocytes", "", "immature granulocyte", 160),
        ("myelocyte", "", "myelocyte", 120),
        ("Metamyelocytes", "", "metamyelocyte", 95),
        ("Promyelocyte", "", "promyelocyte", 85),
        ("promyelocyte-bilobed", "", "promyelocyte bilobed", 14),
        ("Myeloblasts", "", "myeloblast", 380),
        ("monoblast", "", "monoblast", 9),
        ("Platelets", "", "platelet", 210),
        ("Smudge cells", "", "smudge cell", 7),
    ],
}

# The public counts are compressed (count ** EXPONENT) so rare types still appear in a small demo
# set while the ordering, and a strong imbalance, survive. BASE_FACTOR makes scale=1 ~ 400 images.
EXPONENT = 0.6
BASE_FACTOR = 0.2


@dataclass(frozen=True)
class SourceLook:
    """How a source's microscope/camera/stain differs: frame, magnification, background, encoding."""

    size: tuple[int, int]          # (W, H)
    ext: str
    rbc_radius: float              # red cell radius in pixels: sets the magnification
    background: tuple[int, int, int]   # bright field; may exceed 255 where the camera saturates
    blur: float                    # optical blur sigma (px)
    noise: float                   # sensor noise (0-255 units)


LOOKS = {
    "pbc": SourceLook((360, 363), "jpg", 34.0, (266, 240, 210), 0.8, 1.6),
    "aml": SourceLook((400, 400), "tiff", 44.0, (236, 232, 222), 1.0, 1.2),
    "lab": SourceLook((320, 320), "png", 30.0, (240, 226, 228), 0.7, 2.0),
}
SLIDES_PER_SOURCE = 8


def _od(rgb: tuple[int, int, int], ref: tuple[int, int, int] = (244, 230, 208)) -> np.ndarray:
    """Optical density that turns the reference background into `rgb` (Beer-Lambert)."""
    return np.log(np.asarray(ref, np.float64) / np.maximum(np.asarray(rgb, np.float64), 1.0)).clip(0.0)


# Stain colours as optical densities; 'basic' dyes (blue/purple) and 'acidic' (pink/orange) vary
# separately from slide to slide, as they do in real May-Gruenwald-Giemsa staining.
PALETTE: dict[str, tuple[np.ndarray, str]] = {
    "rbc": (_od((216, 190, 182)), "acidic"),
    "nucleus": (_od((68, 26, 126)), "basic"),
    "nucleus_light": (_od((112, 70, 158)), "basic"),
    "cyto_blue": (_od((150, 154, 210)), "basic"),
    "cyto_greyblue": (_od((190, 182, 208)), "basic"),
    "cyto_pink": (_od((226, 196, 204)), "acidic"),
    "cyto_lilac": (_od((212, 188, 212)), "basic"),
    "gran_eos": (_od((230, 140, 116)), "acidic"),
    "gran_baso": (_od((58, 34, 104)), "basic"),
    "gran_azur": (_od((150, 52, 112)), "basic"),
    "gran_fine": (_od((196, 156, 196)), "basic"),
    "platelet": (_od((150, 96, 176)), "basic"),
    "platelet_halo": (_od((214, 196, 224)), "basic"),
    "smudge": (_od((140, 104, 170)), "basic"),
}


@dataclass(frozen=True)
class Morph:
    """A cell type's look. Ranges are (low, high) drawn uniformly per image."""

    cell_r: tuple[float, float]             # cell radius / red-cell radius
    nucleus: str                            # round | kidney | band | segmented | bilobed | lobed
    nuc_r: tuple[float, float]              # nucleus radius / cell radius
    nuc_offset: tuple[float, float] = (0.0, 0.1)  # eccentricity, fraction of cell radius
    nuc_density: tuple[float, float] = (0.9, 1.1)
    nuc_colour: str = "nucleus"
    chromatin: tuple[float, float] = (4.0, 0.3)   # texture scale (px at 360 frame), contrast
    nucleoli: tuple[int, int] = (0, 0)
    lobes: tuple[int, int] = (1, 1)
    cyto: str = "cyto_pink"
    cyto_density: tuple[float, float] = (0.8, 1.1)
    cyto_rim: float = 0.0                   # darker periphery (basophilic rim)
    granules: str | None = None             # palette key
    granule_count: tuple[int, int] = (0, 0)
    granule_size: float = 1.0               # sigma in px at 360 frame
    granule_density: float = 1.0
    granules_over_nucleus: float = 0.0      # fraction of granules allowed on the nucleus
    vacuoles: tuple[int, int] = (0, 0)
    golgi: bool = False                     # pale perinuclear zone
    outline: float = 0.05                   # irregularity of the cell outline


MORPHS: dict[str, Morph] = {
    "neutrophil segmented": Morph(
        cell_r=(1.8, 2.05), nucleus="segmented", nuc_r=(0.62, 0.72), lobes=(2, 5),
        chromatin=(4.0, 0.3), cyto="cyto_pink", cyto_density=(1.0, 1.4), granules="gran_fine", granule_count=(250, 400),
        granule_size=0.8, granule_density=0.6),
    "neutrophil band": Morph(
        cell_r=(1.8, 2.05), nucleus="band", nuc_r=(0.6, 0.7), chromatin=(4.0, 0.3), cyto="cyto_pink",
        cyto_density=(1.0, 1.4),
        granules="gran_fine", granule_count=(250, 400), granule_size=0.8, granule_density=0.6),
    "eosinophil": Morph(
        cell_r=(1.85, 2.2), nucleus="bilobed", nuc_r=(0.62, 0.72), lobes=(2, 3),
        nuc_density=(0.8, 1.0), chromatin=(4.0, 0.25), cyto="cyto_pink", cyto_density=(0.6, 0.9),
        granules="gran_eos", granule_count=(160, 240), granule_size=2.1, granule_density=1.2,
        granules_over_nucleus=0.08),
    "basophil": Morph(
        cell_r=(1.6, 1.9), nucleus="lobed", nuc_r=(0.6, 0.72), nuc_colour="nucleus_light",
        nuc_density=(0.8, 1.0), chromatin=(5.0, 0.2), cyto="cyto_lilac", cyto_density=(1.2, 1.6),
        granules="gran_baso", granule_count=(150, 260), granule_size=1.6, granule_density=0.9,
        granules_over_nucleus=0.8),
    "lymphocyte typical": Morph(
        cell_r=(1.25, 1.6), nucleus="round", nuc_r=(0.8, 0.9), nuc_offset=(0.0, 0.12),
        nuc_density=(1.0, 1.2), chromatin=(5.0, 0.35), cyto="cyto_blue", cyto_density=(0.6, 0.9),
        cyto_rim=0.8),
    "lymphocyte atypical": Morph(
        cell_r=(1.7, 2.3), nucleus="kidney", nuc_r=(0.6, 0.72), nuc_offset=(0.05, 0.2),
        nuc_density=(0.85, 1.0), chromatin=(4.0, 0.25), nucleoli=(0, 1), cyto="cyto_blue",
        cyto_density=(0.7, 1.0), cyto_rim=1.6, outline=0.12),
    "monocyte": Morph(
        cell_r=(2.1, 2.6), nucleus="kidney", nuc_r=(0.62, 0.75), nuc_offset=(0.05, 0.2),
        nuc_colour="nucleus_light", nuc_density=(0.85, 1.05), chromatin=(3.0, 0.35),
        cyto="cyto_greyblue", cyto_density=(0.8, 1.1), granules="gran_fine", granule_count=(60, 140),
        granule_size=0.8, granule_density=0.5, vacuoles=(0, 6), outline=0.16),
    "erythroblast": Morph(
        cell_r=(1.1, 1.5), nucleus="round", nuc_r=(0.5, 0.72), nuc_offset=(0.05, 0.25),
        nuc_density=(1.3, 1.6), chromatin=(3.0, 0.15), cyto="cyto_greyblue", cyto_density=(0.9, 1.3)),
    "myeloblast": Morph(
        cell_r=(1.8, 2.25), nucleus="round", nuc_r=(0.78, 0.88), nuc_offset=(0.0, 0.1),
        nuc_colour="nucleus_light", nuc_density=(0.85, 1.0), chromatin=(1.6, 0.12), nucleoli=(2, 4),
        cyto="cyto_blue", cyto_density=(0.9, 1.2), cyto_rim=0.6),
    "monoblast": Morph(
        cell_r=(2.2, 2.7), nucleus="round", nuc_r=(0.62, 0.74), nuc_offset=(0.05, 0.2),
        nuc_colour="nucleus_light", nuc_density=(0.75, 0.9), chromatin=(2.0, 0.15), nucleoli=(1, 2),
        cyto="cyto_greyblue", cyto_density=(1.0, 1.3), cyto_rim=0.4),
    "promyelocyte": Morph(
        cell_r=(2.1, 2.6), nucleus="round", nuc_r=(0.55, 0.68), nuc_offset=(0.15, 0.3),
        nuc_colour="nucleus_light", nuc_density=(0.85, 1.0), chromatin=(2.2, 0.18), nucleoli=(0, 2),
        cyto="cyto_blue", cyto_density=(0.65, 0.9), granules="gran_azur", granule_count=(120, 200),
        granule_size=1.1, granule_density=1.1, granules_over_nucleus=0.12, golgi=True),
    "promyelocyte bilobed": Morph(
        cell_r=(2.1, 2.6), nucleus="bilobed", nuc_r=(0.58, 0.7), lobes=(2, 2), nuc_offset=(0.0, 0.15),
        nuc_colour="nucleus_light", nuc_density=(0.85, 1.0), chromatin=(2.2, 0.18), cyto="cyto_blue",
        cyto_density=(0.65, 0.9), granules="gran_azur", granule_count=(120, 200), granule_size=1.1,
        granule_density=1.1, granules_over_nucleus=0.12),
    "myelocyte": Morph(
        cell_r=(1.9, 2.25), nucleus="round", nuc_r=(0.55, 0.65), nuc_offset=(0.15, 0.3),
        nuc_density=(0.95, 1.1), chromatin=(3.5, 0.3), cyto="cyto_lilac", cyto_density=(1.0, 1.3),
        granules="gran_fine", granule_count=(250, 400), granule_size=0.9, granule_density=0.8),
    "metamyelocyte": Morph(
        cell_r=(1.8, 2.15), nucleus="kidney", nuc_r=(0.58, 0.68), nuc_offset=(0.05, 0.2),
        nuc_density=(0.95, 1.1), chromatin=(4.0, 0.3), cyto="cyto_pink", cyto_density=(0.9, 1.2),
        granules="gran_fine", granule_count=(250, 400), granule_size=0.9, granule_density=0.7),
}
# Types a source names only coarsely draw each image from one of the finer looks.
MIXTURES: dict[str, tuple[tuple[str, float], ...]] = {
    "neutrophil": (("neutrophil segmented", 0.6), ("neutrophil band", 0.4)),
    "lymphocyte": (("lymphocyte typical", 0.88), ("lymphocyte atypical", 0.12)),
    "immature granulocyte": (("myelocyte", 0.45), ("metamyelocyte", 0.4), ("promyelocyte", 0.15)),
}
SPECIAL = ("platelet", "smudge cell")
FINE_TYPES = tuple(MORPHS) + tuple(MIXTURES) + SPECIAL


# --------------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------------
def type_count(public_count: int, scale: float) -> int:
    """Images of one (source, type) at `scale`: compressed public count, at least one."""
    return max(1, int(round(scale * BASE_FACTOR * public_count ** EXPONENT)))


def plan(scale: float = 1.0, layouts=LAYOUTS) -> dict[str, list[tuple[str, str, str, int]]]:
    """(folder, prefix, fine, n) per source, without drawing anything."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0 (got {scale}); 1.0 gives ~400 images, 0.1 a few dozen")
    unknown = [s for s in layouts if s not in CATALOG]
    if unknown:
        raise ValueError(f"unknown layout(s) {unknown}; choose from {list(LAYOUTS)}")
    return {s: [(f, p, t, type_count(c, scale)) for f, p, t, c in CATALOG[s]] for s in layouts}


# --------------------------------------------------------------------------------------------------
# Randomness
# --------------------------------------------------------------------------------------------------
def _key(text: str) -> int:
    return zlib.crc32(text.encode())


def image_rng(seed: int, source: str, fine: str, index: int) -> np.random.Generator:
    """The one RNG an image draws from: a function of (seed, source, type, index) only."""
    return np.random.default_rng([seed, _key(source), _key(fine), index])


@dataclass(frozen=True)
class Slide:
    """Per-slide stain: intensity of basic/acidic dyes, their hue, the background tint."""

    basic: np.ndarray    # per-channel multipliers of basic-dye density
    acidic: np.ndarray
    background: np.ndarray


def slide_for(seed: int, source: str, number: int) -> Slide:
    rng = np.random.default_rng([seed, _key(source), _key("slide"), number])
    look = LOOKS[source]
    basic = rng.uniform(0.8, 1.2) * rng.uniform(0.92, 1.08, 3)
    acidic = rng.uniform(0.75, 1.25) * rng.uniform(0.9, 1.1, 3)
    background = np.clip(np.asarray(look.background) + rng.normal(0, 4, 3), 200, 275)  # >255: camera saturates
    return Slide(basic, acidic, background)


# --------------------------------------------------------------------------------------------------
# Geometry helpers (vectorised over the pixel grid)
# --------------------------------------------------------------------------------------------------
def _soft(signed: np.ndarray, width: float = 1.2) -> np.ndarray:
    """Inside-ness from a signed distance (positive inside): anti-aliased edge `width` px wide."""
    return np.clip(signed / width + 0.5, 0.0, 1.0)


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale: float, octaves: int = 3) -> np.ndarray:
    """Smooth fractal noise, zero mean, unit-ish std; `scale` is the feature size in px."""
    h, w = shape
    out = np.zeros(shape, np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        s = max(scale / (2 ** o), 0.75)
        gh, gw = int(np.ceil(h / s)) + 2, int(np.ceil(w / s)) + 2
        grid = rng.standard_normal((gh, gw)).astype(np.float32)
        up = np.asarray(Image.fromarray(grid, mode="F").resize((int(gw * s), int(gh * s)), Image.BICUBIC))
        out += amp * up[:h, :w]
        total += amp * amp
        amp *= 0.5
    return (out / np.sqrt(total)).astype(np.float32)


def _wobble(rng: np.random.Generator, theta: np.ndarray, amp: float) -> np.ndarray:
    """1 + a few random low harmonics of the polar angle: irregular outlines."""
    r = np.ones_like(theta)
    for k in (2, 3, 4, 5):
        a, phase = rng.normal(0, amp / k), rng.uniform(0, 2 * np.pi)
        r += np.float32(a) * np.cos(k * theta + np.float32(phase))
    return r


def _segment_distance(u, v, p, q):
    dx, dy = q[0] - p[0], q[1] - p[1]
    t = np.clip(((u - p[0]) * dx + (v - p[1]) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
    return np.hypot(u - p[0] - t * dx, v - p[1] - t * dy)


def _arc_distance(u, v, radius, start, span):
    """Distance to the arc of `radius` from angle `start` over `span` (radians, counter-clockwise)."""
    rel = (np.arctan2(v, u) - start) % (2 * np.pi)
    on_arc = np.abs(np.hypot(u, v) - radius)
    p0 = (radius * np.cos(start), radius * np.sin(start))
    p1 = (radius * np.cos(start + span), radius * np.sin(start + span))
    ends = np.minimum(np.hypot(u - p0[0], v - p0[1]), np.hypot(u - p1[0], v - p1[1]))
    return np.where(rel <= span, on_arc, ends)


def _ellipse_signed(u, v, cx, cy, a, b, angle=0.0):
    """Approximate signed distance (px, positive inside) to an ellipse."""
    c, s = np.cos(angle), np.sin(angle)
    x, y = (u - cx) * c + (v - cy) * s, -(u - cx) * s + (v - cy) * c
    rho = np.hypot(x / a, y / b)
    return (1.0 - rho) * min(a, b)


# --------------------------------------------------------------------------------------------------
# Nucleus shapes: soft masks on local (u, v) coordinates, nucleus "radius" rn in px
# --------------------------------------------------------------------------------------------------
def _nucleus_mask(kind: str, u, v, rn: float, lobes: int, rng: np.random.Generator) -> np.ndarray:
    theta = np.arctan2(v, u)
    if kind == "round":
        signed = rn * _wobble(rng, theta, 0.05) - np.hypot(u, v * rng.uniform(1.0, 1.15))
        return _soft(signed)
    if kind == "kidney":
        body = rn * _wobble(rng, theta, 0.06) - np.hypot(u, v * rng.uniform(1.0, 1.2))
        dent_r = rn * rng.uniform(0.45, 0.7)
        dent = dent_r - np.hypot(u - rn * rng.uniform(0.85, 1.15), v)
        return _soft(np.minimum(body, -dent))
    if kind == "band":
        arc_r = rn * rng.uniform(0.6, 0.75)
        span = rng.uniform(1.1, 1.6) * np.pi
        width = rn * rng.uniform(0.28, 0.38) * (1 + 0.12 * np.cos(3 * theta + rng.uniform(0, 6)))
        return _soft(width - _arc_distance(u, v, arc_r, np.pi / 2 - span / 2 + np.pi, span))
    if kind in ("segmented", "bilobed", "lobed"):
        if kind == "segmented":
            arc_r, span = rn * rng.uniform(0.62, 0.78), min(rng.uniform(0.3, 0.42) * lobes, 1.7) * np.pi
            lobe_r = rn * rng.uniform(0.38, 0.46) * (1.0 if lobes <= 3 else 0.88)
            strand = rng.uniform(1.0, 1.8)
        elif kind == "bilobed":
            arc_r, span = rn * rng.uniform(0.5, 0.62), rng.uniform(0.55, 0.85) * np.pi
            lobe_r = rn * rng.uniform(0.42, 0.52)
            strand = rng.uniform(1.5, 2.8)
        else:  # lobed: basophil, lobes packed and overlapping
            arc_r, span = rn * rng.uniform(0.3, 0.45), rng.uniform(0.6, 1.2) * np.pi
            lobe_r = rn * rng.uniform(0.5, 0.62)
            strand = rn * 0.3
        start = np.pi / 2 - span / 2 + np.pi
        angles = start + np.linspace(0, span, lobes) + rng.normal(0, 0.08, lobes)
        centres = [(arc_r * np.cos(a), arc_r * np.sin(a)) for a in angles]
        signed = np.full(u.shape, -1e3, np.float32)
        for (cx, cy), a in zip(centres, angles):
            elong = rng.uniform(1.0, 1.35)
            s = _ellipse_signed(u, v, cx, cy, lobe_r * elong, lobe_r * rng.uniform(0.85, 1.0), a + np.pi / 2)
            signed = np.maximum(signed, s)
        for p, q in zip(centres[:-1], centres[1:]):
            signed = np.maximum(signed, strand - _segment_distance(u, v, p, q))
        return _soft(signed)
    raise ValueError(f"unknown nucleus shape {kind!r}")


# --------------------------------------------------------------------------------------------------
# Layers: each returns optical density [h, w, 3] to add
# --------------------------------------------------------------------------------------------------
class _Canvas:
    def __init__(self, look: SourceLook, slide: Slide, rng: np.random.Generator):
        self.w, self.h = look.size
        self.look, self.slide, self.rng = look, slide, rng
        self.px = look.size[0] / 360.0  # sizes in the Morph table are for a 360-px frame
        yy, xx = np.mgrid[0:self.h, 0:self.w].astype(np.float32)
        self.yy, self.xx = yy, xx
        self.od = np.zeros((self.h, self.w, 3), np.float32)

    def colour(self, key: str) -> np.ndarray:
        od, dye = PALETTE[key]
        mult = self.slide.basic if dye == "basic" else self.slide.acidic
        return (od * mult * self.rng.uniform(0.95, 1.05, 3)).astype(np.float32)

    def add(self, density: np.ndarray, key: str, box=None) -> None:
        col = self.colour(key)
        if box is None:
            self.od += density[..., None] * col
        else:
            y0, y1, x0, x1 = box
            self.od[y0:y1, x0:x1] += density[..., None] * col

    def box(self, cx: float, cy: float, r: float):
        y0, y1 = max(int(cy - r) - 2, 0), min(int(cy + r) + 3, self.h)
        x0, x1 = max(int(cx - r) - 2, 0), min(int(cx + r) + 3, self.w)
        return y0, y1, x0, x1

    def local(self, cx, cy, angle, box):
        """Rotated coordinates relative to (cx, cy) on the pixels of `box`."""
        y0, y1, x0, x1 = box
        dx, dy = self.xx[y0:y1, x0:x1] - cx, self.yy[y0:y1, x0:x1] - cy
        c, s = np.cos(angle), np.sin(angle)
        return dx * c + dy * s, -dx * s + dy * c

    def render(self) -> np.ndarray:
        look, rng = self.look, self.rng
        od = ndimage.gaussian_filter(self.od, sigma=(look.blur, look.blur, 0))
        yy, xx = self.yy[:, :1] / self.h - 0.5, self.xx[:1, :] / self.w - 0.5
        # Uneven illumination: a vignette and a gentle gradient in a random direction.
        a = rng.uniform(0, 2 * np.pi)
        vignette = (1.0 - np.float32(rng.uniform(0.03, 0.08) * 4) * (xx ** 2 + yy ** 2)
                    + np.float32(rng.uniform(0, 0.06)) * (np.float32(np.cos(a)) * xx + np.float32(np.sin(a)) * yy))
        img = np.exp(-od)
        img *= vignette[..., None]
        img *= self.slide.background.astype(np.float32)
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(look.noise) + np.float32(0.5)
        return np.clip(img, 0, 255).astype(np.uint8)


def _draw_red_cells(cv: _Canvas, keep_out: float, cx: float, cy: float) -> None:
    """A single layer of red cells: pale discs with a lighter centre, touching and sometimes overlapping."""
    rng = cv.rng
    r0 = cv.look.rbc_radius
    density = rng.uniform(0.4, 0.95)  # how crowded this field is
    cand = rng.uniform([-r0, -r0], [cv.w + r0, cv.h + r0], size=(int(6 * cv.w * cv.h / (r0 * r0)), 2))
    # Smears are uneven: red cells crowd in some parts of the field and thin out in others.
    clump = _noise(rng, (8, 8), 3.0, 1)
    keep = rng.random(len(cand)) < np.clip(0.6 + 0.6 * clump[
        np.clip((cand[:, 1] + r0) / (cv.h + 2 * r0) * 8, 0, 7).astype(int),
        np.clip((cand[:, 0] + r0) / (cv.w + 2 * r0) * 8, 0, 7).astype(int)], 0.05, 1.0)
    cand = cand[keep]
    placed: list[np.ndarray] = []
    min_gap = r0 * rng.uniform(1.45, 1.8)
    target = int(density * cv.w * cv.h / (np.pi * r0 * r0) * 1.1)
    for p in cand:
        if len(placed) >= target:
            break
        if np.hypot(p[0] - cx, p[1] - cy) < keep_out + r0 * rng.uniform(0.3, 1.0):
            continue
        if placed and np.min(np.hypot(*(np.asarray(placed) - p).T)) < min_gap:
            continue
        placed.append(p)
    for x, y in placed:
        r = r0 * rng.uniform(0.88, 1.12)
        box = cv.box(x, y, r * 1.2)
        if box[0] >= box[1] or box[2] >= box[3]:
            continue
        u, v = cv.local(x, y, rng.uniform(0, np.pi), box)
        d = np.hypot(u, v * rng.uniform(1.0, 1.12))
        edge = _soft(r * _wobble(rng, np.arctan2(v, u), 0.03) - d, 1.5)
        pallor = rng.uniform(0.45, 0.75) * np.exp(-(d / (r * rng.uniform(0.4, 0.55))) ** 2)
        rim = 0.3 * np.exp(-((d - 0.82 * r) / (0.13 * r)) ** 2)
        cv.add(edge * (1.0 - pallor + rim) * rng.uniform(0.85, 1.15), "rbc", box)


def _draw_granules(cv, key, count, sigma, strength, allowed, box, rng):
    """Scatter `count` granules over `allowed` (a [0,1] mask on `box`), drawn as blurred impulses."""
    y0, y1, x0, x1 = box
    h, w = y1 - y0, x1 - x0
    ys, xs = rng.integers(0, h, count * 4), rng.integers(0, w, count * 4)
    ok = rng.random(count * 4) < allowed[ys, xs]
    ys, xs = ys[ok][:count], xs[ok][:count]
    imp = np.zeros((h, w), np.float32)
    np.add.at(imp, (ys, xs), rng.uniform(0.7, 1.3, len(ys)).astype(np.float32))
    blob = ndimage.gaussian_filter(imp, sigma) * (2 * np.pi * sigma * sigma)
    cv.add((1.0 - np.exp(-1.3 * blob)) * strength * np.clip(allowed * 1.5, 0, 1), key, box)


def _draw_white_cell(cv: _Canvas, m: Morph, cx: float, cy: float, r_cell: float) -> None:
    rng = cv.rng
    angle = rng.uniform(0, 2 * np.pi)
    box = cv.box(cx, cy, r_cell * 1.15)
    u, v = cv.local(cx, cy, angle, box)
    shape = (box[1] - box[0], box[3] - box[2])
    theta, dist = np.arctan2(v, u), np.hypot(u, v)

    # Cytoplasm: the cell body, a slightly irregular disc.
    body_signed = r_cell * _wobble(rng, theta, m.outline) - np.hypot(u, v * rng.uniform(1.0, 1.1))
    body = _soft(body_signed, 1.5)
    cyto = body * rng.uniform(*m.cyto_density) * (1 + 0.1 * _noise(rng, shape, 6 * cv.px, 2))
    if m.cyto_rim:
        cyto *= 1 + m.cyto_rim * np.clip(dist / r_cell, 0, 1) ** 4

    # Nucleus, eccentric for some types; local coordinates of the nucleus centre.
    rn = r_cell * rng.uniform(*m.nuc_r)
    off = r_cell * rng.uniform(*m.nuc_offset)
    nu, nv = u - off, v
    lobes = int(rng.integers(m.lobes[0], m.lobes[1] + 1))
    if m.nucleus == "segmented":  # 3-4 lobes are most common in a segmented neutrophil
        lobes = int(rng.choice([2, 3, 3, 4, 4, 5]))
    nuc = _nucleus_mask(m.nucleus, nu, nv, rn, lobes, rng) * body

    if m.golgi:  # pale zone beside the nucleus (promyelocyte Golgi)
        g = np.exp(-(np.hypot(nu + rn * 0.9, nv) / (rn * 0.45)) ** 2)
        cyto *= 1 - 0.55 * g
    for _ in range(int(rng.integers(m.vacuoles[0], m.vacuoles[1] + 1))):
        a, rr = rng.uniform(0, 2 * np.pi), r_cell * rng.uniform(0.5, 0.85)
        vr = r_cell * rng.uniform(0.04, 0.09)
        cyto *= 1 - 0.8 * _soft(vr - np.hypot(u - rr * np.cos(a), v - rr * np.sin(a)), 1.0)
    cv.add(cyto * (1 - nuc), m.cyto, box)

    # Chromatin: density modulated by smooth noise; fine for blasts, coarse and clumped for mature cells.
    scale, contrast = m.chromatin
    tex = np.clip(1 + contrast * 1.8 * _noise(rng, shape, scale * cv.px), 0.35, 1.9)
    nuc_d = nuc * rng.uniform(*m.nuc_density) * tex
    for _ in range(int(rng.integers(m.nucleoli[0], m.nucleoli[1] + 1))):
        a, rr = rng.uniform(0, 2 * np.pi), rn * rng.uniform(0.0, 0.5)
        nr = rn * rng.uniform(0.1, 0.17)
        spot = _soft(nr - np.hypot(nu - rr * np.cos(a), nv - rr * np.sin(a)), 1.5)
        nuc_d *= 1 - 0.5 * spot
    cv.add(nuc_d, m.nuc_colour, box)

    if m.granules:
        count = int(rng.integers(m.granule_count[0], m.granule_count[1] + 1) * (r_cell / (1.4 * cv.look.rbc_radius)) ** 2)
        allowed = body * np.clip(1 - nuc * (1 - m.granules_over_nucleus) * 1.2, 0, 1)
        _draw_granules(cv, m.granules, count, m.granule_size * cv.px, m.granule_density, allowed, box, rng)


def _draw_platelets(cv: _Canvas, n: int, cx: float, cy: float, spread: float, size: float = 1.0) -> None:
    """Small purple fragments: a pale lilac halo around a granular purple centre."""
    rng = cv.rng
    for _ in range(n):
        a, rr = rng.uniform(0, 2 * np.pi), spread * np.sqrt(rng.random())
        x, y = cx + rr * np.cos(a), cy + rr * np.sin(a)
        r = cv.look.rbc_radius * rng.uniform(0.15, 0.3) * size
        box = cv.box(x, y, r * 1.4)
        u, v = cv.local(x, y, rng.uniform(0, np.pi), box)
        halo = _soft(r * _wobble(rng, np.arctan2(v, u), 0.2) - np.hypot(u, v * rng.uniform(1.0, 1.5)), 1.5)
        shape = halo.shape
        core = halo * np.clip(0.6 + 1.2 * _noise(rng, shape, 1.5 * cv.px, 2), 0, 1.6)
        core *= _soft(r * 0.75 - np.hypot(u, v), 2.0)
        cv.add(halo * rng.uniform(0.6, 1.0), "platelet_halo", box)
        cv.add(core * rng.uniform(0.7, 1.1), "platelet", box)


def _draw_smudge(cv: _Canvas, cx: float, cy: float) -> None:
    """Ragged, smeared nuclear material without cytoplasm: a denser head trailing off into streaks."""
    rng = cv.rng
    r = cv.look.rbc_radius * rng.uniform(1.3, 2.1)
    box = cv.box(cx, cy, r * 1.8)
    # Smeared along the image x axis (+-15 deg), the direction the slide was spread.
    angle = rng.normal(0, 0.25) + rng.choice([0.0, np.pi])
    u, v = cv.local(cx, cy, angle, box)
    h, w = u.shape
    stretch = rng.uniform(1.2, 1.8)
    d = np.hypot(u / stretch, v) / r * stretch
    ragged = 0.3 * _noise(rng, (h, w), 10 * cv.px, 3)
    mask = _soft((1.0 - d + ragged) * r * 0.4, 2.0)
    # Fibres: noise stretched along x, the smear direction.
    fib = _noise(rng, (h, max(w // 4, 2)), 2.5 * cv.px, 2)
    fib = np.asarray(Image.fromarray(fib, mode="F").resize((w, h), Image.BILINEAR))
    head = np.exp(-(np.hypot(u + 0.35 * r, v) / (0.55 * r)) ** 2)  # where the nucleus burst
    dens = mask * np.clip(0.8 + 0.3 * fib + 0.12 * _noise(rng, (h, w), 4 * cv.px, 2), 0.25, 1.5)
    dens *= rng.uniform(0.55, 0.85) * (0.45 + 0.8 * head)
    cv.add(dens, "smudge", box)


def render_cell(fine: str, rng: np.random.Generator, source: str = "pbc", slide: Slide | None = None) -> np.ndarray:
    """One image [H, W, 3] uint8 of cell type `fine` as `source` would show it."""
    if fine not in FINE_TYPES:
        raise ValueError(f"unknown cell type {fine!r}; known: {sorted(FINE_TYPES)}")
    if source not in LOOKS:
        raise ValueError(f"unknown source {source!r}; choose from {list(LOOKS)}")
    look = LOOKS[source]
    if slide is None:
        slide = slide_for(0, source, 0)
    if fine in MIXTURES:
        names, weights = zip(*MIXTURES[fine])
        fine = str(rng.choice(names, p=np.asarray(weights) / sum(weights)))
    cv = _Canvas(look, slide, rng)
    cx = cv.w / 2 + np.clip(rng.normal(0, 0.05 * cv.w), -0.1 * cv.w, 0.1 * cv.w)
    cy = cv.h / 2 + np.clip(rng.normal(0, 0.05 * cv.h), -0.1 * cv.h, 0.1 * cv.h)
    r0 = look.rbc_radius
    if fine == "platelet":
        keep_out = r0 * 0.6
    elif fine == "smudge cell":
        keep_out = r0 * 1.6
    else:
        m = MORPHS[fine]
        r_cell = r0 * rng.uniform(*m.cell_r)
        keep_out = r_cell
    _draw_red_cells(cv, keep_out, cx, cy)
    if fine == "platelet":
        _draw_platelets(cv, int(rng.choice([1, 1, 1, 2, 2, 3])), cx, cy, r0 * 0.6, size=2.0)
    elif fine == "smudge cell":
        _draw_smudge(cv, cx, cy)
    else:
        _draw_white_cell(cv, m, cx, cy, r_cell)
    if fine != "platelet" and rng.random() < 0.3:  # a stray platelet in the field, as in real smears
        a = rng.uniform(0, 2 * np.pi)
        _draw_platelets(cv, 1, cx + 0.42 * cv.w * np.cos(a), cy + 0.42 * cv.h * np.sin(a), 0.0)
    return cv.render()


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def encode(img: np.ndarray, ext: str) -> bytes:
    """Deterministic encodings: no timestamps or other run-dependent metadata."""
    buf = io.BytesIO()
    pil = Image.fromarray(img, "RGB")
    if ext == "jpg":
        pil.save(buf, format="JPEG", quality=92, subsampling=0)
    elif ext == "tiff":
        pil.save(buf, format="TIFF", compression="tiff_deflate")
    elif ext == "png":
        pil.save(buf, format="PNG", compress_level=1)  # sensor noise barely compresses; save time
    else:
        raise ValueError(f"unknown image format {ext!r}")
    return buf.getvalue()


def relative_path(source: str, folder: str, prefix: str, index: int) -> str:
    """PBC and AML name files <PREFIX>_<n> (the prefix carries the type); the lab numbers them."""
    ext = LOOKS[source].ext
    return f"{folder}/{prefix}_{index:04d}.{ext}" if prefix else f"{folder}/{index:04d}.{ext}"


def iter_images(seed: int = 0, scale: float = 1.0, layouts=LAYOUTS):
    """Yield (source, rel_path, fine, n-th image of that type) for every image `simulate` writes."""
    for source, entries in plan(scale, layouts).items():
        for folder, prefix, fine, n in entries:
            for i in range(n):
                yield source, relative_path(source, folder, prefix, i), fine, i


def make_image(seed: int, source: str, fine: str, index: int) -> np.ndarray:
    rng = image_rng(seed, source, fine, index)
    slide = slide_for(seed, source, int(rng.integers(SLIDES_PER_SOURCE)))
    return render_cell(fine, rng, source, slide)


@dataclass
class SimulateSettings:
    """What simulate() and tools/simulate.py take; these defaults are the ones (configs/simulate.yaml
    documents the same values)."""
    out: str = MISSING
    seed: int = 0
    scale: float = 1.0
    layouts: list[str] = field(default_factory=lambda: list(LAYOUTS))
    progress: bool = True
    workers: int | None = None    # processes drawing images; None: all cores. The files do not depend on it.

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise SettingsError(f"seed={self.seed!r}: must be a non-negative integer")
        check_range("seed", self.seed, 0)
        if self.workers is not None:
            check_range("workers", self.workers, 1)
        try:
            plan(self.scale, self.layouts)   # the scale and layout rules
        except ValueError as e:
            raise SettingsError(str(e)) from None


def _encoded_image(task: tuple[int, str, str, int]) -> bytes:
    seed, source, fine, index = task
    return encode(make_image(seed, source, fine, index), LOOKS[source].ext)


def simulate(out: str | Path, **options) -> dict:
    """Write a simulated dataset to out/{pbc,aml,lab}/... atomically and return its summary.

    options: the other SimulateSettings fields (seed, scale, layouts, progress, workers).
    The summary (also written to out/simulation.json) gives counts per source x fine type.
    An existing `out` is replaced only if it is empty or an earlier simulator output.
    """
    settings = SimulateSettings(out=str(out), **options)
    seed, scale, layouts, progress = settings.seed, settings.scale, tuple(settings.layouts), settings.progress
    jobs = list(iter_images(seed, scale, layouts))
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / SUMMARY).is_file())):
        raise ValueError(f"{out} exists and is not an earlier simulator output (no {SUMMARY}); "
                         "refusing to replace it: choose a new or empty directory")
    counts: dict[str, dict[str, int]] = {s: {} for s in layouts}
    with atomic_dir(out) as staging, ordered_map(settings.workers or cores()) as imap:
        tasks = [(seed, source, fine, index) for source, _, fine, index in jobs]
        images = imap(_encoded_image, tasks)
        bar = Progress(len(jobs), "simulate", "img", bar=progress)
        for (source, rel, fine, index), data in zip(jobs, images):
            path = staging / source / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)  # the whole directory appears atomically; no per-file rename needed
            counts[source][fine] = counts[source].get(fine, 0) + 1
            bar.update()
        bar.close()
        summary = {
            "generator": "hpcgan.data.simulate",
            "synthetic": True,
            "seed": seed,
            "scale": scale,
            "layouts": list(layouts),
            "total": len(jobs),
            "counts": counts,
        }
        write_json(staging / SUMMARY, summary)
    summary["out"] = str(out.resolve())
    logger.info("simulated %d images in %s: %s", len(jobs), summary["out"],
                {s: sum(c.values()) for s, c in counts.items()})
    return summary
