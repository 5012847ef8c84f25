"""Condition recipes: make a condition image from a target image (``data.condition``).

A recipe is a callable ``(target: PIL RGB image, rng: random.Random) -> condition``
returning an RGB image of the target's size, or ``(condition, mask)`` where ``mask`` is
an ``L`` image (255 = pixels to fill) for inpainting. All randomness comes from ``rng``,
so the same seed gives the same condition. The recipes:

- ``sr``: bicubic downscale by ``sr_factor``, bicubic upscale back.
- ``sr_realesrgan``: a Real-ESRGAN-style second-order degradation (two rounds of blur,
  random resize, noise and JPEG), then resize to the low resolution and bicubic back up.
- ``inpaint``: a random box or free-form stroke mask (``inpaint_mask="box_or_stroke"``)
  or one random half of the image, top, bottom, left or right (``"half"``), or all of it
  but one random quadrant (``"three_quarters"``): on centred objects such as the digits
  testbed's, a large mask over part of every object; masked
  pixels set to grey ``INPAINT_FILL`` (0.5 after scaling to [0, 1]: 0 in the [-1, 1]
  image space, as diffusers' inpainting pipelines do).
- ``canny``: a Canny edge map (Gaussian smoothing, Sobel gradients, non-maximum
  suppression, hysteresis thresholds), white edges on black, 3 channels.

Super-resolution recipes also have ``low(image, rng)``: the low-resolution image itself
(what the shard writer stores, ``factor`` times smaller).
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

from .pixels import as_u8, resize_bicubic, resize_u8, to_image

CONDITIONS = ("stored", "sr", "sr_realesrgan", "inpaint", "canny")
SR_RECIPES = ("sr", "sr_realesrgan")
INPAINT_FILL = (128, 128, 128)

Pixels = Image.Image | torch.Tensor  # a PIL image or uint8 pixels [C, H, W]
ConditionRecipe = Callable[
    [Image.Image, random.Random], "Image.Image | tuple[Image.Image, Image.Image]"
]


def numpy_rng(rng: random.Random) -> np.random.Generator:
    """A numpy generator drawn from (and advancing) the per-sample ``rng``."""
    return np.random.default_rng(rng.getrandbits(64))


# --------------------------------------------------------------------------- SR


def low_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """The low-resolution size for ``factor`` (floor, at least 1 pixel)."""
    return max(1, size[0] // factor), max(1, size[1] // factor)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> [1, 3, H, W] float in [0, 1]."""
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def _to_image(x: torch.Tensor) -> Image.Image:
    """[1, 3, H, W] in [0, 1] -> RGB image (rounded to 8 bits)."""
    arr = (x[0].clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """A normalised (possibly anisotropic, rotated by ``theta``) Gaussian kernel."""
    r = size // 2
    y, x = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float64)
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * x + s * y, -s * x + c * y
    k = np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return (k / k.sum()).astype(np.float32)


def random_kernel(g: np.random.Generator, sigma: tuple[float, float]) -> np.ndarray:
    """Isotropic or anisotropic Gaussian, odd size 7..21, sigmas drawn from ``sigma``."""
    size = int(g.choice(np.arange(7, 22, 2)))
    if g.random() < 0.5:
        s = g.uniform(*sigma)
        return gaussian_kernel(size, s, s, 0.0)
    return gaussian_kernel(size, g.uniform(*sigma), g.uniform(*sigma), g.uniform(0, math.pi))


