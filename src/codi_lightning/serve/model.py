"""What the page samples with: a checkpoint or an exported folder, loaded once.

No UI library is imported here: :class:`ServedModel` is the part the page calls, and
what its tests drive directly.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ..checkpoints import CheckpointError, checkpoint_metadata
from ..data.decode import DEFAULT_MAX_PIXELS, BadSample, image_error
from ..data.folder import load_condition
from ..data.pixels import to_image
from ..data.transforms import to_tensor01
from ..diffusion import TilingConfig

STEP_CHOICES = (1, 2, 4, 8)


class InputError(ValueError):
    """An upload the model cannot use; the message is for the page."""


@dataclass
class Result:
    """One sampled image and how long sampling took (seconds, without the upload)."""

    image: Image.Image
    steps: int
    seconds: float


@dataclass
class Defaults:
    """The sampler settings the page starts with: the run's own predict settings."""

    steps: int = 4
    guidance: float = 1.0
    stochastic: bool = False
    prompt: str = ""


class ServedModel:
    """A distilled model behind the page: ``prepare`` turns an upload into the condition
    under predict's size rules, ``generate`` samples it.

    Use :meth:`from_checkpoint` (a ``codi-lightning fit`` checkpoint, sampled as ``predict``
    samples it: the run's weights, tiling and sizes) or :meth:`from_exported` (an
    ``export`` folder plus its base model, through ``CoDiPipeline``). One lock serialises
    sampling: requests from several pages share the one loaded model and each gets its
    own result.
    """

    def __init__(
        self,
        sampler: Any,
        source: str,
        upscale: int = 1,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_output_pixels: int = DEFAULT_MAX_PIXELS,
        defaults: Defaults | None = None,
        device: str = "cpu",
    ) -> None:
        """``sampler(cond, prompt, steps, guidance, stochastic, generator) -> [1, 3, H, W]``
        in [0, 1]."""
        if upscale < 1:
            raise ValueError(f"--upscale {upscale} must be >= 1 (4 for 4x super-resolution)")
        self.sampler, self.source, self.upscale = sampler, source, upscale
        self.max_pixels, self.max_output_pixels = max_pixels, max_output_pixels
        self.defaults, self.device = defaults or Defaults(), torch.device(device)
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(
        cls, ckpt_path: str, pretrained: str | None = None, upscale: int | None = None,
        device: str = "cpu",
    ) -> ServedModel:  # fmt: skip
        """A ``CoDiDistillation`` checkpoint (a file or an FSDP2 folder); ``pretrained``
        replaces the recorded base model. ``upscale`` defaults to the run's
        ``data.predict_upscale`` (else its super-resolution factor, else 1), the size
        limits to its ``data.max_pixels`` and ``data.predict_max_pixels``."""
        from ..training import CoDiDistillation

        checkpoint = checkpoint_metadata(ckpt_path)  # the weights load once, below
        hp = checkpoint.get("hyper_parameters") or {}
        if "method" not in hp or "pretrained" not in hp:
            raise CheckpointError(
                f"{ckpt_path} is not a distillation checkpoint (no model.method): serve "
                "samples CoDi runs (codi-lightning fit --config configs/...)"
            )
        data = checkpoint.get("datamodule_hyper_parameters") or {}
        del checkpoint
        overrides = {"pretrained": pretrained} if pretrained else {}
        module = CoDiDistillation.load_from_checkpoint(ckpt_path, map_location="cpu", **overrides)
        module = module.to(device).eval()
        hp = module.hparams
        if upscale is None:
            upscale = int(data.get("predict_upscale") or 1)
            if upscale == 1 and data.get("condition") == "sr":
                upscale = int(data.get("sr_factor") or 1)
        use_target = hp.eval_weights == "target"

        def sampler(cond, prompt, steps, guidance, stochastic, generator):
            return module.sample_images(cond.to(module.device), [prompt], steps,
                                        use_target=use_target, stochastic=stochastic,
                                        guidance_scale=guidance, generator=[generator])  # fmt: skip

        defaults = Defaults(
            steps=int(hp.predict_steps), guidance=float(hp.eval_guidance_scale),
            stochastic=bool(hp.eval_stochastic), prompt=str(data.get("predict_prompt") or ""),
        )  # fmt: skip
        return cls(
            sampler, str(ckpt_path), upscale,
            max_pixels=int(data.get("max_pixels") or DEFAULT_MAX_PIXELS),
            max_output_pixels=int(data.get("predict_max_pixels") or DEFAULT_MAX_PIXELS),
            defaults=defaults, device=device,
        )  # fmt: skip

    @classmethod
    def from_exported(
        cls, folder: str, pretrained: str, pixel_space: bool | None = None, upscale: int = 1,
        device: str = "cpu",
    ) -> ServedModel:  # fmt: skip
        """An ``export`` folder of ``pretrained`` (SD 1.x/2.x and SDXL families, as
        ``CoDiPipeline``); ``pixel_space`` defaults to whether a local base has no ``vae/``."""
        from ..export import CoDiPipeline

        if not (Path(folder) / "controlnet").is_dir():
            raise FileNotFoundError(
                f"--folder {folder!r} has no controlnet/: give a folder written by "
                "`codi-lightning export` (or --ckpt_path for a checkpoint)"
            )
        if pixel_space is None:
            pixel_space = Path(pretrained).is_dir() and not (Path(pretrained) / "vae").is_dir()
        try:
            pipe = CoDiPipeline.from_exported(folder, pretrained, pixel_space=pixel_space,
                                              device=device)  # fmt: skip
        except NotImplementedError as err:  # a flow family's export: serve its checkpoint
            raise ValueError(f"--folder {folder!r}: {err}") from err
        tiling = TilingConfig()  # large outputs in tiles, as predict's default

        def sampler(cond, prompt, steps, guidance, stochastic, generator):
            return pipe(cond, [prompt], steps, generator=generator, stochastic=stochastic,
                        guidance_scale=guidance, tiling=tiling)  # fmt: skip

        return cls(sampler, str(folder), upscale, device=device)

    def prepare(self, path: str | Path) -> Image.Image:
        """The condition for an uploaded file, as ``predict`` reads it (decoded, size
        checked, scaled by ``upscale``); :class:`InputError` says why a file cannot be used."""
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise InputError(f"could not read the upload ({err.strerror or err})") from err
        try:
            return load_condition(data, self.upscale, self.max_pixels, self.max_output_pixels)
        except BadSample as err:
            if err.reason == "too_large":
                raise InputError(f"this image is too large: {err.detail}") from err
            raise InputError(f"this file is not an image we can read ({err.detail})") from err
        except Exception as err:  # PIL raises many types for truncated or corrupt data
            raise InputError(f"this file is not an image we can read ({image_error(err)})") from err

    def generate(
        self, condition: Image.Image, steps: int, guidance: float = 1.0, seed: int = 0,
        stochastic: bool = False, prompt: str = "",
    ) -> Result:  # fmt: skip
        """Sample ``condition`` (an RGB image from :meth:`prepare`) with ``steps`` steps;
        the same seed gives the same image."""
        if steps < 1:
            raise InputError(f"steps={steps}: at least 1")
        cond = to_tensor01(condition).unsqueeze(0)
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        with self._lock, torch.no_grad():
            start = time.perf_counter()
            out = self.sampler(cond, prompt, int(steps), float(guidance), bool(stochastic),
                               generator)  # fmt: skip
            seconds = time.perf_counter() - start
        return Result(to_pil(out[0]), int(steps), seconds)


def to_pil(image: Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> an 8-bit RGB image, rounded as ``predict``'s PNGs
    (torchvision's ``save_image``)."""
    u8 = image.detach().float().mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    return to_image(u8.cpu())
