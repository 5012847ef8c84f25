"""The few-step sampler of the distillation module, at any size and in tiles (a mixin of
:class:`~codi_lightning.training.module.CoDiDistillation`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor

from ..diffusion import TileGrid, pad_to_multiple, randn, sample, sampling_timesteps, tiled_over
from ..models import Conditioning, ImageSizes, network_multiple, vae_tiles


class Sampling:
    """``sample_images`` and the pieces it runs on."""

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_images(
        self,
        cond: Tensor,
        captions: Sequence[str],
        num_steps: int = 4,
        *,
        use_target: bool = True,
        stochastic: bool = False,
        guidance_scale: float = 1.0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        sizes: ImageSizes | None = None,
    ) -> Tensor:
        """Sample images in [0, 1] for conditions ``cond`` ([B, 3, H, W] in [0, 1]) at the
        condition's size, any height and width: the condition is padded to
        :attr:`pixel_multiple` (reflected), sampled, and the images cropped back. Outputs
        that :attr:`tiling` sends to tiles are sampled in overlapping latent tiles blended
        at every step, with the VAE tiled too (``diffusion.tiling``).

        ``generator`` may be a list, one per sample (row i's noise from generator i).
        ``sizes``: the samples' recorded geometry (default: original = the condition's
        size, no crop)."""
        batch, _, height, width = cond.shape
        if sizes is None:
            sizes = ImageSizes.default(batch, (height, width), self.device)
        text = self.encode_text(captions, sizes)
        which = "target" if use_target else "online"
        cond = pad_to_multiple(cond, self.pixel_multiple)
        grid = self.tile_grid(*cond.shape[-2:]) if self.tiling.wants_tiles(height, width) else None
        embedded = self.embedded_guidance(text, guidance_scale) if guidance_scale != 1 else None
        if embedded is not None:  # a guidance input (Flux-dev): one pass, no CFG
            text, guidance_scale = embedded, 1.0
        with vae_tiles(self.vae, grid, self.vae_scale):
            adapter_cond = self.adapter_condition(cond)
            region = partial(self.region_denoiser, which, cond=adapter_cond, grid=grid,
                             sizes=sizes, size=(height, width))  # fmt: skip
            model = region(text)
            uncond = region(self.unconditional(text)) if guidance_scale != 1.0 else None
            # the latents' channels (Flux's network sees them packed: 4x as many)
            channels = self.vae.config.latent_channels if self.vae is not None else None
            channels = channels or self.network.config.in_channels
            latent = (cond.shape[-2] // self.vae_scale, cond.shape[-1] // self.vae_scale)
            noise = randn((batch, channels, *latent), generator, device=self.device)
            latents = self.run_sampler(
                model, noise, num_steps, stochastic=stochastic, generator=generator,
                uncond_model=uncond, guidance_scale=guidance_scale,
            )  # fmt: skip
            images = self.decode_latents(latents)
        return images[..., :height, :width]

    @property
    def pixel_multiple(self) -> int:
        """Sampled sizes are multiples of this: the VAE factor times the network's own
        multiple (UNet downsampling, transformer patch, Flux's 2x2 packing)."""
        return self.vae_scale * network_multiple(self.network)[0]

    def tile_grid(self, height: int, width: int) -> TileGrid:
        """The latent tiles of a padded ``height`` x ``width`` pixel output, from
        :attr:`tiling` (tile size default: the run's ``data.resolution``)."""
        unit = network_multiple(self.network)[0]
        return self.tiling.grid(height, width, self.vae_scale, unit, self._tile_size)

    def region_denoiser(
        self,
        which: Literal["online", "target", "teacher"],
        text: Conditioning,
        *,
        cond: Tensor,
        grid: TileGrid | None,
        sizes: ImageSizes,
        size: tuple[int, int],
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """:meth:`denoiser` over the whole latent, or over the tiles of ``grid``: each
        tile sees its crop of ``cond`` (the adapter's input) and, for families that embed
        the image geometry (SDXL), its own crop of the ``size`` (height, width) output in
        ``sizes``; the outputs are blended (``diffusion.tiled_denoiser``)."""
        if grid is None:
            return self.denoiser(which, text, cond)

        def tile_model(crop: Tensor, box: tuple[int, int, int, int]):
            return self.denoiser(which, self.prompt_encoder.add_sizes(text, sizes.crop(*box)), crop)

        return tiled_over(tile_model, cond, grid, self.vae_scale, size)

    def run_sampler(
        self,
        model: Callable[[Tensor, Tensor], Tensor],
        noise: Tensor,
        num_steps: int,
        **kwargs: Any,
    ) -> Tensor:
        """The consistency sampler on the training grid (subclasses swap the sampler)."""
        timesteps = sampling_timesteps(
            num_steps, self.schedule.num_train_timesteps, self.hparams.num_grid
        )
        return sample(model, noise, self.schedule, timesteps, **kwargs)