def blur(x: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """Convolve each channel of [1, C, H, W] with a point-symmetric ``kernel`` (edges
    replicated). Large kernels go through the FFT, which is faster on the CPU."""
    size = kernel.shape[0]
    pad = size // 2
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    k = torch.from_numpy(kernel)
    if size <= 9:
        return F.conv2d(xp, k[None, None].expand(x.shape[1], 1, size, size), groups=x.shape[1])
    h, w = xp.shape[-2:]
    out = torch.fft.irfft2(torch.fft.rfft2(xp) * torch.fft.rfft2(k, s=(h, w)), s=(h, w))
    return out[..., size - 1 :, size - 1 :]  # the part free of circular wrap-around


def resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize [1, C, H, W] to ``size`` = (H, W) with ``bilinear``/``bicubic``/``area``."""
    size = (max(1, size[0]), max(1, size[1]))
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False).clamp(0, 1)


def random_resize(
    x: torch.Tensor,
    g: np.random.Generator,
    base: tuple[int, int],
    probs: tuple[float, float, float],
    up: tuple[float, float],
    down: tuple[float, float],
) -> torch.Tensor:
    """Resize to ``base`` (H, W) times a random scale: up, down or kept with ``probs``;
    random mode among bilinear, bicubic and area."""
    kind = g.choice(3, p=probs)
    scale = g.uniform(*up) if kind == 0 else g.uniform(*down) if kind == 1 else 1.0
    mode = str(g.choice(["bilinear", "bicubic", "area"]))
    return resize(x, (round(base[0] * scale), round(base[1] * scale)), mode)


def add_noise(
    x: torch.Tensor,
    g: np.random.Generator,
    sigma: tuple[float, float],
    poisson: tuple[float, float],
) -> torch.Tensor:
    """Gaussian (sigma in 8-bit units) or Poisson noise, colour or grey (40%)."""
    _, c, h, w = x.shape
    grey = g.random() < 0.4
    if g.random() < 0.5:
        noise = g.standard_normal((1 if grey else c, h, w)) * g.uniform(*sigma) / 255.0
    else:
        base = x[0].mean(0, keepdim=True) if grey else x[0]
        counts = g.poisson(base.numpy().astype(np.float64) * 255.0) / 255.0
        noise = (counts - base.numpy()) * g.uniform(*poisson)
    return (x + torch.from_numpy(noise.astype(np.float32))).clamp(0, 1)


def jpeg(x: torch.Tensor, g: np.random.Generator, quality: tuple[int, int]) -> torch.Tensor:
    """Re-encode as JPEG with a random quality in ``quality`` (inclusive)."""
    buf = io.BytesIO()
    _to_image(x).save(buf, format="JPEG", quality=int(g.integers(quality[0], quality[1] + 1)))
    return _to_tensor(Image.open(buf).convert("RGB"))


def realesrgan_low(image: Image.Image, factor: int, rng: random.Random) -> Image.Image:
    """Real-ESRGAN-style second-order degradation of ``image`` to ``factor`` times smaller.

    Two rounds of: random Gaussian/anisotropic blur, random resize (bilinear, bicubic or
    area; up, down or kept), Gaussian or Poisson noise, JPEG with a random quality. The
    second round works around the low resolution and blurs with probability 0.8; the
    final resize to the low resolution and the last JPEG come in random order.
    """
    g = numpy_rng(rng)
    w, h = image.size
    lw, lh = low_size(image.size, factor)
    x = _to_tensor(image)
    # round 1
    x = blur(x, random_kernel(g, (0.2, 3.0)))
    x = random_resize(x, g, (h, w), (0.2, 0.7, 0.1), up=(1.0, 1.5), down=(0.15, 1.0))
    x = add_noise(x, g, sigma=(1.0, 30.0), poisson=(0.05, 3.0))
    x = jpeg(x, g, (30, 95))
    # round 2, around the low resolution
    if g.random() < 0.8:
        x = blur(x, random_kernel(g, (0.2, 1.5)))
    x = random_resize(x, g, (lh, lw), (0.3, 0.4, 0.3), up=(1.0, 1.2), down=(0.3, 1.0))
    x = add_noise(x, g, sigma=(1.0, 25.0), poisson=(0.05, 2.5))
    final_mode = str(g.choice(["bilinear", "bicubic", "area"]))
    if g.random() < 0.5:
        x = jpeg(resize(x, (lh, lw), final_mode), g, (30, 95))
    else:
        x = resize(jpeg(x, g, (30, 95)), (lh, lw), final_mode)
    return _to_image(x)


class SuperResolution:
    """SR recipe: ``low`` makes the low-resolution input, ``__call__`` scales it back up
    to the target size (bicubic: PIL's filter, by ``pixels.resize_u8``). ``degrade``:
    Real-ESRGAN-style instead of bicubic.

    Takes and returns PIL images or uint8 tensors [C, H, W] (``takes_pixels``: the
    loader hands it its uint8 crop and skips two conversions)."""

    takes_pixels = True

    def __init__(self, factor: int, degrade: bool = False) -> None:
        self.factor, self.degrade = factor, degrade

    def low(self, image: Pixels, rng: random.Random) -> Pixels:
        """The low-resolution image, ``factor`` times smaller (floor)."""
        if isinstance(image, torch.Tensor):
            if self.degrade:
                return as_u8(realesrgan_low(to_image(image), self.factor, rng))
            h, w = image.shape[-2:]
            return resize_u8(image, low_size((w, h), self.factor))
        if self.degrade:
            return realesrgan_low(image, self.factor, rng)
        return resize_bicubic(image, low_size(image.size, self.factor))

    def __call__(self, image: Pixels, rng: random.Random) -> Pixels:
        low = self.low(image, rng)
        if isinstance(image, torch.Tensor):
            return resize_u8(low, (image.shape[-1], image.shape[-2]))
        return resize_bicubic(low, image.size)


def sr_bicubic(image: Image.Image, factor: int) -> Image.Image:
    """Super-resolution condition: bicubic downscale by ``factor``, upscale back (the
    condition enters the adapter at the target's pixel resolution)."""
    return SuperResolution(factor)(image, random.Random(0))  # no randomness in bicubic


# ---------------------------------------------------------------------- inpaint


def box_mask(size: tuple[int, int], g: np.random.Generator) -> Image.Image:
    """1-3 random rectangles, each side 10-50% of the image side (255 = masked)."""
    w, h = size
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(int(g.integers(1, 4))):
        bw, bh = max(1, round(w * g.uniform(0.1, 0.5))), max(1, round(h * g.uniform(0.1, 0.5)))
        left, top = int(g.integers(0, w - bw + 1)), int(g.integers(0, h - bh + 1))
        draw.rectangle((left, top, left + bw - 1, top + bh - 1), fill=255)
    return mask


def stroke_mask(size: tuple[int, int], g: np.random.Generator) -> Image.Image:
    """1-4 free-form strokes: random walks of thick lines with round joints."""
    w, h = size
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    side = min(w, h)
    for _ in range(int(g.integers(1, 5))):
        width = max(1, round(side * g.uniform(0.03, 0.1)))
        x, y = g.uniform(0, w), g.uniform(0, h)
        angle = g.uniform(0, 2 * math.pi)
        points = [(x, y)]
        for _ in range(int(g.integers(4, 13))):
            angle += g.uniform(-math.pi / 2, math.pi / 2)
            step = g.uniform(0.05, 0.25) * max(w, h)
            x = float(np.clip(x + step * math.cos(angle), 0, w - 1))
            y = float(np.clip(y + step * math.sin(angle), 0, h - 1))
            points.append((x, y))
        draw.line(points, fill=255, width=width, joint="curve")
        r = width / 2
        for px, py in points:  # round caps
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
    return mask


def half_mask(size: tuple[int, int], g: np.random.Generator) -> Image.Image:
    """One of the image's four halves (top, bottom, left, right), drawn uniformly; an odd
    side's middle row or column stays unmasked."""
    w, h = size
    mask = Image.new("L", size, 0)
    side = int(g.integers(0, 4))
    box = ((0, 0, w - 1, h // 2 - 1), (0, h - h // 2, w - 1, h - 1),
           (0, 0, w // 2 - 1, h - 1), (w - w // 2, 0, w - 1, h - 1))[side]  # fmt: skip
    if box[2] >= box[0] and box[3] >= box[1]:  # a 1-pixel side has no half to mask
        ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def three_quarter_mask(size: tuple[int, int], g: np.random.Generator) -> Image.Image:
    """All but one of the image's four quadrants (the one kept drawn uniformly; on an
    odd side it keeps the middle row or column)."""
    w, h = size
    keep = int(g.integers(0, 4))  # top left, top right, bottom left, bottom right
    cols = slice(0, w - w // 2) if keep in (0, 2) else slice(w // 2, w)
    rows = slice(0, h - h // 2) if keep in (0, 1) else slice(h // 2, h)
    mask = np.full((h, w), 255, np.uint8)
    mask[rows, cols] = 0
    return Image.fromarray(mask, "L")


INPAINT_MASKS = ("box_or_stroke", "half", "three_quarters")


class Inpaint:
    """The ``inpaint`` recipe: ``(masked image, mask)``, masked pixels grey. ``mask`` is
    ``"box_or_stroke"`` (a box or a stroke mask, even odds), ``"half"`` or
    ``"three_quarters"``."""

    def __init__(self, mask: str = "box_or_stroke") -> None:
        if mask not in INPAINT_MASKS:
            raise ValueError(
                f"data.inpaint_mask={mask!r} is unknown; choose one of {', '.join(INPAINT_MASKS)}"
            )
        self.mask = mask

    def __call__(self, image: Image.Image, rng: random.Random) -> tuple[Image.Image, Image.Image]:
        g = numpy_rng(rng)
        if self.mask == "half":
            mask = half_mask(image.size, g)
        elif self.mask == "three_quarters":
            mask = three_quarter_mask(image.size, g)
        else:
            mask = box_mask(image.size, g) if g.random() < 0.5 else stroke_mask(image.size, g)
        grey = Image.new("RGB", image.size, INPAINT_FILL)
        return Image.composite(grey, image, mask), mask


def inpaint_condition(image: Image.Image, rng: random.Random) -> tuple[Image.Image, Image.Image]:
    """``(masked image, mask)``: a box (50%) or stroke mask; masked pixels grey."""
    return Inpaint()(image, rng)


# ------------------------------------------------------------------------ canny


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``a`` shifted so out[y, x] = a[y + dy, x + dx] (edges replicated)."""
    p = np.pad(a, 1, mode="edge")
    h, w = a.shape
    return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel gradients (gx, gy) of a 2-D float array."""
    gx = (_shift(gray, -1, 1) + 2 * _shift(gray, 0, 1) + _shift(gray, 1, 1)) - (
        _shift(gray, -1, -1) + 2 * _shift(gray, 0, -1) + _shift(gray, 1, -1)
    )
    gy = (_shift(gray, 1, -1) + 2 * _shift(gray, 1, 0) + _shift(gray, 1, 1)) - (
        _shift(gray, -1, -1) + 2 * _shift(gray, -1, 0) + _shift(gray, -1, 1)
    )
    return gx, gy


def non_max_suppression(mag: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Keep gradient magnitudes that are maxima along the (4-way quantised) gradient."""
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    sector = ((angle + 22.5) // 45).astype(np.int64) % 4  # 0: E-W, 1: NE, 2: N-S, 3: NW
    out = np.zeros_like(mag)
    for s, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        keep = (sector == s) & (mag >= _shift(mag, dy, dx)) & (mag >= _shift(mag, -dy, -dx))
        out[keep] = mag[keep]
    return out


def hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Weak pixels 8-connected (through weak pixels) to a strong one, plus the strong."""
    edges = strong.copy()
    while True:
        grown = edges.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= _shift(edges, dy, dx)
        grown &= weak
        grown |= strong
        if np.array_equal(grown, edges):
            return edges
        edges = grown


def canny_edges(
    image: Image.Image, low: float = 100.0, high: float = 200.0, sigma: float = 1.4
) -> Image.Image:
    """Canny edge map, white (255) edges on black, as RGB.

    Thresholds are on the L2 Sobel magnitude of the 0-255 grey image smoothed with a
    Gaussian of ``sigma`` (OpenCV's ``Canny(img, 100, 200)`` scale, as ControlNet uses).
    """
    gray = image.convert("L")
    if sigma > 0:
        gray = gray.filter(ImageFilter.GaussianBlur(sigma))
    g = np.asarray(gray, dtype=np.float32)
    gx, gy = sobel(g)
    mag = non_max_suppression(np.hypot(gx, gy), gx, gy)
    edges = hysteresis(mag >= high, mag >= low)
    return Image.fromarray((edges * 255).astype(np.uint8), "L").convert("RGB")


def canny_condition(image: Image.Image, rng: random.Random) -> Image.Image:
    """The ``canny`` recipe (deterministic: ``rng`` is unused)."""
    return canny_edges(image)


# ---------------------------------------------------------------------- factory


def make_recipe(
    name: str, sr_factor: int = 4, inpaint_mask: str = "box_or_stroke"
) -> ConditionRecipe | None:
    """The on-the-fly condition recipe for ``data.condition`` (None: must be stored)."""
    if name == "stored":
        return None
    if name in SR_RECIPES:
        if not isinstance(sr_factor, int) or sr_factor < 2:
            raise ValueError(f"data.sr_factor={sr_factor!r}: give an integer >= 2 (2, 4 or 8)")
        return SuperResolution(sr_factor, degrade=name == "sr_realesrgan")
    if name == "inpaint":
        return Inpaint(inpaint_mask)
    if name == "canny":
        return canny_condition
    raise ValueError(
        f"data.condition={name!r} is unknown; choose 'stored' or 'sr' (also 'sr_realesrgan', "
        "'inpaint', 'canny'); other conditions (depth, edits, ...) must be stored as cond.png"
    )
