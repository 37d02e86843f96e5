"""Turn one source file into one clean square RGB image, or say exactly why not.

decode_rgb      bytes -> RGB uint8 array (mode conversions where they are sound, `BadImage` where not)
macenko         Macenko et al. 2009 stain normalisation in numpy, standard H&E reference, white-balanced
centre_square   the centred square (or its centre); square_resize: that, resized antialiased
process_file    all of the above for one file (runs in worker processes), spooling the encoded image

Everything here is a pure function of the input bytes and the settings, computed without
multi-threaded BLAS reductions, so results do not depend on worker count or machine load.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The reference stain matrix (columns: haematoxylin, eosin optical-density directions) and the 99th
# percentile concentrations used by Macenko's reference code and its common numpy ports
# (e.g. schaugf/HEnorm_python, staintools' defaults).
HE_REF = np.array([[0.5626, 0.2159],
                   [0.7201, 0.8012],
                   [0.4062, 0.5581]])
MAX_C_REF = np.array([1.9705, 1.0308])
IO = 240.0          # transmitted light intensity of the normalised output's background
BG_PERCENTILE = 99  # per-channel background (illumination) estimate of an input: its brightest pixels
BG_FLOOR = 128.0    # ... never below this (an image with no background at all)
BETA = 0.15         # OD threshold below which a pixel is background
ALPHA = 1.0         # percentile for the robust extreme angles
MIN_STAIN_FRACTION = 0.01  # fewer stained pixels than this: estimation is degenerate
MIN_STAIN_PIXELS = 64
STAIN_WORK_SIDE = 256      # estimate and apply at this side (or smaller originals) before the final resize


class BadImage(ValueError):
    """The file cannot become a training image; the message is the reason."""


class DegenerateStain(ValueError):
    """Macenko's estimate is meaningless for this image (e.g. almost blank)."""


@dataclass(frozen=True)
class CleanSettings:
    """What one worker needs of the build's settings; made by BuildSettings.clean(), where the defaults live."""
    size: int
    stain: str                  # macenko | none
    encoding: str               # png | jpg
    quality: int
    min_size: int
    crop: float = 1.0           # the centred square's side kept before the resize (BuildSettings.crop)


# ---------------------------------------------------------------- decoding

def _scale16(a: np.ndarray) -> np.ndarray:
    """Full 16-bit range -> 8 bit, rounding (v * 255 / 65535)."""
    return np.floor(a.astype(np.float64) * (255.0 / 65535.0) + 0.5).astype(np.uint8)


def _on_white(img: Image.Image) -> Image.Image:
    """Composite an image with alpha over white: transparent means 'no stain', i.e. bright background."""
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str]:
    """Convert to RGB where the meaning is unambiguous; return (image, note on what was done)."""
    mode = img.mode
    if mode == "RGB":
        return img, ""
    if mode == "1":
        raise BadImage("1-bit black/white image (looks like a mask, not a stained cell)")
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        return _on_white(img), f"{mode} composited on white"
    if mode == "P":
        if "transparency" in img.info:
            return _on_white(img), "P (palette) with transparency composited on white"
        return img.convert("RGB"), "P (palette) -> RGB"
    if mode in ("L", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB"), f"{mode} -> RGB"
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img)
        if a.dtype.kind not in "iu" or a.min() < 0 or a.max() > 65535:
            raise BadImage(f"{mode} image with values outside 0..65535: no known intensity range")
        g = _scale16(a)
        return Image.fromarray(np.stack([g, g, g], axis=-1), "RGB"), f"{mode} (16-bit gray) scaled to 8 bit"
    raise BadImage(f"unsupported image mode {mode!r} (e.g. floating point): no sound conversion to RGB")


