"""The teacher's inputs and outputs for the LightningModules: the network and its adapter
called the family's way, the condition as the adapter takes it, the text conditioning
(y; from captions, a text cache or the empty prompt), images to latents and back
(METHOD.md, "Notation").

A mixin: the class provides ``family``, ``schedule``, ``vae`` (None in pixel space),
``prompt_encoder`` (the family's ``PromptEncoder``), ``scaling_factor``, ``shift_factor``,
``vae_upcast``, ``_empty_text`` and :meth:`rank_slice_randn` (``RankRandomness``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..models import Conditioning, ImageSizes
from ..models.builders import vae_moments
from .run import check_float_pixels


class TeacherIO:
    """Calls of the teacher's parts, shared by the distillation, the baseline and
    ``DiffusionTraining`` (and, through the family's ``forward``, ``CoDiPipeline``)."""

    def _controlled(
        self,
        network: nn.Module,
        controlnet: nn.Module | None,
        z: Tensor,
        t: Tensor,
        text: Conditioning,
        cond: Tensor,
    ) -> Tensor:
        """F(z_t, t, y, c): the network with the adapter's residuals (no adapter: the
        teacher), called the family's way (``models.teachers``) and fed the schedule's
        network timestep for the training timestep ``t`` (flow: ``1000 sigma_t``). ``cond``
        is what :meth:`adapter_condition` made of the condition.

        Parts of mixed dtypes (bf16 frozen parts, ``frozen_dtype``, beside the fp32
        adapter) called outside autocast (sampling from a loaded checkpoint, no trainer)
        run under autocast to the lower precision, as ``bf16-mixed`` runs them in a
        trainer; the output is then fp32."""
        timestep = self.schedule.model_timesteps(t)
        dtype = mixed_dtype(network, controlnet, z, text)
        if dtype is None or torch.is_autocast_enabled(z.device.type):
            return self.family.forward(network, controlnet, z, timestep, text, cond)
        with torch.autocast(z.device.type, dtype=dtype):
            out = self.family.forward(network, controlnet, z, timestep, text, cond)
        return out.float()

    @torch.no_grad()
    def adapter_condition(self, cond: Tensor) -> Tensor:
        """The condition c (pixels in [0, 1]) as the adapter takes it: as is for a
        ControlNet; for the SD3 family's adapter VAE latents ``(mean - shift) * scale`` of
        c in [-1, 1] (the stock SD3 ControlNet pipeline encodes it the same way but takes a
        posterior sample; the mean keeps the condition a deterministic input); in pixel
        space c in [-1, 1]."""
        check_float_pixels(cond, "cond")
        if not self.family.latent_condition:
            return cond
        if self.vae is None:  # pixel space: the condition in the images' range
            return cond * 2 - 1
        with self.vae_precision():
            mean, _ = vae_moments(self.vae, (cond * 2 - 1).to(self.vae.dtype))
        return (mean.float() - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str], sizes: ImageSizes | None = None) -> Conditioning:
        """y for ``captions`` (SD: CLIP last hidden states [B, L, D]; SDXL: both encoders
        and the pooled embedding), with the conditions the family derives from ``sizes``
        (SDXL's ``time_ids``; none for SD)."""
        text = self.prompt_encoder.encode_distinct(captions, self.device)
        return text if sizes is None else self.prompt_encoder.add_sizes(text, sizes)

    def batch_conditioning(self, batch: dict[str, Any]) -> Conditioning:
        """y for a batch: its captions and recorded image sizes (:meth:`ImageSizes.from_batch`).

        Cached text conditioning (``batch["text"]``, data/cache.py) replaces the text
        encoder; rows whose caption is empty (dropped by ``caption_dropout``) get the
        empty prompt's, as the text encoder would give them."""
        sizes = ImageSizes.from_batch(batch)
        cached = batch.get("text")
        if cached is None:
            return self.encode_text(batch["caption"], sizes)
        dtype = self.prompt_encoder.dtype
        text = Conditioning(
            cached["hidden_states"].to(self.device, dtype),
            {k[len("added.") :]: v.to(self.device, dtype) for k, v in cached.items()
             if k.startswith("added.")},
        )  # fmt: skip
        empty = [i for i, c in enumerate(batch["caption"]) if not c]
        if empty:
            rows = torch.tensor(empty, device=self.device)
            blank = self.empty_text(len(empty))
            text = Conditioning(
                text.hidden_states.index_copy(0, rows, blank.hidden_states.to(dtype)),
                {k: v.index_copy(0, rows, blank.added[k].to(dtype)) for k, v in text.added.items()},
            )
        return self.prompt_encoder.add_sizes(text, sizes)

    def empty_text(self, batch: int) -> Conditioning:
        """The empty prompt's text conditioning, computed once per device, ``batch`` rows."""
        if self._empty_text is None or self._empty_text.hidden_states.device != self.device:
            self._empty_text = self.encode_text([""])
        return self._empty_text.expand(batch)

    @torch.no_grad()
    def cache_spec(self) -> dict[str, dict[str, tuple[int | None, ...]]]:
        """The shapes this teacher's VAE and text encoder make, which cached shards must
        have (``data.decode.check_cached``): latent channels; the text sequence's length
        and width and each added embedding's (one empty prompt encoded to find them)."""
        spec: dict[str, dict[str, tuple[int | None, ...]]] = {}
        if self.vae is not None:
            channels = int(self.vae.config.latent_channels)
            spec["latents"] = {"mean": (channels,), "std": (channels,)}
        y = self.prompt_encoder.encode([""], "cpu" if self._trainer is None else self.device)
        spec["text"] = {"hidden_states": tuple(y.hidden_states.shape[1:])}
        spec["text"].update({f"added.{k}": tuple(v.shape[1:]) for k, v in y.added.items()})
        return spec

    @staticmethod
    def embedded_guidance(text: Conditioning, w: float) -> Conditioning | None:
        """``text`` with its guidance input set to ``w`` when the family feeds the guidance
        scale to the network (Flux-dev: ``added["guidance"]``), else None (guidance is
        then two passes)."""
        if "guidance" not in text.added:
            return None
        scale = torch.full_like(text.added["guidance"], float(w))
        return Conditioning(text.hidden_states, {**text.added, "guidance": scale})

    def unconditional(self, like: Conditioning) -> Conditioning:
        """The guidance branch for ``like``: the empty prompt with ``like``'s non-text
        conditions (SDXL: the same ``time_ids``, as the stock pipeline)."""
        return like.with_text(self.empty_text(len(like)))

    @contextlib.contextmanager
    def vae_precision(self) -> Iterator[None]:
        """For VAEs that overflow in fp16 (``vae_upcast``: the stock SDXL VAE), run outside
        autocast in the VAE's own dtype (fp32, or bf16 with ``frozen_dtype``), moving an
        fp16 VAE (``precision=16-true``) to fp32 once. Other VAEs run as the precision
        plugin sets."""
        if not self.vae_upcast:
            yield
            return
        if self.vae.dtype == torch.float16:
            self.vae.float()
        with torch.autocast(self.device.type, enabled=False):
            yield

    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x: images in [-1, 1] -> latents times ``scaling_factor`` (identity in pixel space).

        The posterior sample's noise comes from :meth:`rank_slice_randn`, so a run on N
        processes draws what one process with the global batch would."""
        if self.vae is None:
            return images.float()
        with self.vae_precision():
            mean, std = vae_moments(self.vae, images.to(self.vae.dtype))
        eps = self.rank_slice_randn(mean.shape, generator)
        sample = mean.float() + std.float() * eps
        return (sample - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def batch_latents(self, batch: dict[str, Any], generator: torch.Generator | None) -> Tensor:
        """x for a batch: :meth:`encode_images` of its images, or, when the batch carries
        cached posteriors (``latent_mean``/``latent_std``, data/cache.py), the same sample
        ``(mean + std * eps) * scaling_factor`` from the same noise, without the VAE."""
        if "latent_mean" not in batch:
            return self.encode_images(check_float_pixels(batch["image"], "image"), generator)
        if self.vae is None:
            raise ValueError(
                "the batch carries cached latents but the model works in pixel space "
                "(model.pixel_space=true): train on the uncached shards"
            )
        mean, std = batch["latent_mean"].float(), batch["latent_std"].float()
        eps = self.rank_slice_randn(mean.shape, generator)
        return (mean + std * eps - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents -> images in [0, 1]."""
        if self.vae is not None:
            with self.vae_precision():
                latents = latents.float() / self.scaling_factor + self.shift_factor
                latents = self.vae.decode(latents.to(self.vae.dtype)).sample
        return ((latents.float() + 1) / 2).clamp(0, 1)


def mixed_dtype(
    network: Any, adapter: nn.Module | None, z: Tensor, text: Conditioning
) -> torch.dtype | None:
    """The lowest-precision floating dtype among a call's network, adapter, latents and
    text when they differ (e.g. bf16 frozen parts with an fp32 adapter), else None.
    ``network`` may be a wrapper (``WithWeights``, ``WithoutLoRA``) that forwards
    ``parameters``."""
    dtypes = {z.dtype, text.hidden_states.dtype}
    for module in (network, adapter):
        if module is not None:
            dtypes.add(next(iter(module.parameters())).dtype)
    if len(dtypes) == 1:
        return None
    return min(dtypes, key=lambda d: torch.finfo(d).bits)
