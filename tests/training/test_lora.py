"""A LoRA of the frozen teacher network (``model.lora_rank``), through peft.

One network serves three roles: the teacher (LoRA off), the online student (LoRA as
trained) and the EMA target (the target's LoRA weights in place for the call). Each role
is compared with an independent reference: a fresh copy of the teacher network loaded
from disk whose targeted weights are merged longhand, ``W + (alpha / r) B A``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_batch

from codi_lightning.training import CoDiDistillation


def _merged(pristine: torch.nn.Module, lora: dict[str, torch.Tensor], scale: float):
    """``pristine`` with every LoRA pair merged into its base layer, longhand."""
    net = copy.deepcopy(pristine)
    modules = dict(net.named_modules())
    pairs = {}
    for name, tensor in lora.items():
        base, kind = name.split(".lora_")
        pairs.setdefault(base, {})[kind.split(".")[0]] = tensor.detach()
    for base, ab in pairs.items():
        layer = modules[base]
        a, b = ab["A"], ab["B"]  # linear: [r, in], [out, r]; conv: [r, in, k, k], [out, r, 1, 1]
        delta = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
        with torch.no_grad():
            layer.weight += scale * delta.reshape(layer.weight.shape)
    return net


def _randomize(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_teacher_online_and_target_passes_match_longhand_merges(tiny_teacher):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    module = CoDiDistillation(str(tiny_teacher), lora_rank=4, lora_alpha=8.0)
    lora = module.lora
    assert lora is not None and lora.rank == 4
    # every default target layer kind the tiny UNet has took a LoRA, nothing else trains
    assert {"to_q", "to_out.0", "conv1", "conv2", "time_emb_proj"} <= set(lora.targets)
    trained = {id(p) for p in module.parameters() if p.requires_grad}
    assert trained == {id(p) for p in [*module.controlnet.parameters(), *lora.parameters()]}
    assert {id(p) for p in lora.parameters()} <= {id(p) for p in module.network.parameters()}
    # B starts at zero: the student starts as teacher + adapter
    assert all(float(p.detach().abs().max()) == 0 for n, p in lora.weights.items() if "lora_B" in n)

    pristine = UNet2DConditionModel.from_pretrained(tiny_teacher / "unet").eval()
    _randomize(lora.weights.values(), 1)  # online LoRA
    _randomize(module.target["lora"].values(), 2)  # EMA target LoRA, different
    online_before = {k: p.detach().clone() for k, p in lora.weights.items()}

    batch = make_batch(batch=2)
    text = module.batch_conditioning(batch)
    cond = module.adapter_condition(batch["cond"])
    side = 32 // module.vae_scale
    z = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([700, 150])
    fwd, tt = module.family.forward, module.schedule.model_timesteps(t)
    with torch.no_grad():
        got = {w: module.denoiser(w, text, cond)(z, t) for w in ("teacher", "online", "target")}
        want = {
            "teacher": fwd(pristine, None, z, tt, text, cond),
            "online": fwd(
                _merged(pristine, lora.by_network_name(), 2.0), module.controlnet, z, tt, text, cond
            ),  # fmt: skip
            "target": fwd(
                _merged(pristine, lora.by_network_name(module.target["lora"]), 2.0),
                module.target["controlnet"],
                z,
                tt,
                text,
                cond,
            ),  # fmt: skip
        }
    torch.testing.assert_close(got["teacher"], want["teacher"], rtol=0, atol=0)  # bit for bit
    for which in ("online", "target"):
        torch.testing.assert_close(got[which], want[which], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got[which], want["teacher"], atol=1e-3)  # the LoRA acts
    # the target's call left the network's own (online) weights as they were
    for k, p in lora.weights.items():
        assert torch.equal(p, online_before[k])
    # the teacher pass restored the LoRA scale: the online pass is unchanged after it
    with torch.no_grad():
        again = module.denoiser("online", text, cond)(z, t)
    torch.testing.assert_close(again, got["online"], rtol=0, atol=0)


def test_lora_weights_travel_in_the_checkpoint_only_under_lora(tiny_teacher, tmp_path):
    torch.manual_seed(0)
    module = CoDiDistillation(str(tiny_teacher), lora_rank=2)
    _randomize(module.lora.weights.values(), 4)
    state = module.state_dict()
    assert not [k for k in state if k.startswith("unet.")]  # the frozen network stays out
    lora_keys = [k for k in state if k.startswith("lora.weights.")]
    assert len(lora_keys) == len(module.lora.names) > 0
    assert len([k for k in state if k.startswith("target.lora.")]) == len(lora_keys)
    torch.manual_seed(1)
    fresh = CoDiDistillation(str(tiny_teacher), lora_rank=2)
    fresh.load_state_dict(state)
    for name in module.lora.names:  # loaded into the network's own layers
        got = dict(fresh.network.named_parameters())[name]
        torch.testing.assert_close(
            got, dict(module.network.named_parameters())[name], rtol=0, atol=0
        )


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"lora_rank": 4, "method": "codi"}, "model.method=pe-codi"),
        ({"lora_rank": -1}, "model.lora_rank=-1"),
        ({"lora_rank": 4, "lora_targets": ["no_such_layer"]}, "none names a layer"),
    ],
)
def test_bad_lora_options_name_the_fix(tiny_teacher, kwargs, words):
    with pytest.raises(ValueError, match=words):
        CoDiDistillation(str(tiny_teacher), **kwargs)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "sana"])
def test_lora_on_every_family_leaves_the_teacher_pass_exact(family, request):
    """Each family's network takes the LoRA on its default layers; the teacher pass (LoRA
    off) is the pristine network's output bit for bit, the online pass differs, and the
    loss of a training step is finite with gradients on the LoRA."""
    teacher = request.getfixturevalue(f"tiny_{family}_teacher")
    torch.manual_seed(0)
    shift = {"shift_resolution": 32} if family == "flux" else {}  # Flux: size-dependent shift
    module = CoDiDistillation(str(teacher), lora_rank=2, num_grid=10, **shift)
    pristine = copy.deepcopy(module.network)
    for layer in pristine.modules():  # the reference: LoRA layers without their LoRA
        if hasattr(layer, "base_layer"):
            layer.forward = layer.base_layer.forward
    _randomize(module.lora.weights.values(), 5)
    batch = make_batch(batch=2)
    if family == "sdxl":
        batch.update(original_size=torch.tensor([[32, 32]] * 2),
                     crop_top_left=torch.tensor([[0, 0]] * 2))  # fmt: skip
    text = module.batch_conditioning(batch)
    cond = module.adapter_condition(batch["cond"])
    channels = module.network.config.in_channels
    if family == "flux":
        channels //= 4  # packed 2x2 latents: the module's own latent channels
    side = 32 // module.vae_scale
    z = torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([700, 150])
    with torch.no_grad():
        got = module.denoiser("teacher", text, cond)(z, t)
        want = module.family.forward(
            pristine, None, z, module.schedule.model_timesteps(t), text, cond
        )
        online = module.denoiser("online", text, cond)(z, t)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(online, got, atol=1e-4)
    loss, _ = module.compute_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in module.lora.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().max() > 0 for g in grads)
