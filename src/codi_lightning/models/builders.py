"""Load the teacher's parts and build the condition adapter (METHOD.md, "Architecture")."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..diffusion import TileGrid
from ..diffusion.schedule import flow_match_config
from .conditioning import PromptEncoder
from .teachers import TeacherFamily, family_of, family_of_network, read_model_index

DEFAULT_COND_CHANNELS = (16, 32, 96, 256)


@dataclass
class TeacherParts:
    """What a pretrained text-to-image model contributes: all of it stays frozen.

    ``network`` is the denoising network (a ``UNet2DConditionModel``, or a family's
    transformer: ``SD3Transformer2DModel``...); ``prompt_encoder`` is the family's text side (prompts ->
    :class:`Conditioning`); ``family`` is the family's record (``models.teachers``; it
    equals its name, ``sd``, ``sdxl``, ``sd3`` or ``flux``);
    ``vae_upcast``: never run the VAE in fp16 (the SDXL VAE overflows there)."""

    network: nn.Module
    vae: nn.Module | None
    prompt_encoder: PromptEncoder
    scheduler_config: dict[str, Any]
    family: TeacherFamily = field(default_factory=lambda: family_of({}))  # the SD layout
    vae_upcast: bool = False

    @property
    def text_encoder(self) -> nn.Module:
        """The (first) CLIP text encoder."""
        return self.prompt_encoder.text_encoder

    @property
    def tokenizer(self) -> Any:
        """The (first) tokenizer."""
        return self.prompt_encoder.tokenizer

    @property
    def vae_scale(self) -> int:
        """Pixel-to-latent downsampling factor (1 in pixel-space mode)."""
        if self.vae is None:
            return 1
        return vae_downsampling(self.vae.config)

    @property
    def scaling_factor(self) -> float:
        """From the VAE's config (0.18215 SD, 0.13025 SDXL, 1.5305 SD3; 1 in pixel space)."""
        return 1.0 if self.vae is None else float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        """From the VAE's config (SD3: 0.0609; 0 where there is none): latents are
        ``(sample - shift_factor) * scaling_factor``."""
        return 0.0 if self.vae is None else float(self.vae.config.get("shift_factor") or 0.0)


def load_teacher(
    pretrained: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    pixel_space: bool = False,
    torch_dtype: torch.dtype | None = None,
    vae_path: str | None = None,
) -> TeacherParts:
    """Load the network, VAE, text side and scheduler config from a hub id or a local
    diffusers folder (``from_pretrained`` with subfolders). The family (SD 1.x/2.x, SDXL or
    SD3) comes from the folder's ``model_index.json`` (``models.teachers``). ``pixel_space=True``
    skips the VAE: the UNet then works on images in [-1, 1]. Every part is loaded in
    ``torch_dtype`` (default fp32), whatever it was stored in. ``vae_path`` replaces the
    folder's VAE (a VAE folder or hub id, e.g. ``madebyollin/sdxl-vae-fp16-fix``, or a
    pipeline folder with ``vae/``)."""
    import diffusers
    from diffusers import DDPMScheduler

    if pixel_space and vae_path:
        raise ValueError("model.vae_path is given but model.pixel_space is true (no VAE)")
    index = read_model_index(pretrained, revision)
    family = family_of(index)
    kw: dict[str, Any] = {"revision": revision}
    # one dtype for every part, fp32 unless asked: transformers otherwise loads a text
    # encoder in the dtype it was stored in (bf16 for FLUX.1's T5) while diffusers loads fp32
    weights = {**kw, "variant": variant, "torch_dtype": torch_dtype or torch.float32}
    subfolder, network_class = family.network
    try:
        network_type = getattr(diffusers, network_class)
        network = network_type.from_pretrained(pretrained, subfolder=subfolder, **weights)
    except OSError as err:
        raise OSError(
            f"Could not load the teacher's {network_class} from {pretrained!r} (subfolder "
            f"{subfolder!r}). Give a "
            "hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5' with network access "
            "or the path of a local diffusers folder; `codi-lightning` tests use "
            "`codi_lightning.testing.tiny.write_tiny_teacher` to make one."
        ) from err
    channels = int(network.config.in_channels)
    pixels = 3 * family.packed_channels  # Flux packs 2x2 patches
    if pixel_space and channels != pixels:
        raise ValueError(
            f"model.pixel_space is true but the teacher's {network_class} takes {channels}-"
            "channel latents (a latent model with a VAE): set model.pixel_space false"
        )
    local = Path(pretrained).expanduser()
    if not pixel_space and not vae_path and local.is_dir() and not (local / "vae").is_dir():
        raise ValueError(
            f"{pretrained!r} has no vae/ folder (a pixel-space model, {channels}-channel "
            "network?): set model.pixel_space true, or give a VAE with model.vae_path"
        )
    vae = None if pixel_space else load_vae(pretrained, vae_path, weights, family.vae)
    prompt_encoder = family.load_prompt_encoder(pretrained, index, kw, weights)
    scheduler_config = dict(DDPMScheduler.load_config(pretrained, subfolder="scheduler", **kw))
    # a flow teacher's multistep-solver config (SANA) as the flow-match config it implies
    scheduler_config = flow_match_config(scheduler_config) or scheduler_config
    for module in (network, vae, prompt_encoder):
        if module is not None:
            module.requires_grad_(False).eval()
    upcast = vae is not None and family.vae_overflows_in_fp16
    upcast = upcast and bool(vae.config.get("force_upcast", True))
    return TeacherParts(network, vae, prompt_encoder, scheduler_config, family, upcast)


