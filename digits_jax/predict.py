"""Read digits from ordinary images: MNIST-style preprocessing and batched prediction from a checkpoint.

MNIST's digits were size-normalised to fit a 20x20 box keeping their aspect ratio (antialiased), then
placed in a 28x28 field so that their centre of mass sits at its centre, as bright ink on black.
`preprocess` does the same to any photo or drawing, so the model sees what it was trained on.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from digits_jax import checkpoint, ensemble

SIZE = 28  # MNIST's field
BOX = 20  # MNIST's digits fit a BOX x BOX square inside it
CENTRE = 14.0  # MNIST's mean centre of mass, in pixel indices (0..27), on both axes
MIN_CONTRAST = 0.1  # ink must differ from the background by this fraction of full scale, or there is none
NOISE_FLOOR = 0.2  # ink fainter than this fraction of the strongest stroke is background noise (paper, JPEG)
# Ink that fills this much of a box wider than half its height may be a page whose surroundings were taken for
# the background (MNIST's digits fill at most 0.78 of such boxes): tried again with the most common level.
PAGE_FILL = 0.6
RECTANGLE = 0.97  # ... if, its holes filled, it is a rectangle too (bold digits, holes filled: at most 0.94)
MAX_FILL = 0.85  # and a retry that still fills this much is a page, not a digit
MIN_INSIDE = 0.05  # then ink touching the image's edge is a frame or desk if this share of the ink is clear of it
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as PIL's convert("L")
MAX_BATCH = 1024  # images per model call: its activations take about 100 kB an image (5x with tta_shift)
# Larger images are reduced (by a whole factor, averaging) when decoded: `preprocess` works in float64 on every
# pixel, and a 4096 x 4096 RGBA image took 1 GB there. (A stroke much thinner than the factor fades with it.)
MAX_SIDE = 1024


class UnknownScaleError(ValueError):
    """Pixel values whose full scale `to_array` cannot tell."""


def load_image(path: str | Path) -> np.ndarray:
    """Decodes an image file (PNG, JPEG or anything Pillow reads), upright as its EXIF orientation says.

    Returns:
      what `to_array` makes of it.
    Raises:
      ValueError naming the file when it is missing or cannot be decoded.
    """
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now, so that a truncated file fails here
            return to_array(opened)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory; give the image files in it") from None
    except PermissionError:
        raise ValueError(f"{path}: permission denied; make the file readable (chmod) or copy it somewhere "
                         "readable") from None
    except UnidentifiedImageError:
        if Path(path).stat().st_size == 0:
            raise ValueError(f"{path}: the file is empty (0 bytes); save the image again") from None
        raise ValueError(f"{path}: not an image that Pillow can decode; give a PNG or JPEG file") from None
    except Image.DecompressionBombError as error:  # Pillow refuses such sizes: a decoded image would fill memory
        raise ValueError(f"{path}: too large to read ({error}); scale it down, e.g. to a few hundred pixels") from None
    except UnknownScaleError as error:
        raise ValueError(f"{path}: {error}") from None
    except Exception as error:  # OSError mostly, but damaged files also make Pillow raise TypeError, ValueError...
        raise ValueError(f"{path}: cannot decode it ({error}); it may be damaged or cut short: save it again as "
                         "PNG or JPEG") from error


def to_array(image: Image.Image) -> np.ndarray:
    """A decoded Pillow image, turned upright as its EXIF orientation says, as an array for `preprocess`.

    Returns:
      (H, W) uint8 gray, (H, W, 3) uint8 RGB or (H, W, 4) uint8 RGBA, reduced by a whole factor (block means) to at
      most MAX_SIDE pixels a side; 16-bit gray as (H, W) float32 in [0, 1];
      float gray (mode F) as stored, (H, W) float32, which `preprocess` reads as [0, 1] or, above 1, [0, 255].
      32-bit integer gray (mode I) is read as 8-bit when its values fit 0..255, else as 16-bit.
    Raises:
      UnknownScaleError (a ValueError) for 32-bit integer gray with values outside 0..65535.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode not in ("L", "RGB", "RGBA", "F") and not image.mode.startswith("I"):
        has_alpha = "A" in image.mode or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    factor = -(-max(image.size) // MAX_SIDE)
    if factor > 1 and not image.mode.startswith("I;16"):  # Pillow cannot reduce those: done on the values below
        image = image.reduce(factor)
        factor = 1
    if not image.mode.startswith("I"):
        return np.asarray(image)
    values = np.asarray(image)
    if image.mode == "I" and _full_scale(values, "32-bit integer") == 255:  # files of 8 or 16 bits decode to it
        return values.astype(np.uint8)
    scaled = values.astype(np.float32) / 65535.0
    if factor > 1:  # the mean of each factor x factor block, as Image.reduce does
        # Edge rows and columns repeated to whole blocks, as Image.reduce keeps the partial ones.
        scaled = np.pad(scaled, [(0, -n % factor) for n in scaled.shape], mode="edge")
        h, w = scaled.shape
        scaled = scaled.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
    return scaled


def preprocess(image: np.ndarray) -> np.ndarray:
    """Turns one decoded image into an MNIST-like digit.

    Args:
      image: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array, uint8/uint16, other integers in 0..255 or
        0..65535, or float in [0, 1] (or [0, 255]);
        any size, ink and background colours; transparent pixels show the background.
    Returns:
      uint8 (28, 28, 1): bright ink on black, the ink's larger side scaled to 20 px, centre of mass at (14, 14).
    Raises:
      ValueError when the image has no ink (nothing stands out from the background) or an unusable shape.
    """
    gray = _gray(image)
    digit = _crop(_ink(gray, float(np.median(_border(gray)))))
    if _fill(digit) > PAGE_FILL and _fill(ndimage.binary_fill_holes(digit > 0).astype(float)) >= RECTANGLE:
        # A page, its digit a hole in it: the image's edge was a frame or a desk around it, not the background.
        digit = _crop(_without_edge_clutter(_ink(gray, _modal_level(gray))))
        if _fill(digit) > MAX_FILL:
            raise ValueError(f"no digit found: what stands out from the background fills {digit.mean():.0%} of a "
                             f"{digit.shape[1]} x {digit.shape[0]} box (a page on a larger background?); crop the "
                             "image to the digit")
    digit = _scale(digit)
    return _centre(digit)[..., None]


def _full_scale(values: np.ndarray, what: str) -> int:
    """255 or 65535: the full scale of integer pixels whose type does not tell it, judged by their values."""
    low, high = int(values.min(initial=0)), int(values.max(initial=0))
    if low < 0 or high > 65535:
        raise UnknownScaleError(f"{what} pixels from {low} to {high}: only 0..255 (8-bit) and 0..65535 (16-bit) "
                                "have a known full scale; save the image as an 8- or 16-bit PNG")
    return 255 if high <= 255 else 65535


def _as_float(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.bool_:
        return image.astype(np.float64)
    if image.dtype in (np.uint8, np.uint16):
        return image.astype(np.float64) / np.iinfo(image.dtype).max
    if np.issubdtype(image.dtype, np.integer):  # e.g. int64, NumPy's type for Python ints: the values tell
        return image.astype(np.float64) / _full_scale(image, f"{image.dtype}")
    values = np.nan_to_num(image.astype(np.float64))
    return values / 255.0 if values.max(initial=0.0) > 1.0 else values


def _border(values: np.ndarray) -> np.ndarray:
    """The outer ring of a (H, W, ...) array, about 2% of the shorter side wide: where the background shows."""
    w = max(1, min(values.shape[:2]) // 50)
    ring = np.ones(values.shape[:2], bool)
    ring[w:-w, w:-w] = False
    return values[ring]


def _gray(image: np.ndarray) -> np.ndarray:
    """(H, W) float64 luminance in [0, 1], alpha composited over the background."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)) or min(image.shape[:2]) < 2:
        raise ValueError(f"an image of shape {image.shape} is not (H, W), (H, W, 3) or (H, W, 4) with H, W >= 2")
    values = _as_float(image)
    if values.ndim == 2:
        return values
    gray = values[..., :3] @ LUMA
    if values.shape[2] == 3:
        return gray
    alpha = values[..., 3]
    border_alpha = _border(alpha)
    if np.median(border_alpha) >= 0.5:
        # An opaque background with transparent holes: the holes show that background.
        backdrop = float(np.median(_border(gray)[border_alpha >= 0.5]))
    else:
        # Ink on a transparent sheet (many drawing apps): show it on the colour that contrasts with it.
        ink_level = float((gray * alpha).sum() / max(alpha.sum(), 1e-12))
        backdrop = 1.0 if ink_level < 0.5 else 0.0
    return alpha * gray + (1.0 - alpha) * backdrop


def _modal_level(gray: np.ndarray) -> float:
    """The most common gray level (of 64 bins, the median of the fullest)."""
    counts, edges = np.histogram(gray, bins=64, range=(0.0, 1.0))
    modal = int(counts.argmax())
    return float(np.median(gray[(gray >= edges[modal]) & (gray <= edges[modal + 1])]))


def _crop(ink: np.ndarray) -> np.ndarray:
    """The smallest box around the ink."""
    rows, cols = np.nonzero(ink)
    return ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def _fill(digit: np.ndarray) -> float:
    """How much cropped ink fills its box; 0 for a box less than half as wide as high (a 1 fills its own)."""
    h, w = digit.shape
    return float(digit.mean()) if min(h, w) > max(h, w) / 2 else 0.0


def _ink(gray: np.ndarray, background: float) -> np.ndarray:
    """(H, W) float64 ink in [0, 1] (1 = the strongest stroke, 0 = background) from a gray image."""
    darker, lighter = background - gray.min(), gray.max() - background
    # Light backgrounds (paper) carry dark ink; testing which side stands out also handles mid-gray ones.
    ink = background - gray if darker > lighter else gray - background
    contrast = max(darker, lighter)
    if contrast < MIN_CONTRAST:
        raise ValueError(f"the image has no ink: nothing differs from its background (gray level {background:.2f}) "
                         f"by {MIN_CONTRAST:.0%} or more; give an image with a visible digit")
    return np.clip((ink / contrast - NOISE_FLOOR) / (1.0 - NOISE_FLOOR), 0.0, 1.0)


def _without_edge_clutter(ink: np.ndarray) -> np.ndarray:
    """`ink` without the strokes that touch the image's edge (a frame, the desk around a page), where at least
    MIN_INSIDE of the ink is clear of it; a digit cropped tightly touches the edge and is kept."""
    labels, _ = ndimage.label(ink > 0, structure=np.ones((3, 3)))
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    at_edge = np.isin(labels, edge[edge > 0])
    if not at_edge.any() or ink[~at_edge].sum() < MIN_INSIDE * ink.sum():
        return ink
    return np.where(at_edge, 0.0, ink)


def _scale(digit: np.ndarray) -> np.ndarray:
    """The cropped digit resized (Lanczos, antialiased) so its larger side is BOX px, strongest stroke at 1."""
    h, w = digit.shape
    factor = BOX / max(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    resized = np.asarray(Image.fromarray(digit.astype(np.float32)).resize(size, Image.Resampling.LANCZOS))
    resized = np.clip(resized, 0.0, None)  # Lanczos rings below zero next to strokes
    return resized / resized.max()


def _centre(digit: np.ndarray) -> np.ndarray:
    """uint8 (28, 28): `digit` pasted so its centre of mass lands on the nearest pixel to (CENTRE, CENTRE)."""
    h, w = digit.shape
    mass = digit.sum()
    com_y = (digit.sum(axis=1) @ np.arange(h)) / mass
    com_x = (digit.sum(axis=0) @ np.arange(w)) / mass
    top, left = round(CENTRE - com_y), round(CENTRE - com_x)
    # Paste into a margin wide enough for any shift, then cut the field out: ink pushed past its edge is lost.
    canvas = np.zeros((SIZE + 2 * BOX, SIZE + 2 * BOX))
    canvas[BOX + top:BOX + top + h, BOX + left:BOX + left + w] = digit
    field = canvas[BOX:BOX + SIZE, BOX:BOX + SIZE]
    return np.round(255.0 * field).astype(np.uint8)


class Predictor:
    """A trained model that maps batches of MNIST-like images to class probabilities."""

    def __init__(self, apply_fn: Callable[..., jax.Array], variables: Any, image_shape: Sequence[int] = (28, 28, 1),
                 source: str = "model", tta_shift: int = 0) -> None:
        """`apply_fn(variables, float32 (B, *image_shape), train=False)` gives (B, C) logits; `source` names it;
        `tta_shift` > 0 averages each image's probabilities with its shifted copies (see `train.log_probabilities`)."""
        self.apply_fn = apply_fn
        self.variables = variables
        self.image_shape = tuple(image_shape)
        self.source = source
        self.tta_shift = tta_shift

    @classmethod
    def from_checkpoint(cls, path: str | Path, step: int | str = "best", model: nn.Module | None = None) -> Predictor:
        """Restores a run directory or checkpoint (see `checkpoint.restore`); by default its best epoch. `model`:
        the Flax module of a run trained with one given from Python (None: the run's registered config.model).

        It predicts as `digits-jax eval` scores that checkpoint: with the run's config.tta_shift.
        """
        with warnings.catch_warnings():  # predicting needs no optimizer state
            warnings.simplefilter("ignore", checkpoint.OptimizerStateAsSavedWarning)
            restored = checkpoint.restore(path, step=step, model=model)
        return cls(restored.state.apply_fn, restored.state.variables, restored.record["image_shape"],
                   source=f"{path} (epoch {restored.epoch})", tta_shift=restored.config.tta_shift)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, 28, 28, 1) images (as `preprocess` makes them), B >= 1 -> float32 (B, C) probabilities.

        The images go through the model MAX_BATCH at a time, so that memory stays bounded however many there
        are; each call's batch is padded to a power of two (at most MAX_BATCH) so that a server seeing every
        batch size compiles only a handful of programs.
        """
        images = np.asarray(images)
        shape = f"uint8 (B, {', '.join(map(str, self.image_shape))})"
        if images.dtype == np.uint8 and images.shape == self.image_shape:  # preprocess() gives one image
            raise ValueError(f"predict() takes a batch, {shape}, got one image {images.shape}: give image[None] or "
                             "np.stack of several")
        if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
            raise ValueError(f"predict() takes {shape} images, got {images.dtype} {images.shape}; pass them "
                             "through preprocess() first")
        if not len(images):
            raise ValueError("predict() got no images; give at least one")
        batch_size = min(1 << (len(images) - 1).bit_length(), MAX_BATCH)
        return ensemble.probabilities(self.apply_fn, self.variables, images, batch_size, self.tta_shift)


@dataclasses.dataclass(frozen=True)
class FilePrediction:
    """What one file holds: the digit, its probability and all class probabilities, or why there is none."""

    path: str
    digit: int | None = None
    probability: float | None = None
    probabilities: list[float] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def predict_files(predictor: Predictor, paths: Sequence[str | Path]) -> list[FilePrediction]:
    """Reads, preprocesses and predicts each file; all readable ones go through one `predict` call.

    Returns:
      one FilePrediction per path, in order; a file that cannot be read or holds no digit gets `error` and
      does not stop the others.
    """
    images: list[np.ndarray] = []
    errors: dict[int, str] = {}
    for i, path in enumerate(paths):
        try:
            images.append(preprocess(load_image(path)))
        except ValueError as error:
            message = str(error)
            errors[i] = message if message.startswith(str(path)) else f"{path}: {message}"
    probabilities = iter(predictor.predict(np.stack(images)) if images else [])
    results = []
    for i, path in enumerate(paths):
        if i in errors:
            results.append(FilePrediction(str(path), error=errors[i]))
            continue
        p = next(probabilities)
        digit = int(p.argmax())
        results.append(FilePrediction(str(path), digit, float(p[digit]), [float(v) for v in p]))
    return results
