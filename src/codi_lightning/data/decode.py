"""Safe decoding of WebDataset samples: images, text and json only.

WebDataset's default decoders unpickle ``.pyd``/``.pickle`` and ``torch.load`` ``.pth``
members, so a shard from a stranger could run code. Here members with any other
extension are never even read from the tar (``select_member``), and nothing is ever
unpickled.

Every way a sample can be unusable raises :class:`BadSample` with a short ``reason``
(the key of the skip counts, see docs/data.md). Image sizes are checked from the header
(PIL reads it lazily) *before* any pixel is decoded, so a decompression bomb costs
nothing.
"""

from __future__ import annotations

import io
import json
import re
import struct
import warnings
from typing import Any, Literal

import torch
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TARGET_KEYS = IMAGE_EXTS
COND_KEYS = tuple(f"cond.{e}" for e in IMAGE_EXTS)
MASK_KEYS = ("mask.png",)
TEXT_KEYS = ("txt",)
JSON_KEYS = ("json",)
# cached latents and text conditioning (``codi-lightning cache``; data/cache.py)
LATENTS, TEXT = "latents.safetensors", "text.safetensors"
CACHE_KEYS = (LATENTS, TEXT)
ALLOWED = (
    set(TARGET_KEYS) | set(COND_KEYS) | set(MASK_KEYS) | set(TEXT_KEYS) | set(JSON_KEYS)
    | set(CACHE_KEYS)
)  # fmt: skip
GRID = 8  # SD's VAE downsampling: cached-latent crops stay on this pixel grid
DEFAULT_MAX_PIXELS = 64_000_000  # 64 MP: e.g. 8000 x 8000
CaptionErrors = Literal["replace", "skip"]


class BadSample(ValueError):
    """A sample that cannot be used.

    Attributes:
        reason: why, as a short key (for skip counts), e.g. ``corrupt_image``.
        detail: what is wrong, for people: ``a.png is not a readable image (truncated
            image)``.
        where: which sample: ``<shard url> sample <key>`` (set by the readers that know
            it; may be empty).
    """

    def __init__(self, reason: str, detail: str = "", where: str = "") -> None:
        super().__init__(reason, detail, where)
        self.reason, self.detail, self.where = reason, detail, where

    def locate(self, where: str) -> None:
        """Set ``where`` unless it is set already."""
        if not self.where:
            self.where = where

    @property
    def message(self) -> str:
        """``where: detail`` (without the reason)."""
        return ": ".join(part for part in (self.where, self.detail) if part)

    def __str__(self) -> str:
        return ": ".join(part for part in (self.reason, self.message) if part)


_OBJECT_REPR = re.compile(r"\s*<[^<>]*\bobject at 0x[0-9a-fA-F]+>")


def image_error(err: BaseException) -> str:
    """A short description of a PIL decoding failure, without object reprs:
    ``truncated image``, ``cannot identify image file``, or PIL's own message."""
    text = _OBJECT_REPR.sub("", str(err)).strip()
    if "truncated" in text.lower():
        return "truncated image"
    return text or type(err).__name__


def sample_location(sample: dict[str, Any]) -> str:
    """``<shard url> sample <key>`` for a raw WebDataset sample (``sample <key>`` when the
    sample does not say which shard it came from)."""
    key = sample.get("__key__", "?")
    url = sample.get("__url__")
    return f"{url} sample {key}" if url else f"sample {key}"


def member_extension(name: str) -> str:
    """``dir/key.cond.png`` -> ``cond.png`` (WebDataset: the key ends at the first dot
    of the base name)."""
    base = name.rsplit("/", 1)[-1]
    return base.split(".", 1)[1].lower() if "." in base else ""


def select_member(name: str) -> bool:
    """Read only members whose extension we decode."""
    return member_extension(name) in ALLOWED


