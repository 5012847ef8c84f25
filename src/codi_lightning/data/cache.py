"""Cached latents and text embeddings: encode shards once, train without VAE and text encoder.

``codi-lightning cache --pretrained <teacher> --shards 'in-{000000..000009}.tar' --output
'cached/train-%06d.tar' --resolution 512`` copies every sample and adds two members:

- ``latents.safetensors``: the VAE posterior's mean and standard deviation (fp16 by
  default) of the WHOLE image resized as the data module resizes it (shorter side to
  ``resolution``) and trimmed to the VAE's grid; with ``hflip`` also those of its
  mirror image. Random crops survive: the data module crops on the VAE's grid (8
  pixels for SD) and takes the matching window of the latents. A latent window is not exactly the latent of
  the cropped pixels (the encoder sees past the crop's border; docs/performance.md has
  the measured difference), which is why this is a choice and not the default.
- ``text.safetensors``: the teacher's text conditioning of the caption (SD: the CLIP
  sequence [77, D]; SDXL: both sequences and the pooled embedding), so the text
  encoder does not run either. A caption dropped by ``data.caption_dropout`` becomes the
  empty prompt in the module, as without the cache.

The stored image stays in the sample: the condition recipes (SR, inpainting, edges)
work on its pixels, and validation and the grids use it. The module uses the cached
members whenever a batch has them (``CoDiDistillation.batch_latents`` /
``batch_conditioning``); the posterior sample is drawn from the same noise as the VAE
path draws, so with fp32 storage the loss equals the uncached loss exactly (tests).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from .datamodule import check_local_shards, shard_sources
from .decode import (
    DEFAULT_MAX_PIXELS,
    LATENTS,
    TEXT,
    BadSample,
    cache_geometry,
    decode_caption,
    decode_image,
    select_member,
)
from .pixels import resize_bicubic
from .shards import _check_output, clear_partial, shard_writer
from .transforms import to_tensor01

DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


def _safetensors(tensors: dict[str, Tensor], meta: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def load_encoders(
    pretrained: str, vae_path: str | None = None, revision: str | None = None
) -> tuple[torch.nn.Module, Any, str]:
    """The teacher's VAE and text side (no UNet): ``(vae, prompt_encoder, family)``."""
    from ..models.builders import load_vae
    from ..models.teachers import family_of, read_model_index

    index = read_model_index(pretrained, revision)
    family = family_of(index)
    kw: dict[str, Any] = {"revision": revision}
    vae = load_vae(pretrained, vae_path, {**kw, "variant": None}, family.vae)
    prompt = family.load_prompt_encoder(pretrained, index, kw, {**kw, "variant": None})
    for module in (vae, prompt):
        module.requires_grad_(False).eval()
    return vae, prompt, family.name


def safe_key(key: str) -> str:
    """A sample key as a relative member name: ``../../x`` -> ``x``, ``/abs/path`` ->
    ``abs/path`` (empty when nothing is left), so output tars never name a path outside
    the folder they are extracted into."""
    return "/".join(p for p in PurePosixPath(key).parts if p not in ("/", "..", "."))


def _raw_samples(shards: str) -> Iterator[dict[str, Any] | str]:
    """The samples of ``shards`` as ``{"__key__": safe key, ext: bytes}``, or the skip
    reason (a str) of a sample or shard that cannot be copied: ``duplicate_member`` (a
    key with the same member twice; training reads such shards up to there),
    ``unsafe_name`` (a key with nothing left after :func:`safe_key`), ``shard_error`` (a
    shard that cannot be read to its end). Empty shards give nothing."""
    from webdataset.tariterators import base_plus_ext, tar_file_expander, url_opener

    for urls, _ in shard_sources(shards, "--shards"):
        check_local_shards(urls, "--shards")
        for url in urls:
            current: dict[str, Any] | None = None
            broken = False
            try:
                for member in tar_file_expander(url_opener([{"url": url}]),
                                                select_files=select_member):  # fmt: skip
                    if "fname" not in member:  # the end-of-shard marker
                        continue
                    key, ext = base_plus_ext(member["fname"])
                    if key is None:
                        continue
                    if current is None or key != current["__key__"]:
                        if current is not None:
                            yield _finished(current, broken)
                        current, broken = {"__key__": key}, False
                    if ext in current:
                        broken = True
                    current[ext] = member["data"]
            except Exception:  # truncated, not a tar, unreadable: what came before stays
                yield "shard_error"
            if current is not None:
                yield _finished(current, broken)


def _finished(sample: dict[str, Any], duplicate: bool) -> dict[str, Any] | str:
    """A read sample with its key made safe, or why it is skipped."""
    if duplicate:
        return "duplicate_member"
    key = safe_key(sample["__key__"])
    return {**sample, "__key__": key} if key else "unsafe_name"


