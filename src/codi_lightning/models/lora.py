"""Low-rank updates (LoRA) of the frozen teacher network, through ``peft``.

The parameter-efficient student is the frozen network plus its adapter's residuals and,
optionally, a LoRA of the network itself (as LCM-LoRA, OSEDiff and PiSA-SR train it).
The LoRA layers are injected with diffusers' own peft integration
(``ModelMixin.add_adapter``), so the network is never copied: the teacher pass runs the
same modules with the LoRA scaled to zero (diffusers' ``scale_lora_layers``), the online
student with the LoRA as trained, and the EMA target with the target's copy of the LoRA
weights put in place for that call only (``torch.func.functional_call``).

:class:`LowRankUpdate` holds the injected parameters (the very tensors inside the
network) under its own names, so the optimizer, the EMA update and the checkpoint see
them as one more trained module, ``lora``, next to ``controlnet``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

ADAPTER_NAME = "codi"  # the peft adapter name inside the network
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' file name in an export's lora/

# Layers of a diffusers UNet that take the LoRA: attention projections, feed-forward,
# the transformer blocks' in/out projections, and the convolutions and time projections
# of the residual blocks and resamplers (the layer set LCM-LoRA trains).
UNET_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
# Transformers (SD3, Flux): the attention projections of both streams and the MLPs.
TRANSFORMER_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)


def _key(name: str) -> str:
    """A parameter name of the network as a ``ParameterDict`` key (no dots allowed)."""
    return name.replace(".", "__")


class LowRankUpdate(nn.Module):
    """A LoRA of ``network`` (rank ``rank``, scale ``alpha / rank``) on the layers named
    by ``targets`` (suffixes of module names, as peft matches them). The network keeps
    the layers; this module registers the same parameters as ``weights``.

    ``B`` starts at zero (peft's default), so the student starts as the teacher plus its
    adapter. ``alpha`` defaults to ``rank`` (scale 1)."""

    def __init__(
        self,
        network: nn.Module,
        rank: int,
        targets: Sequence[str],
        alpha: float | None = None,
    ) -> None:
        super().__init__()
        from peft import LoraConfig

        if rank < 1:
            raise ValueError(f"model.lora_rank={rank} must be >= 1 (or 0 for no LoRA)")
        present = {name.rsplit(".", 1)[-1] for name, _ in network.named_modules()}
        full = {name for name, _ in network.named_modules()}
        found = [t for t in targets if t in present or any(n.endswith("." + t) for n in full)]
        if not found:
            raise ValueError(
                f"model.lora_targets={list(targets)}: none names a layer of the "
                f"{type(network).__name__}; give module name suffixes such as 'to_q'"
            )
        config = LoraConfig(
            r=int(rank),
            lora_alpha=float(alpha if alpha is not None else rank),
            target_modules=list(found),
            init_lora_weights=True,  # A: Kaiming uniform, B: zero
        )
        network.add_adapter(config, adapter_name=ADAPTER_NAME)
        network.requires_grad_(False)
        self.names = [n for n, _ in network.named_parameters() if f".{ADAPTER_NAME}." in n]
        params = dict(network.named_parameters())
        self.weights = nn.ParameterDict({_key(n): params[n] for n in self.names})
        for p in self.weights.values():
            p.requires_grad_(True)
        self.rank, self.alpha, self.targets = int(rank), config.lora_alpha, tuple(found)

    def by_network_name(self, weights: nn.ParameterDict | None = None) -> dict[str, Tensor]:
        """``weights`` (default: this module's) keyed by the network's parameter names."""
        weights = self.weights if weights is None else weights
        return {n: weights[_key(n)] for n in self.names}

    @torch.no_grad()
    def to_fp32(self) -> LowRankUpdate:
        """The weights in fp32 in place (the network's own LoRA parameters, shared): the
        master weights of a LoRA trained inside a bf16 network."""
        for p in self.weights.values():
            p.data = p.data.float()
        return self

    def target_copy(self) -> nn.ParameterDict:
        """A detached copy of the weights: the EMA target's LoRA."""
        return nn.ParameterDict(
            {
                k: nn.Parameter(p.detach().clone(), requires_grad=False)
                for k, p in self.weights.items()
            }
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - not called
        raise RuntimeError("LowRankUpdate holds weights; call the network it was added to")


class WithWeights:
    """``network`` called with some of its parameters replaced for the call only
    (``torch.func.functional_call``), e.g. the EMA target's LoRA; attribute access goes
    to the network. The network's own parameters are never written."""

    def __init__(self, network: nn.Module, weights: dict[str, Tensor]) -> None:
        self.network, self.weights = network, weights

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.network, self.weights, args, kwargs, strict=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.network, name)


class WithoutLoRA:
    """``network`` called with its LoRA scaled to zero (the teacher), by diffusers'
    ``scale_lora_layers`` / ``unscale_lora_layers``; the base layers' outputs are then
    returned unchanged (``base + 0 * lora``)."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with lora_off(self.network):
            return self.network(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.network, name)


@contextmanager
def lora_off(network: nn.Module) -> Iterator[None]:
    from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

    scale_lora_layers(network, 0.0)
    try:
        yield
    finally:
        unscale_lora_layers(network, 0.0)  # 0: back to the configured alpha / rank