def open_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, corrupt: str = "corrupt_image"
) -> Image.Image:
    """Open image bytes lazily (header only) and refuse images above ``max_pixels``.

    PIL's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) also applies: its
    warning and error both become ``BadSample("too_large")``.

    Raises:
        BadSample: ``too_large``, or ``corrupt`` (the reason for an unreadable header,
            e.g. ``corrupt_condition`` for a condition image). The ``detail`` names no
            file: ``not a readable image (cannot identify image file)`` or ``too large
            (9000x9000 pixels, above max_pixels=64000000)``; callers add the name.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample("too_large", _bomb(err)) from err
    except Exception as err:  # PIL raises many types for corrupt data
        raise BadSample(corrupt, f"not a readable image ({image_error(err)})") from err
    w, h = img.size
    if w * h > max_pixels:
        raise BadSample("too_large", f"too large ({w}x{h} pixels, above max_pixels={max_pixels})")
    return img


def _bomb(err: BaseException) -> str:
    return f"too large for PIL's decompression-bomb guard ({image_error(err)})"


def to_rgb(img: Image.Image) -> Image.Image:
    """Decode the pixels of an opened image and convert any mode to 8-bit RGB.

    16-bit and 32-bit grey are scaled to 8 bits; transparency is composited on white;
    CMYK, palette, grey and bilevel images are converted by PIL.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    ):
        background = Image.new("RGB", img.size, (255, 255, 255))
        rgba = img.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")  # convert would copy RGB


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB PIL image (any mode converted; 16-bit scaled to 8-bit)."""
    return to_rgb(open_image(data, max_pixels))


def _member(sample: dict[str, Any], ext: str) -> str:
    """The tar member a sample entry came from: ``<key>.<ext>``."""
    return f"{sample.get('__key__', '?')}.{ext}"


def _open(
    sample: dict[str, Any], ext: str, max_pixels: int, corrupt: str = "corrupt_image"
) -> Image.Image:
    """``open_image`` of ``sample[ext]``, the error naming the member."""
    try:
        return open_image(sample[ext], max_pixels, corrupt)
    except BadSample as err:
        raise BadSample(err.reason, f"{_member(sample, ext)} is {err.detail}") from err


def _load(img: Image.Image, reason: str, member: str) -> Image.Image:
    """``to_rgb`` with decoding failures turned into ``BadSample(reason)``."""
    try:
        return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample("too_large", f"{member} is {_bomb(err)}") from err
    except Exception as err:  # truncated or corrupt pixel data
        raise BadSample(reason, f"{member} is not a readable image ({image_error(err)})") from err


MAX_JSON_BYTES = 1_000_000  # a sample's metadata is a few hundred bytes


def _meta(sample: dict[str, Any]) -> dict[str, Any]:
    """The ``json`` member as a dict ({} when absent).

    Raises:
        BadSample: ``corrupt_json`` for a member that is not a JSON object: not JSON,
            another type, more than ``MAX_JSON_BYTES``, or nested too deeply for the
            parser (``RecursionError``)."""
    if "json" not in sample:
        return {}
    raw = sample["json"]
    member = _member(sample, "json")
    if len(raw) > MAX_JSON_BYTES:
        raise BadSample("corrupt_json", f"{member} is {len(raw)} bytes, above {MAX_JSON_BYTES}")
    try:
        meta = json.loads(raw.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError, MemoryError) as err:
        kind = "nested too deeply" if isinstance(err, RecursionError) else "not JSON"
        raise BadSample("corrupt_json", f"{member} is {kind}") from None
    if not isinstance(meta, dict):
        raise BadSample("corrupt_json", f"{member} is a JSON {type(meta).__name__}, not an object")
    return meta


def _meta_size(meta: dict[str, Any]) -> tuple[int, int] | None:
    """``(width, height)`` from the metadata when both are positive integers."""
    w, h = meta.get("width"), meta.get("height")
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h))
    return (w, h) if ok else None


def check_size(size: tuple[int, int], min_size: int = 0, max_aspect: float | None = None) -> None:
    """Raise ``too_small`` or ``aspect_ratio`` for an image size outside the filters."""
    w, h = size
    if min(w, h) < min_size:
        raise BadSample("too_small", f"{w}x{h}: shorter side below min_size={min_size}")
    if max_aspect is not None and max(w, h) > max_aspect * min(w, h):
        raise BadSample("aspect_ratio", f"{w}x{h}: aspect ratio above max_aspect={max_aspect}")


def decode_caption(raw: bytes | None, errors: CaptionErrors = "replace") -> str:
    """Caption bytes -> str. Invalid UTF-8 is replaced by U+FFFD (``errors="replace"``)
    or raises ``BadSample("caption_not_utf8")`` (``errors="skip"``); NULs are dropped."""
    if raw is None:
        return ""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        if errors == "skip":
            raise BadSample(
                "caption_not_utf8",
                f"the caption is not valid UTF-8 ({err.reason} at byte {err.start}); set "
                "data.caption_errors=replace to keep it with the bad bytes replaced",
            ) from err
        text = raw.decode("utf-8", errors="replace")
    return text.replace("\x00", "").strip()


def decode_sample(
    sample: dict[str, Any],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = 0,
    max_aspect: float | None = None,
    caption_errors: CaptionErrors = "replace",
    draft: int = 0,
    cache_spec: CacheSpec | None = None,
) -> dict[str, Any]:
    """Raw WebDataset sample -> ``{"key", "image", "cond" (or None), "mask" (or None),
    "caption", "meta", "size"}``.

    ``draft``: a JPEG target with no stored condition is decoded at a reduced scale (1/2,
    1/4 or 1/8, in libjpeg's DCT) as long as its shorter side stays at or above ``draft``
    pixels (a 1024 px JPEG cropped at 512: the whole sample 2.2x faster,
    docs/performance.md). 0: always full size.
    ``size`` is the stored ``(width, height)``, whatever the decoded size.
    ``cache_spec``: the shapes of the run's teacher for cached members (:func:`check_cached`).

    Cheap checks come first: the target's size (from ``json`` ``width``/``height`` when
    present, else from the image header) is filtered by ``min_size`` (shorter side) and
    ``max_aspect`` (longer / shorter side), and images above ``max_pixels`` are refused,
    all before any pixel is decoded.

    Raises:
        BadSample: reasons ``no_target``, ``too_large``, ``too_small``, ``aspect_ratio``,
            ``corrupt_image``, ``corrupt_condition``, ``corrupt_mask``, ``corrupt_json``,
            ``corrupt_cache``, ``non_finite``, ``caption_not_utf8``; ``where`` is ``<shard url> sample <key>`` and
            ``detail`` names the member, e.g. ``k.png is not a readable image (cannot
            identify image file)``.
    """
    try:
        return _decode_sample(
            sample, max_pixels, min_size, max_aspect, caption_errors, draft, cache_spec
        )
    except BadSample as err:
        err.locate(sample_location(sample))
        raise


def _decode_sample(
    sample: dict[str, Any], max_pixels: int, min_size: int, max_aspect: float | None,
    caption_errors: CaptionErrors, draft: int = 0, cache_spec: CacheSpec | None = None,
) -> dict[str, Any]:  # fmt: skip
    key = sample.get("__key__", "?")
    target = next((k for k in TARGET_KEYS if k in sample), None)
    if target is None:
        raise BadSample("no_target", f"no target image member (one of {', '.join(TARGET_KEYS)})")
    meta = _meta(sample)
    if (size := _meta_size(meta)) is not None:
        check_size(size, min_size, max_aspect)  # before even opening the image
    header = _open(sample, target, max_pixels)
    if size is None:
        check_size(header.size, min_size, max_aspect)
    caption = decode_caption(sample.get("txt"), caption_errors)
    cond_key = next((k for k in COND_KEYS if k in sample), None)
    cond_header = None
    if cond_key is not None:
        cond_header = _open(sample, cond_key, max_pixels, "corrupt_condition")
    stored_size = header.size
    if draft and cond_header is None:  # a stored condition is matched to the stored size
        reduce_jpeg_decoding(header, draft)
    image = _load(header, "corrupt_image", _member(sample, target))
    cond = None
    if cond_header is not None:
        cond = _load(cond_header, "corrupt_condition", _member(sample, cond_key))
    mask = _decode_mask(sample, max_pixels) if cond is not None else None
    out = {"key": key, "image": image, "cond": cond, "mask": mask, "caption": caption,
           "meta": meta, "size": stored_size}  # fmt: skip
    _decode_cached(sample, out, cache_spec)
    return out


def reduce_jpeg_decoding(img: Image.Image, short_side: int) -> None:
    """Before decoding: let libjpeg decode an opened JPEG at 1/2, 1/4 or 1/8 scale, the
    smallest whose shorter side is still at least ``short_side`` (no-op for other
    formats or when the image is less than twice that)."""
    if img.format != "JPEG" or short_side <= 0:
        return
    w, h = img.size
    for s in (8, 4, 2):
        if min(w, h) >= s * short_side:  # decoded size: ceil(w / s) x ceil(h / s)
            img.draft(None, (w // s, h // s))  # PIL's choice: min(w // (w // s), ...) = s
            return


def cache_geometry(
    stored: tuple[int, int], resolution: int, resize_shorter: bool, grid: int = GRID
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(resized, trimmed)``: the size the data module resizes a stored ``(w, h)`` image
    to (as ``PairTransform``), and that size cut down to the VAE's grid (8 pixels for SD:
    what the cache encodes; the right and bottom edges lose at most ``grid - 1`` pixels)."""
    w, h = stored
    if resize_shorter or min(w, h) < resolution:
        scale = resolution / min(w, h)
        w, h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    return (w, h), (w - w % grid, h - h % grid)