def load_vae(
    pretrained: str, vae_path: str | None, weights: dict[str, Any], vae_class: str = "AutoencoderKL"
) -> nn.Module:
    """The teacher folder's ``vae/``, or the replacement at ``vae_path`` (its own weights:
    the teacher's revision and variant do not apply); ``vae_class``: the family's VAE."""
    import diffusers

    autoencoder = getattr(diffusers, vae_class)
    if not vae_path:
        return autoencoder.from_pretrained(pretrained, subfolder="vae", **weights)
    sub = "vae" if (Path(vae_path).expanduser() / "vae").is_dir() else None
    dtype = {"torch_dtype": weights["torch_dtype"]} if "torch_dtype" in weights else {}
    try:
        return autoencoder.from_pretrained(vae_path, subfolder=sub, **dtype)
    except OSError as err:
        raise OSError(
            f"Could not load the replacement VAE model.vae_path={vae_path!r}: give a VAE "
            "folder (config.json + weights), a pipeline folder with vae/, or a hub id"
        ) from err


@torch.no_grad()
def build_family_adapter(
    parts: TeacherParts,
    conditioning_embedding_out_channels: tuple[int, ...] | None = None,
    condition_init: str = "zero",
    layers: int | None = None,
) -> nn.Module:
    """The family's adapter for ``parts.network``: a ``ControlNetModel`` for UNets
    (:func:`build_adapter`; ``layers`` does not apply), an ``SD3ControlNetModel`` /
    ``FluxControlNetModel`` of ``layers`` blocks for SD3 / Flux (``teachers.sd3`` /
    ``teachers.flux`` ``build_adapter``; the condition enters as latents through a patch
    embedding, zero-initialised or, with ``condition_init="random"``, PyTorch's default
    init: the output projections stay zero either way, so the adapted model equals the
    teacher at step 0; ``conditioning_embedding_out_channels`` does not apply)."""
    family = parts.family
    if family.build_adapter is not None:
        if conditioning_embedding_out_channels:
            raise ValueError(
                f"model.adapter_cond_channels applies to UNet teachers; an {parts.family} "
                "adapter takes the condition as VAE latents: leave it unset (and see "
                "model.adapter_layers)"
            )
        adapter = family.build_adapter(parts.network, layers)
        if condition_init == "random":  # the condition's embedding, as a ControlNet's
            family.condition_embedding(adapter).reset_parameters()  # embedder's last conv
        elif condition_init != "zero":
            raise ValueError(
                f"adapter condition_init={condition_init!r}; choose 'zero' or 'random'"
            )
        return adapter
    if layers is not None:
        raise ValueError(
            "model.adapter_layers applies to transformer teachers (SD3); a UNet's ControlNet "
            "copies its encoder: leave it unset"
        )
    return build_adapter(
        parts.network, parts.vae_scale, conditioning_embedding_out_channels,
        condition_init=condition_init,
    )  # fmt: skip


def adapter_cond_channels(vae_scale: int) -> tuple[int, ...]:
    """Condition-embedder widths whose downsampling 2^(L-1) equals the VAE's factor."""
    levels = int(math.log2(vae_scale)) + 1
    if 2 ** (levels - 1) != vae_scale:
        raise ValueError(f"VAE downsampling factor {vae_scale} is not a power of two")
    base = DEFAULT_COND_CHANNELS + (256,) * max(0, levels - len(DEFAULT_COND_CHANNELS))
    return base[:levels]