@torch.no_grad()
def write_cached_shards(
    pretrained: str,
    shards: str,
    output: str,
    resolution: int = 512,
    resize_shorter: bool = True,
    hflip: bool = True,
    text: bool = True,
    dtype: str = "fp16",
    batch_size: int = 8,
    device: str = "auto",
    vae_path: str | None = None,
    maxcount: int = 1000,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> dict[str, int]:
    """Copy the samples of ``shards`` to ``output`` with cached latents and text.

    Args:
        pretrained: the teacher (hub id or diffusers folder) whose VAE and text encoder
            the training run would use.
        shards: input shards (a brace pattern, ``::``-joined sources as ``data.train_shards``).
        output: output pattern with a shard number field, e.g. ``cached/train-%06d.tar``.
        resolution, resize_shorter: as the training run's ``data.resolution`` and
            ``data.resize_shorter`` (the data module checks that they match).
        hflip: also store the latents of the mirror image (needed for ``data.hflip``).
        text: also store the caption's text conditioning.
        dtype: storage precision of the latents and text (``fp16``, ``bf16``, ``fp32``).
        batch_size: images per VAE call (images of the same size are batched).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        vae_path: a replacement VAE, as ``model.vae_path``.
        maxcount: samples per output shard.
        max_pixels: refuse larger images (counted as skipped).
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    _check_output(output)  # a shard number field; the folder made
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)  # fmt: skip
    vae, prompt, family = load_encoders(pretrained, vae_path)
    vae.to(dev)
    prompt.to(dev)
    from ..models.builders import vae_downsampling, vae_moments

    grid = vae_downsampling(vae.config)  # pixels per latent (8 for SD)
    if resolution % grid:
        raise ValueError(f"--resolution {resolution} is not a multiple of the VAE's grid ({grid})")
    meta = {"resolution": str(resolution), "resize_shorter": str(bool(resize_shorter)),
            "grid": str(grid), "pretrained": str(pretrained), "family": family}  # fmt: skip
    store = DTYPES[dtype]
    counts: Counter[str] = Counter(written=0)
    clear_partial(output)
    sink: wds.ShardWriter | None = None  # opened for the first sample: no empty tar
    seen: set[str] = set()
    pending: list[tuple[dict[str, Any], Image.Image]] = []

    def flush() -> None:
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, img) in enumerate(pending):
            groups.setdefault(img.size, []).append(i)  # one VAE call per image size
        for rows in groups.values():
            for start in range(0, len(rows), batch_size):
                part = rows[start : start + batch_size]
                images = [pending[i][1] for i in part]
                views = {"": images}
                if hflip:
                    views["flip_"] = [im.transpose(Image.FLIP_LEFT_RIGHT) for im in images]
                latents: dict[str, Tensor] = {}
                for prefix, view in views.items():
                    x = torch.stack([to_tensor01(im) * 2 - 1 for im in view]).to(dev, vae.dtype)
                    latents[prefix + "mean"], latents[prefix + "std"] = vae_moments(vae, x)
                for j, i in enumerate(part):
                    one = {k: v[j].to("cpu", store) for k, v in latents.items()}
                    pending[i][0][LATENTS] = _safetensors(one, meta)
        if text:
            captions = [decode_caption(s.get("txt")) for s, _ in pending]
            for start in range(0, len(pending), batch_size):
                y = prompt.encode(captions[start : start + batch_size], dev)
                for j, (sample, _) in enumerate(pending[start : start + batch_size]):
                    tensors = {"hidden_states": y.hidden_states[j]}
                    tensors |= {f"added.{k}": v[j] for k, v in y.added.items()}
                    sample[TEXT] = _safetensors(
                        {k: v.to("cpu", store) for k, v in tensors.items()}, meta
                    )
        nonlocal sink
        for sample, _ in pending:
            if sink is None:
                sink = shard_writer(output, maxcount)
            sink.write(sample)
            counts["written"] += 1
        pending.clear()

    try:
        for raw in tqdm(_raw_samples(shards), desc="cache", unit="sample", disable=not progress):
            if not isinstance(raw, str) and raw["__key__"] in seen:
                raw = "duplicate_key"  # the same key in two shards (or twice in one)
            if isinstance(raw, str):
                counts[f"skipped_{raw}"] += 1
                continue
            seen.add(raw["__key__"])
            sample = {k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"}
            target = next((k for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
            try:
                if target is None:
                    raise BadSample("no_target", "no target image member")
                image = decode_image(sample[target], max_pixels)
            except BadSample as err:
                counts[f"skipped_{err.reason}"] += 1
                continue
            resized, trimmed = cache_geometry(image.size, resolution, resize_shorter, grid)
            image = resize_bicubic(image, resized)  # the transform's resize
            pending.append((sample, image.crop((0, 0, *trimmed))))
            if len(pending) >= 8 * batch_size:
                flush()
        flush()
    finally:
        if sink is not None:
            sink.close()
    summary = {"written": counts["written"], **{k: v for k, v in counts.items() if k != "written"}}
    print(f"cache: {json.dumps(summary)} -> {output}")
    if not counts["written"]:
        print(f"no shard written to {output}: the input shards held no usable sample")
    return summary
