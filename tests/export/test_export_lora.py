"""Export of a PE-CoDi checkpoint with a LoRA of the UNet (``model.lora_rank``): the LoRA
in diffusers' format next to the ControlNet (``pipe.load_lora_weights``), or merged
into ``unet/``; stock pipelines reproduce the module's samples either way."""

import pytest
import torch
from helpers import write_checkpoint
from safetensors.torch import load_file
from test_export import _run_card

from codi_lightning.export import CoDiPipeline, export_checkpoint
from codi_lightning.models.lora import ADAPTER_NAME


@pytest.fixture(scope="module")
def lora_exports(tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    m = write_checkpoint(tiny_teacher, root / "lora.ckpt", scale=0.05, lora_rank=4, lora_alpha=8.0)
    separate = export_checkpoint(str(root / "lora.ckpt"), str(root / "separate"))
    merged = export_checkpoint(str(root / "lora.ckpt"), str(root / "merged"), lora="merge")
    return m, separate, merged


def _deterministic(pipe, folder, cond, prompts, steps):
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler

    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler_deterministic")
    lcm = LCMScheduler.from_pretrained(folder / "scheduler")
    lcm.set_timesteps(steps)
    return pipe(
        prompts, image=cond, timesteps=lcm.timesteps.tolist(), guidance_scale=1.0, height=32,
        width=32, output_type="pt", generator=torch.Generator().manual_seed(steps),
    ).images  # fmt: skip


def test_lora_folder_holds_the_ema_lora_in_diffusers_format(lora_exports):
    m, separate, merged = lora_exports
    assert sorted(p.name for p in separate.iterdir()) == [
        "README.md", "controlnet", "lora", "scheduler", "scheduler_deterministic"
    ]  # fmt: skip
    assert sorted(p.name for p in merged.iterdir()) == [
        "README.md", "controlnet", "scheduler", "scheduler_deterministic", "unet"
    ]  # fmt: skip
    saved = load_file(next((separate / "lora").glob("*.safetensors")))
    want = m.lora.by_network_name(m.target["lora"])  # the EMA target's LoRA
    assert len(saved) == len(want)
    for name, tensor in want.items():
        torch.testing.assert_close(
            saved["unet." + name.replace(f".{ADAPTER_NAME}.", ".")], tensor, rtol=0, atol=0
        )


@pytest.mark.parametrize("layout", ["separate", "merged"])
def test_stock_pipeline_with_the_lora_matches_our_sampler(lora_exports, tiny_teacher, layout):
    """The card's snippet, run as written, loads the export into the stock
    StableDiffusionControlNetPipeline (``load_lora_weights`` on ``lora/``, or the merged
    ``unet/``); with ``scheduler_deterministic/`` it reproduces the module's samples at
    1, 2 and 4 steps, as ``CoDiPipeline.from_exported`` does. Without the LoRA the stock
    pipeline gives other images, so the LoRA is what carries the difference."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    m, separate, merged = lora_exports
    folder = separate if layout == "separate" else merged
    cond = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    prompts = ["a red circle", ""]
    pipe = _run_card(folder, cond[:1])["pipe"]
    ours = CoDiPipeline.from_exported(str(folder), str(tiny_teacher))
    for steps in (1, 2, 4):
        module = m.sample_images(
            cond, prompts, steps, generator=torch.Generator().manual_seed(steps)
        )
        stock = _deterministic(pipe, folder, cond, prompts, steps)
        torch.testing.assert_close(stock, module, rtol=0, atol=1e-5)
        mine = ours(cond, prompts, steps, generator=torch.Generator().manual_seed(steps))
        torch.testing.assert_close(mine, module, rtol=0, atol=1e-5)
    plain = StableDiffusionControlNetPipeline.from_pretrained(
        str(tiny_teacher), controlnet=ControlNetModel.from_pretrained(folder / "controlnet"),
        safety_checker=None, requires_safety_checker=False,
    )  # fmt: skip
    without = _deterministic(plain, folder, cond, prompts, 4)
    assert (without - module).abs().max() > 1e-3


def test_stock_sdxl_pipeline_loads_the_lora(tmp_path):
    """SDXL: the card's StableDiffusionXLControlNetPipeline with ``load_lora_weights``
    and ``scheduler/`` (LCMScheduler) reproduces the module's stochastic sampler."""
    from diffusers import LCMScheduler

    from codi_lightning.testing.tiny import write_tiny_sdxl_teacher

    teacher = write_tiny_sdxl_teacher(tmp_path / "tiny_sdxl")
    m = write_checkpoint(teacher, tmp_path / "x.ckpt", scale=0.05, lora_rank=2)
    out = export_checkpoint(str(tmp_path / "x.ckpt"), str(tmp_path / "export"))
    cond = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    pipe = _run_card(out, cond[:1])["pipe"]
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = LCMScheduler.from_pretrained(out / "scheduler")
    captions = ["a red circle", "a blue square"]
    for steps in (1, 4):
        got = pipe(
            prompt=captions, image=cond, num_inference_steps=steps, guidance_scale=1.0,
            height=32, width=32, output_type="pt", generator=torch.Generator().manual_seed(steps),
        ).images  # fmt: skip
        module = m.sample_images(
            cond, captions, steps, stochastic=True, generator=torch.Generator().manual_seed(steps)
        )
        torch.testing.assert_close(got, module, rtol=0, atol=1e-5)


def test_pixel_space_card_loads_the_lora(tiny_pixel_teacher, tmp_path):
    """A pixel-space model (no stock pipeline): the card's UNet + ControlNet + scheduler
    loop, run as written, loads ``lora/`` into the base UNet and reproduces the module's
    deterministic sampler."""
    from codi_lightning.diffusion import sampling_timesteps

    m = write_checkpoint(tiny_pixel_teacher, tmp_path / "p.ckpt", scale=0.05, pixel_space=True,
                         lora_rank=4)  # fmt: skip
    out = export_checkpoint(str(tmp_path / "p.ckpt"), str(tmp_path / "export"))
    assert (out / "lora").is_dir()
    cond = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    card = _run_card(out, cond)
    for steps in (1, 4):
        stock = card["generate"](cond, ["a red circle", ""], sampling_timesteps(steps, 1000, 20),
                                 card["deterministic"], torch.Generator().manual_seed(steps))  # fmt: skip
        module = m.sample_images(cond, ["a red circle", ""], steps,
                                 generator=torch.Generator().manual_seed(steps))  # fmt: skip
        torch.testing.assert_close(stock, module, rtol=0, atol=1e-5)


def test_a_lora_checkpoint_without_its_lora_is_one_line_on_the_cli(lora_exports, tmp_path):
    """A checkpoint whose hyperparameters say LoRA but whose weights lack it (edited or
    damaged): ``export`` ends in one ``error:`` line naming the file, exit code 2."""
    import subprocess
    import sys
    from pathlib import Path

    _, separate, _ = lora_exports
    state = torch.load(separate.parent / "lora.ckpt", weights_only=True)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if "lora" not in k}
    bad = tmp_path / "no_lora.ckpt"
    torch.save(state, bad)
    cli = str(Path(sys.executable).with_name("codi-lightning"))
    done = subprocess.run([cli, "export", "--ckpt", str(bad), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"error: {bad}: trained with a LoRA" in done.stderr
    assert not (tmp_path / "o").exists()