def build_adapter(
    unet: nn.Module,
    vae_scale: int,
    conditioning_embedding_out_channels: tuple[int, ...] | None = None,
    conditioning_channels: int = 3,
    condition_init: str = "zero",
) -> nn.Module:
    """ControlNet initialised from the UNet (``ControlNetModel.from_unet``); its zero
    output convolutions make the adapted model equal the teacher at step 0.

    ``condition_init`` sets the last convolution of the condition embedder: ``zero`` as
    in the reference ControlNet code and diffusers, or ``random`` (PyTorch's default
    init), as the ControlNet paper describes its condition encoder ("initialized with
    Gaussian weights"). With ``zero``, no gradient reaches the condition path until the
    output convolutions have grown (two zero factors in a row), one reason a ControlNet
    is slow to start reading its input; ``random`` keeps the model equal
    to the teacher at step 0 (the output convolutions are still zero) but lets the
    adapter's features depend on the condition from the first step. (On the toy
    super-resolution bench the two inits ended 450 CoDi steps within about the seed
    spread of each other: docs/results_photos.md.)
    """
    from diffusers import ControlNetModel

    if condition_init not in ("zero", "random"):
        raise ValueError(
            f"adapter condition_init={condition_init!r}; choose 'zero' (reference ControlNet "
            "code) or 'random' (the ControlNet paper's Gaussian init)"
        )
    channels = conditioning_embedding_out_channels or adapter_cond_channels(vae_scale)
    check_condition_downsampling(tuple(channels), vae_scale)
    adapter = ControlNetModel.from_unet(
        unet,
        conditioning_embedding_out_channels=tuple(channels),
        conditioning_channels=conditioning_channels,
    )
    if condition_init == "random":
        adapter.controlnet_cond_embedding.conv_out.reset_parameters()
    return adapter


def check_condition_downsampling(channels: tuple[int, ...], vae_scale: int) -> None:
    """The condition enters at pixel resolution; its embedder must downsample exactly as
    much as the VAE does, or the adapter fails deep inside with a shape mismatch."""
    factor = 2 ** (len(channels) - 1)
    if factor != vae_scale:
        raise ValueError(
            f"adapter conditioning_embedding_out_channels={channels} downsample the condition "
            f"by {factor}, but the latents are {vae_scale}x smaller than the image. Give "
            f"{len(adapter_cond_channels(vae_scale))} entries, e.g. "
            f"{adapter_cond_channels(vae_scale)}, or leave it unset to derive it."
        )


def network_multiple(unet: nn.Module) -> tuple[int, str]:
    """The multiple of the latent's sides the network takes, and what sets it: the
    UNet's downsampling to its lowest level, a transformer's patch size, or Flux's 2x2
    packing (of 1x1 patches)."""
    return family_of_network(unet).network_multiple(unet.config)


def check_resolution(resolution: int, vae_scale: int, unet: nn.Module) -> None:
    """The image size must reach the UNet's lowest level (a transformer: whole patches)
    as an integer size."""
    unet_down, what = network_multiple(unet)
    need = vae_scale * unet_down
    if resolution % need:
        raise ValueError(
            f"data.resolution={resolution} is not a multiple of {need} (VAE factor {vae_scale} "
            f"x {what} {unet_down}); use e.g. {max(need, resolution // need * need)}."
        )


def vae_downsampling(config: Any) -> int:
    """Pixels per latent of a VAE config: ``2 ** (stages - 1)`` over ``block_out_channels``
    (``AutoencoderKL``) or ``encoder_block_out_channels`` (``AutoencoderDC``)."""
    blocks = config.get("block_out_channels") or config.get("encoder_block_out_channels")
    return 2 ** (len(blocks) - 1)


def vae_moments(vae: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """The mean and standard deviation of the latents of ``images`` in [-1, 1]: the
    posterior of a Gaussian VAE (``latent_dist``, ``AutoencoderKL``), or the latent of a
    deterministic one (``latent``, ``AutoencoderDC``) with zero deviation, so that callers
    draw the same noise either way."""
    out = vae.encode(images)
    dist = getattr(out, "latent_dist", None)
    if dist is None:
        return out.latent, torch.zeros_like(out.latent)
    return dist.mean, dist.std


def _tile_settings(vae: nn.Module, tile: int, vae_scale: int) -> dict[str, Any]:
    """The tiling attributes of ``vae`` for latent tiles of side ``tile``: square tiles
    (``AutoencoderKL``: blending a quarter) or heights and widths with a stride of three
    quarters (``AutoencoderDC``: about the same overlap; whole latents, since its tiled
    encode keeps ``stride // vae_scale`` latents of each tile)."""
    if hasattr(vae, "tile_sample_min_size"):
        return {"tile_latent_min_size": tile, "tile_sample_min_size": tile * vae_scale}
    stride = max(1, tile * 3 // 4) * vae_scale
    return {
        f"tile_{kind}_{side}": value
        for side in ("height", "width")
        for kind, value in (("sample_min", tile * vae_scale), ("latent_min", tile),
                            ("sample_stride", stride))
    }  # fmt: skip


@contextlib.contextmanager
def vae_tiles(vae: nn.Module | None, grid: TileGrid | None, vae_scale: int) -> Iterator[None]:
    """With a tile grid, the VAE encodes and decodes in tiles of the grid's size
    (diffusers' tiling, blending its tiles' borders; an image no larger than a tile is one
    pass). Nothing changes without a grid or a tiling VAE."""
    if grid is None or vae is None or not hasattr(vae, "use_tiling"):
        yield
        return
    settings = {"use_tiling": True, **_tile_settings(vae, grid.tile, vae_scale)}
    saved = {name: getattr(vae, name) for name in settings}
    for name, value in settings.items():
        setattr(vae, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)