def decode_rgb(data: bytes, min_size: int = 32) -> tuple[np.ndarray, tuple[int, int], str]:
    """Decode file bytes to an RGB uint8 array; return (array, (w, h) of the original, conversion note)."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            n_frames = getattr(img, "n_frames", 1)
            if img.format == "MPO":   # camera JPEG + embedded previews/depth: frame 0 is the picture
                n_frames = 1
            if n_frames > 1:
                raise BadImage(f"{n_frames} frames/pages ({img.format}): ambiguous which one is the cell")
            img.load()  # raises on truncated/corrupt data (LOAD_TRUNCATED_IMAGES stays False)
            img = ImageOps.exif_transpose(img)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image PIL can read (corrupt bytes or another file type with an image name)")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImage(f"too large to decode safely: {e}")
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"corrupt or truncated image data: {e}")
    w, h = img.size
    if min(w, h) < min_size:
        raise BadImage(f"too small: {w}x{h} px, smaller side < min_size={min_size}")
    rgb, note = _to_rgb(img)
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise BadImage(f"decoded to unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr), (w, h), note


# ---------------------------------------------------------------- geometry

def centre_square(img: Image.Image, crop: float = 1.0) -> Image.Image:
    """The centred largest square of `img`, or its central `crop` fraction of the side (a zoom on the centred
    cell)."""
    w, h = img.size
    s = max(1, round(min(w, h) * crop))
    if s == w == h:   # already that square (clean_image's second call): no copy
        return img
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def square_resize(img: Image.Image, side: int, crop: float = 1.0) -> Image.Image:
    """centre_square, then resize antialiased (Lanczos) to side x side."""
    img = centre_square(img, crop)
    if img.size[0] != side:
        img = img.resize((side, side), Image.Resampling.LANCZOS)
    return img


# ---------------------------------------------------------------- stain normalisation

def _unit_sign(v: np.ndarray) -> np.ndarray:
    """Eigenvectors have arbitrary sign; fix it so results do not depend on the LAPACK build."""
    return v if v.sum() >= 0 else -v


def macenko(rgb: np.ndarray) -> np.ndarray:
    """Macenko stain normalisation of an RGB uint8 image to the standard H&E reference, with the optical
    density taken against the image's own background (white balance) rather than a fixed white point.

    Raises DegenerateStain when the image has too few stained pixels or the estimate is not finite.
    Romanowsky-stained smears are not H&E; the reference is used as the field's common convention
    for bringing all sources to one colour appearance.
    """
    h, w, _ = rgb.shape
    flat = rgb.reshape(-1, 3).astype(np.float64)
    # Optical density relative to this image's own background, per channel. A fixed white point (IO) reads
    # a tinted illumination (PBC's CellaVision smears: about (255, 230, 204)) as stain, and the concentration
    # rescaling below then paints whole backgrounds pink or violet, differently for every image.
    io_in = np.maximum(np.percentile(flat, BG_PERCENTILE, axis=0), BG_FLOOR) + 1.0
    od = -np.log(np.minimum(flat + 1.0, io_in) / io_in)
    tissue = od[~np.any(od < BETA, axis=1)]
    if len(tissue) < max(MIN_STAIN_PIXELS, MIN_STAIN_FRACTION * len(od)):
        raise DegenerateStain(f"only {len(tissue)} of {len(od)} pixels stained (OD >= {BETA} in all channels)")
    centred = tissue - tissue.mean(axis=0)
    cov = np.einsum("ni,nj->ij", centred, centred) / max(len(tissue) - 1, 1)  # einsum: no threaded BLAS
    _, vecs = np.linalg.eigh(cov)
    plane = np.stack([_unit_sign(vecs[:, 2]), _unit_sign(vecs[:, 1])], axis=1)  # two largest
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, ALPHA), np.percentile(phi, 100 - ALPHA)
    v_min = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_max = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([v_min, v_max], axis=1) if v_min[0] > v_max[0] else np.stack([v_max, v_min], axis=1)
    if not np.all(np.isfinite(he)) or abs(np.linalg.det(he.T @ he)) < 1e-8:
        raise DegenerateStain("stain vectors are not separable (one colour only?)")
    conc = np.linalg.pinv(he) @ od.T                      # 2 x N, K=3 products: deterministic
    max_c = np.array([np.percentile(conc[0], 99), np.percentile(conc[1], 99)])
    if not np.all(np.isfinite(max_c)) or np.any(max_c <= 1e-6):
        raise DegenerateStain(f"99th-percentile stain concentration not positive ({max_c.round(4).tolist()})")
    conc *= (MAX_C_REF / max_c)[:, None]
    out = IO * np.exp(-(HE_REF @ conc))
    out = np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
    return out.T.reshape(h, w, 3)


# ---------------------------------------------------------------- one file, end to end

def encode(img: Image.Image, settings: CleanSettings) -> bytes:
    buf = io.BytesIO()
    if settings.encoding == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif settings.encoding == "jpg":
        img.save(buf, format="JPEG", quality=settings.quality, subsampling=0)
    else:
        raise ValueError(f"encoding {settings.encoding!r} not in ('png', 'jpg')")
    return buf.getvalue()


def pixel_sha256(rgb: np.ndarray) -> str:
    h = hashlib.sha256(np.asarray(rgb.shape, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


def clean_image(data: bytes, settings: CleanSettings) -> dict:
    """Bytes -> {'image': encoded bytes, 'orig_size', 'phash', 'pixel_sha256', 'stain', 'note'}."""
    rgb, orig_size, note = decode_rgb(data, settings.min_size)
    img = Image.fromarray(rgb, "RGB")
    phash = str(imagehash.phash(img))   # on the decoded original: re-encodes of one image stay close
    square = centre_square(img, settings.crop)
    square = square_resize(square, min(square.size[0], max(STAIN_WORK_SIDE, settings.size)))
    stain = "none"
    if settings.stain == "macenko":
        try:
            square = Image.fromarray(macenko(np.asarray(square)), "RGB")
            stain = "macenko"
        except DegenerateStain as e:
            note = "; ".join(filter(None, [note, f"macenko skipped, kept unnormalised: {e}"]))
    elif settings.stain != "none":
        raise ValueError(f"stain {settings.stain!r} not in ('macenko', 'none')")
    final = square_resize(square, settings.size)
    return {"image": encode(final, settings), "orig_size": list(orig_size), "phash": phash,
            "pixel_sha256": pixel_sha256(rgb), "stain": stain, "note": note}


def process_file(task: tuple[int, str, str, CleanSettings]) -> dict:
    """Worker entry: (index, abspath, spool_path, settings) -> result dict; never raises for a bad file.

    The encoded image goes to `spool_path` so the parent's memory stays bounded on big datasets.
    """
    index, abspath, spool_path, settings = task
    out = {"index": index, "ok": False}
    try:
        with open(abspath, "rb") as f:
            data = f.read()
    except OSError as e:
        out["reason"] = f"unreadable: {e.strerror or e}"
        return out
    out["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        res = clean_image(data, settings)
    except BadImage as e:
        out["reason"] = str(e)
        return out
    except MemoryError:
        out["reason"] = "out of memory while decoding (image too large?)"
        return out
    except Exception as e:  # a decoder bug on one odd file must not sink the whole dataset
        out["reason"] = f"unexpected error while decoding: {type(e).__name__}: {e}"
        return out
    image = res.pop("image")
    with open(spool_path, "wb") as f:
        f.write(image)
    out.update(res, ok=True)
    return out