def read_safetensors(data: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors and string metadata of safetensors bytes (a format without pickle)."""
    from safetensors.torch import load

    (length,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
    return load(data), dict(meta)


CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what `cache` writes
CacheSpec = dict[str, dict[str, tuple[int | None, ...]]]


def _decode_cached(
    sample: dict[str, Any], out: dict[str, Any], spec: CacheSpec | None = None
) -> None:
    """``latents`` / ``text``: (tensors, metadata) of the cached members, when present,
    checked by :func:`check_cached`."""
    for member, name in ((LATENTS, "latents"), (TEXT, "text")):
        if member in sample:
            where = _member(sample, member)
            try:
                out[name] = read_safetensors(sample[member])
            except Exception as err:
                raise BadSample("corrupt_cache", f"{where} is not readable ({err})") from err
            check_cached(name, out[name][0], where, spec)
            if name == "latents":
                check_cache_record(out[name][1], where)


def check_cache_record(meta: dict[str, str], where: str) -> None:
    """The geometry ``codi-lightning cache`` records with the latents, where present:
    ``grid`` a power of two (pixels per latent), ``resolution`` a positive multiple of
    it, ``resize_shorter`` ``True`` or ``False``; anything else is ``corrupt_cache``
    (``PairTransform`` compares the values with the run's own)."""
    grid, resolution = meta.get("grid", str(GRID)), meta.get("resolution", str(GRID))
    ok = grid.isdecimal() and int(grid) > 0 and not int(grid) & (int(grid) - 1)
    ok = ok and resolution.isdecimal() and int(resolution) > 0 and not int(resolution) % int(grid)
    if not ok or meta.get("resize_shorter", "False") not in ("True", "False"):
        record = {k: meta.get(k) for k in ("grid", "resolution", "resize_shorter")}
        raise BadSample("corrupt_cache", f"{where}: a damaged cache record {record}")


def check_cached(
    name: str, tensors: dict[str, torch.Tensor], where: str, spec: CacheSpec | None = None
) -> None:
    """A cached member as ``codi-lightning cache`` writes it, or ``BadSample``:
    ``corrupt_cache`` for missing keys, dtypes other than fp16/bf16/fp32, the wrong
    number of dimensions or mismatched mean/std shapes; ``non_finite`` for NaN or inf.

    ``latents``: ``mean`` and ``std`` [C, h, w] (and ``flip_mean`` / ``flip_std``);
    ``text``: ``hidden_states`` [L, D] and ``added.*`` [N] (or scalars). ``spec``: what
    the run's teacher makes (``ShardDataModule.expect_cache``), ``{"latents": {"mean":
    (C,)}, "text": {"hidden_states": (L, D), "added.text_embeds": (P,)}}``: leading
    dimensions, None for any; a mismatch is ``corrupt_cache``."""
    if name == "latents":
        need = {"mean": (3,), "std": (3,)}
        need.update({k: (3,) for k in ("flip_mean", "flip_std") if k in tensors})
    else:  # added.*: per-sample vectors (pooled embeddings) or scalars (Flux's guidance)
        need = {"hidden_states": (2,), **{k: (0, 1) for k in tensors if k.startswith("added.")}}
    expected = (spec or {}).get(name) or {}
    missing = sorted((set(need) | set(expected)) - set(tensors))
    if missing:
        raise BadSample("corrupt_cache", f"{where} has no {', '.join(missing)}")
    for key, dims in need.items():
        t = tensors[key]
        if t.dtype not in CACHE_DTYPES:
            raise BadSample("corrupt_cache", f"{where}: {key} is {t.dtype}, not a float16/32")
        if t.dim() not in dims:
            raise BadSample(
                "corrupt_cache", f"{where}: {key} has shape {tuple(t.shape)}, not {dims[-1]}-D"
            )
        if not bool(torch.isfinite(t).all()):
            raise BadSample("non_finite", f"{where}: {key} holds NaN or inf values")
    for a, b in (("mean", "std"), ("flip_mean", "flip_std")):
        if a in need and tuple(tensors[a].shape) != tuple(tensors[b].shape):
            raise BadSample("corrupt_cache", f"{where}: {a} and {b} differ in shape")
    for key, shape in expected.items():  # the run's teacher: leading dims (None: any)
        got = tuple(tensors[key].shape)
        head = got[: len(shape)]
        if len(head) < len(shape) or any(
            e is not None and g != e for g, e in zip(head, shape, strict=True)
        ):
            want = "x".join("*" if e is None else str(e) for e in shape)
            raise BadSample(
                "corrupt_cache",
                f"{where}: {key} has shape {got}, the run's teacher makes {want} (cached with "
                "another teacher? run `codi-lightning cache` with this one)",
            )


def _decode_mask(sample: dict[str, Any], max_pixels: int) -> Image.Image | None:
    """A stored inpainting mask (``mask.png``) as an ``L`` image, or None."""
    if "mask.png" not in sample:
        return None
    mask = _open(sample, "mask.png", max_pixels, "corrupt_mask")
    try:
        return mask.convert("L")  # decodes the pixels
    except Exception as err:
        member = _member(sample, "mask.png")
        raise BadSample(
            "corrupt_mask", f"{member} is not a readable image ({image_error(err)})"
        ) from err
