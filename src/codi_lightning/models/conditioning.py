"""The teacher-family interface of the text side: prompts (and image sizes) in, one
:class:`Conditioning` out, passed to the UNet and the adapter as keyword arguments.

The LightningModule only ever handles :class:`Conditioning` objects (index, concatenate,
expand them for batching and classifier-free guidance); what a family puts in them lives
in its :class:`PromptEncoder` (``models/teachers``). SD 1.x/2.x: the CLIP sequence and no
added conditions. SDXL: the two encoders' penultimate hidden states side by side, plus
``added_cond_kwargs`` ``text_embeds`` (pooled) and ``time_ids`` (image sizes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Conditioning:
    """y: everything besides the image condition that the networks see, per sample.

    Attributes:
        hidden_states: the text sequence [B, L, D] (``encoder_hidden_states``).
        added: per-sample ``added_cond_kwargs`` (each [B, ...]); empty for SD 1.x/2.x,
            ``text_embeds`` [B, P] and ``time_ids`` [B, 6] for SDXL.
    """

    hidden_states: Tensor
    added: Mapping[str, Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, text: Conditioning | Tensor) -> Conditioning:
        """Accept a bare text embedding [B, L, D] where a conditioning is expected."""
        return text if isinstance(text, Conditioning) else cls(text)

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def _map(self, fn) -> Conditioning:
        return Conditioning(fn(self.hidden_states), {k: fn(v) for k, v in self.added.items()})

    def __getitem__(self, rows: int | slice | Tensor | Sequence[int]) -> Conditioning:
        """Rows of the batch (an int keeps the batch axis)."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        return self._map(lambda v: v[rows])

    def to(self, dtype: torch.dtype) -> Conditioning:
        """Floating-point tensors cast to ``dtype`` (masks and other integer tensors kept)."""
        return self._map(lambda v: v.to(dtype) if v.is_floating_point() else v)

    def expand(self, batch: int) -> Conditioning:
        """A one-row conditioning repeated to ``batch`` rows (a view, no copy)."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a conditioning of {len(self)} rows to {batch}")
        return self._map(lambda v: v.expand(batch, *v.shape[1:]))

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch axis (e.g. conditional and unconditional rows)."""
        keys = set(items[0].added)
        if any(set(c.added) != keys for c in items):
            raise ValueError("cannot concatenate conditionings with different added conditions")
        return Conditioning(
            torch.cat([c.hidden_states for c in items]),
            {k: torch.cat([c.added[k] for c in items]) for k in items[0].added},
        )

    def with_text(self, text: Conditioning) -> Conditioning:
        """``text``'s sequence and added conditions, with this one's other added conditions
        (SDXL: the empty prompt's embeddings with this batch's ``time_ids``): what the
        unconditional branch of classifier-free guidance sees."""
        return Conditioning(text.hidden_states, {**self.added, **text.added})

    def network_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``UNet2DConditionModel`` and ``ControlNetModel``."""
        return {
            "encoder_hidden_states": self.hidden_states,
            "added_cond_kwargs": dict(self.added) if self.added else None,
        }


@dataclass(frozen=True)
class ImageSizes:
    """Per-sample image geometry, as int tensors [B, 2] of (height, width) / (top, left):
    the stored image's size before resizing, the top-left corner of the crop (in the
    resized image) and the size the model generates. SDXL embeds them (``time_ids``);
    other families ignore them."""

    original_size: Tensor
    crop_top_left: Tensor
    target_size: Tensor

    @classmethod
    def default(cls, batch: int, target: tuple[int, int], device=None) -> ImageSizes:
        """No record of the sizes: original = target size, no crop."""
        size = torch.tensor([list(target)] * batch, dtype=torch.long, device=device)
        return cls(size, torch.zeros_like(size), size.clone())

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any]) -> ImageSizes:
        """From ``batch["original_size"]`` and ``batch["crop_top_left"]`` (the data module
        records them where it crops); the target size is the condition's (pixel) size.
        Missing fields (predict on a folder, older shards) default to original = target
        and crop (0, 0)."""
        cond = batch["cond"]
        sizes = cls.default(cond.shape[0], tuple(cond.shape[-2:]), cond.device)
        original, crop = batch.get("original_size"), batch.get("crop_top_left")
        return cls(
            sizes.original_size if original is None else original.to(cond.device).long(),
            sizes.crop_top_left if crop is None else crop.to(cond.device).long(),
            sizes.target_size,
        )

    def crop(self, top: int, left: int, height: int, width: int) -> ImageSizes:
        """The geometry of the ``height`` x ``width`` crop at ``(top, left)`` of the
        generated image (a tile of a tiled sample): the same original size, the crop's
        corner added to the recorded one, the crop's size as the target."""
        offset = self.crop_top_left.new_tensor([top, left])
        target = self.target_size.new_tensor([height, width]).expand_as(self.target_size)
        return ImageSizes(self.original_size, self.crop_top_left + offset, target.clone())

    def __getitem__(self, rows: slice) -> ImageSizes:
        return ImageSizes(
            self.original_size[rows], self.crop_top_left[rows], self.target_size[rows]
        )


class PromptEncoder(nn.Module):
    """A family's frozen text side: ``encode`` turns prompts into a :class:`Conditioning`
    and ``add_sizes`` adds what the family derives from the image geometry (nothing by
    default). Subclasses are built by the family's loader (``models/teachers``)."""

    def encode(self, prompts: Sequence[str], device: torch.device | str) -> Conditioning:
        raise NotImplementedError

    def encode_distinct(self, prompts: Sequence[str], device: torch.device | str) -> Conditioning:
        """:meth:`encode` of each distinct prompt once, its rows repeated where the prompt
        repeats. Every family pads its tokens to a fixed length, so a prompt's row does
        not depend on the rest of the batch; a batch of one repeated caption (empty
        captions, a task prompt) then costs one encode (SANA's prompts carry an
        instruction of about a thousand tokens)."""
        prompts = list(prompts)
        distinct = list(dict.fromkeys(prompts))
        if len(distinct) == len(prompts):
            return self.encode(prompts, device)
        rows = {p: i for i, p in enumerate(distinct)}
        index = torch.tensor([rows[p] for p in prompts], device=device)
        return self.encode(distinct, device)[index]

    def add_sizes(self, cond: Conditioning, sizes: ImageSizes) -> Conditioning:
        return cond

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def tokenize(tokenizer, prompts: Sequence[str]) -> Tensor:
    """Token ids [B, L], padded to the tokenizer's maximum length (as SD pipelines do)."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
