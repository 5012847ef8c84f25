"""Export to diffusers folders, stock-diffusers equivalence, and downstream loading."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import stored_in_bf16, write_checkpoint
from safetensors.torch import load_file

from codi_lightning.diffusion import sampling_timesteps
from codi_lightning.export import CoDiPipeline, export_checkpoint

_checkpoint = write_checkpoint  # EMA target != online weights (conftest)


def _same(module, folder):
    file = next(folder.glob("*.safetensors"))
    saved = load_file(file)
    own = module.state_dict()
    assert set(saved) == set(own)
    return all(torch.equal(saved[k], own[k]) for k in own)


def _run_card(folder, condition):
    """Run the model card's Python snippet as written (``condition`` given, the export's
    path for ``THIS_FOLDER``); returns its namespace."""
    card = (folder / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {"condition": condition}
    exec(compile(code.replace("THIS_FOLDER", str(folder)), "README.md", "exec"), namespace)
    return namespace


def _run_size_block(folder, namespace, condition):
    """Run the card's "Any output size" snippet after its usage snippet (``namespace``
    from :func:`_run_card`) on ``condition``; returns the image it makes."""
    card = (folder / "README.md").read_text()
    code = card.split("## Any output size", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace["condition"] = condition
    exec(compile(code, "README.md (any size)", "exec"), namespace)
    return namespace["image"]


@pytest.mark.parametrize("which", ["pe_export", "pixel_export"])
def test_cards_any_size_snippet_is_predicts_rule(which, request):
    """The card's padding snippet, run as written on a 20x44 condition, gives an image of
    that size; for the pixel-space card (the stock deterministic scheduler in a loop)
    it is the module's deterministic sample of the same condition and seed."""
    m, out = request.getfixturevalue(which)[:2]
    namespace = _run_card(out, torch.rand(1, 3, 32, 32))
    cond = torch.rand(1, 3, 20, 44, generator=torch.Generator().manual_seed(4))
    image = _run_size_block(out, namespace, cond)
    assert image.shape == (1, 3, 20, 44)
    if which == "pixel_export":
        mine = m.sample_images(cond, [""], 4, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(image, mine, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def pe_export(tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("pe")
    m = _checkpoint(tiny_teacher, root / "pe.ckpt")
    out = export_checkpoint(str(root / "pe.ckpt"), str(root / "export"))
    return m, out, root


@pytest.fixture(scope="module")
def pixel_export(tiny_pixel_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("pixel")
    m = _checkpoint(tiny_pixel_teacher, root / "pixel.ckpt", pixel_space=True)
    out = export_checkpoint(str(root / "pixel.ckpt"), str(root / "export"))
    return m, out


def test_pe_codi_export_layout(pe_export):
    m, out, root = pe_export
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "controlnet", "scheduler", "scheduler_deterministic"
    ]  # fmt: skip
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt*"))
    assert _same(m.target["controlnet"], out / "controlnet")
    assert not _same(m.controlnet, out / "controlnet")
    online = export_checkpoint(str(root / "pe.ckpt"), str(root / "online"), weights="online")
    assert _same(m.controlnet, online / "controlnet")
    from diffusers import LCMScheduler

    sched = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    assert sched.config.original_inference_steps == 20
    assert "base_model:" in (out / "README.md").read_text()


def test_full_codi_exports_the_unet(tiny_teacher, tmp_path, capsys):
    m = _checkpoint(tiny_teacher, tmp_path / "codi.ckpt", method="codi")
    capsys.readouterr()
    out = export_checkpoint(str(tmp_path / "codi.ckpt"), str(tmp_path / "export"))
    assert _same(m.target["network"], out / "unet")
    assert _same(m.target["controlnet"], out / "controlnet")
    # one line on success: where, which weights, which schedulers
    (line,) = capsys.readouterr().out.splitlines()
    for part in (str(out), "target", "unet/", "scheduler/", "scheduler_deterministic/"):
        assert part in line


def test_an_interrupted_export_never_leaves_a_half_written_folder(pe_export, tmp_path,
                                                                  monkeypatch, capsys):  # fmt: skip
    """export writes into ``.<name>.partial`` and moves it into place when complete: a
    run killed midway (here: while writing the model card, after the weights) leaves
    the earlier export whole; the rerun removes the partial folder, says so, and
    replaces the earlier export."""
    from codi_lightning.export import exporter

    _, _, root = pe_export
    out = tmp_path / "export"
    export_checkpoint(str(root / "pe.ckpt"), str(out))
    (out / "README.md").write_text("the earlier export")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(exporter, "_model_card", killed)
        with pytest.raises(KeyboardInterrupt):
            export_checkpoint(str(root / "pe.ckpt"), str(out))
    partial = tmp_path / ".export.partial"
    assert (partial / "controlnet").is_dir() and not (partial / "README.md").exists()
    assert (out / "README.md").read_text() == "the earlier export"
    capsys.readouterr()
    export_checkpoint(str(root / "pe.ckpt"), str(out))
    assert f"removed the partial export of an interrupted run: {partial}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert "base_model:" in (out / "README.md").read_text()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        export_checkpoint(str(root / "pe.ckpt"), str(tmp_path / "other"))
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_the_card_runs_as_written_on_a_base_model_stored_in_bf16(tiny_teacher, tmp_path):
    """The card loads every part in one dtype (hub models such as FLUX.1 are stored in
    bf16, which transformers keeps for the text encoders and diffusers does not)."""
    base = stored_in_bf16(tiny_teacher, tmp_path / "bf16")
    write_checkpoint(base, tmp_path / "m.ckpt")
    out = export_checkpoint(str(tmp_path / "m.ckpt"), str(tmp_path / "export"))
    image = _run_card(out, torch.rand(1, 3, 32, 32))["image"]
    assert image.size == (32, 32)


def test_export_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        export_checkpoint(str(tmp_path / "missing.ckpt"), str(tmp_path / "o"))


def test_stock_diffusers_pipeline_matches_our_sampler(pe_export, tiny_teacher):
    """StableDiffusionControlNetPipeline + LCMScheduler, loaded the stock way, gives the
    images of our stochastic (consistency multistep) sampler for the same generator:
    LCMScheduler draws the initial latents and one fresh noise per step in the same
    order. Tolerance 1e-5 (fp32, same operations)."""
    from diffusers import ControlNetModel, LCMScheduler, StableDiffusionControlNetPipeline

    m, out, _ = pe_export
    cond = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    prompts = ["a red circle", ""]
    controlnet = ControlNetModel.from_pretrained(out / "controlnet")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        str(tiny_teacher), controlnet=controlnet, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = LCMScheduler.from_pretrained(out / "scheduler")
    pipe.set_progress_bar_config(disable=True)
    ours = CoDiPipeline.from_exported(str(out), str(tiny_teacher))
    for steps in (1, 2, 4):
        stock = pipe(
            prompts, image=cond, num_inference_steps=steps, guidance_scale=1.0, height=32, width=32,
            output_type="pt", generator=torch.Generator().manual_seed(steps),
        ).images  # fmt: skip
        mine = ours(
            cond, prompts, steps, stochastic=True, generator=torch.Generator().manual_seed(steps)
        )
        module = m.sample_images(
            cond, prompts, steps, stochastic=True, generator=torch.Generator().manual_seed(steps)
        )
        torch.testing.assert_close(stock, mine, rtol=0, atol=1e-5)
        torch.testing.assert_close(module, mine, rtol=0, atol=1e-5)
    # the deterministic sampler (eps_hat instead of fresh noise) is not LCMScheduler's
    # (see the next test), but the exported pipeline and the module agree on it
    det = ours(cond, prompts, 4, generator=torch.Generator().manual_seed(0))
    det_module = m.sample_images(cond, prompts, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(det, det_module, rtol=0, atol=1e-5)


def test_non_square_outputs_follow_the_cards_rule(pe_export, tiny_teacher):
    """Any size: the stock pipeline given the reflect-padded condition and the padded
    ``height``/``width`` (the card's rule), cropped back, is what ``CoDiPipeline`` and the
    module return for the unpadded condition; one tile of ``tiling`` changes nothing."""
    import torch.nn.functional as F
    from diffusers import ControlNetModel, LCMScheduler, StableDiffusionControlNetPipeline

    from codi_lightning.diffusion import TilingConfig

    m, out, _ = pe_export
    cond = torch.rand(1, 3, 20, 44, generator=torch.Generator().manual_seed(3))
    multiple = m.pixel_multiple
    ph, pw = -(-20 // multiple) * multiple, -(-44 // multiple) * multiple
    padded = F.pad(cond, (0, pw - 44, 0, ph - 20), mode="reflect")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        str(tiny_teacher), controlnet=ControlNetModel.from_pretrained(out / "controlnet"),
        safety_checker=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.scheduler = LCMScheduler.from_pretrained(out / "scheduler")
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(["a red circle"], image=padded, num_inference_steps=2, guidance_scale=1.0,
                 height=ph, width=pw, output_type="pt",
                 generator=torch.Generator().manual_seed(1)).images[..., :20, :44]  # fmt: skip
    ours = CoDiPipeline.from_exported(str(out), str(tiny_teacher))
    mine = ours(cond, ["a red circle"], 2, stochastic=True,
                generator=torch.Generator().manual_seed(1))  # fmt: skip
    module = m.sample_images(cond, ["a red circle"], 2, stochastic=True,
                             generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert mine.shape == (1, 3, 20, 44)
    torch.testing.assert_close(stock, mine, rtol=0, atol=1e-5)
    torch.testing.assert_close(module, mine, rtol=0, atol=1e-5)
    one_tile = ours(cond, ["a red circle"], 2, stochastic=True, tiling=TilingConfig(mode="on"),
                    generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.equal(one_tile, mine)


def test_stock_deterministic_scheduler_matches_our_sampler(pe_export):
    """The card's StableDiffusionControlNetPipeline with ``scheduler_deterministic/``
    (first-order DPM-Solver++, i.e. DDIM with eps_hat) on the card's timesteps gives the
    images of our default deterministic sampler, at 1, 2, 4 and 8 steps. The boundary
    condition it leaves out has c_skip <= 1e-7 at t >= 149; tolerance 1e-5 (fp32)."""
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler

    m, out, _ = pe_export
    cond = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    prompts = ["a red circle", ""]
    pipe = _run_card(out, cond[:1])["pipe"]  # the snippet runs as written
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_pretrained(out / "scheduler_deterministic")
    card = (out / "README.md").read_text()
    lcm = LCMScheduler.from_pretrained(out / "scheduler")
    for steps in (1, 2, 4, 8):
        lcm.set_timesteps(steps)
        timesteps = lcm.timesteps.tolist()
        assert f"| {steps} | `{timesteps}` |" in card
        stock = pipe(
            prompts, image=cond, timesteps=timesteps, guidance_scale=1.0, height=32, width=32,
            output_type="pt", generator=torch.Generator().manual_seed(steps),
        ).images  # fmt: skip
        module = m.sample_images(
            cond, prompts, steps, stochastic=False, generator=torch.Generator().manual_seed(steps)
        )
        torch.testing.assert_close(stock, module, rtol=0, atol=1e-5)


def test_pixel_space_card_loop_matches_both_samplers(pixel_export):
    """For a pixel-space (v-prediction, no VAE) model the card shows a UNet + ControlNet +
    scheduler loop, not the latent pipeline; run as written, it reproduces the module's
    deterministic sampler with ``scheduler_deterministic/`` and its stochastic one with
    ``scheduler/`` for the same generator."""
    m, out = pixel_export
    cond = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    prompts = ["a red circle", ""]
    card_code = _run_card(out, cond)
    generate = card_code["generate"]
    for steps in (1, 2, 4):
        timesteps = sampling_timesteps(steps, 1000, 20)
        for stochastic, scheduler in ((False, "deterministic"), (True, "stochastic")):
            stock = generate(
                cond, prompts, timesteps, card_code[scheduler], torch.Generator().manual_seed(steps)
            )
            module = m.sample_images(
                cond, prompts, steps, stochastic=stochastic,
                generator=torch.Generator().manual_seed(steps),
            )  # fmt: skip
            torch.testing.assert_close(stock, module, rtol=0, atol=1e-5)


def test_model_card_pairs_scheduler_folders_with_test_settings(pe_export, pixel_export):
    """Each scheduler folder's row in the card names the class saved there, its sampler and
    the ``codi-lightning test`` setting that gives comparable numbers; the usage snippet is
    the stock latent pipeline for a latent model, and not for a pixel-space one (it has
    no VAE)."""
    expected = {
        "scheduler_deterministic": ("deterministic", "--model.eval_stochastic false"),
        "scheduler": ("stochastic", "--model.eval_stochastic true"),
    }
    for out in (pe_export[1], pixel_export[1]):
        card = (out / "README.md").read_text()
        rows = {
            line.split("|")[1].strip(" `/"): line
            for line in card.splitlines()
            if line.startswith("| `scheduler")
        }
        assert set(rows) == set(expected)
        for folder, (sampler, setting) in expected.items():
            saved = json.loads((out / folder / "scheduler_config.json").read_text())
            cells = [c.strip() for c in rows[folder].split("|")]
            assert f"`{saved['_class_name']}`" in cells[2]
            assert cells[3].startswith(sampler)
            assert setting in cells[4]
    assert "StableDiffusionControlNetPipeline" in (pe_export[1] / "README.md").read_text()
    assert "StableDiffusionControlNetPipeline" not in (pixel_export[1] / "README.md").read_text()


def test_load_from_checkpoint_in_a_fresh_process(pe_export):
    _, _, root = pe_export
    code = (
        "import torch\n"
        "from codi_lightning.training import CoDiDistillation\n"
        f"m = CoDiDistillation.load_from_checkpoint({str(root / 'pe.ckpt')!r})\n"
        "x = m.sample_images(torch.rand(1, 3, 32, 32), [''], 2)\n"
        "assert x.shape == (1, 3, 32, 32), x.shape\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


@pytest.fixture(scope="module")
def sdxl_exports(tmp_path_factory):
    """PE-CoDi and full CoDi checkpoints on the tiny SDXL teacher, exported (EMA weights)."""
    from codi_lightning.testing.tiny import write_tiny_sdxl_teacher

    root = tmp_path_factory.mktemp("sdxl")
    teacher = write_tiny_sdxl_teacher(root / "tiny_sdxl")
    exports = {}
    for method in ("pe-codi", "codi"):
        m = _checkpoint(teacher, root / f"{method}.ckpt", method=method)
        exports[method] = (m, export_checkpoint(str(root / f"{method}.ckpt"), str(root / method)))
    return teacher, exports


@pytest.mark.parametrize("method", ["pe-codi", "codi"])
def test_stock_sdxl_controlnet_pipeline_matches_our_sampler(sdxl_exports, method):
    """SDXL: the card's StableDiffusionXLControlNetPipeline (loaded as the snippet does,
    from the base folder plus this export; full CoDi swaps in ``unet/``) with its default
    size conditioning reproduces ``sample_images`` (default ImageSizes: original = target,
    crop (0, 0)) for the same generator: ``scheduler_deterministic/`` on the card's
    timesteps at 1, 2, 4 and 8 steps, with an empty prompt given as zeros as the card
    says; ``scheduler/`` (LCMScheduler) with prompt strings the pipeline encodes itself;
    and classifier-free guidance (the pipeline's zero negative prompt, the module's zero
    empty prompt, the same time_ids in both branches). Tolerance 1e-5 (fp32)."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        LCMScheduler,
        StableDiffusionXLControlNetPipeline,
    )

    from codi_lightning.testing.tiny import TINY_SDXL_POOLED, TINY_SDXL_TEXT_WIDTHS

    teacher, exports = sdxl_exports
    m, out = exports[method]
    assert (out / "unet").is_dir() == (method == "codi")
    if method == "codi":
        assert _same(m.target["network"], out / "unet")
    assert _same(m.target["controlnet"], out / "controlnet")
    cond = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    card = (out / "README.md").read_text()
    assert "StableDiffusionXLControlNetPipeline" in card
    card_code = _run_card(out, cond[:1])  # the snippet runs as written
    pipe = card_code["pipe"]
    assert isinstance(pipe, StableDiffusionXLControlNetPipeline)
    assert set(card_code["text"]) == {"prompt_embeds", "pooled_prompt_embeds"}  # prompt ""
    assert card_code["text"]["prompt_embeds"].shape[-1] == sum(TINY_SDXL_TEXT_WIDTHS)
    assert card_code["text"]["pooled_prompt_embeds"].shape[-1] == TINY_SDXL_POOLED
    pipe.set_progress_bar_config(disable=True)
    seq, _, pooled, _ = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)
    zeros = card_code["text"]
    text = {
        "prompt_embeds": torch.cat([seq, zeros["prompt_embeds"]]),
        "pooled_prompt_embeds": torch.cat([pooled, zeros["pooled_prompt_embeds"]]),
    }
    prompts = ["a red circle", ""]

    def stock(steps, guidance=1.0, **kw):
        return pipe(
            image=cond, guidance_scale=guidance, height=32, width=32, output_type="pt",
            generator=torch.Generator().manual_seed(steps), **kw,
        ).images  # fmt: skip

    def module(steps, stochastic, captions=prompts, guidance=1.0):
        return m.sample_images(
            cond, captions, steps, stochastic=stochastic, guidance_scale=guidance,
            generator=torch.Generator().manual_seed(steps),
        )  # fmt: skip

    pipe.scheduler = DPMSolverMultistepScheduler.from_pretrained(out / "scheduler_deterministic")
    lcm = LCMScheduler.from_pretrained(out / "scheduler")
    for steps in (1, 2, 4, 8):
        lcm.set_timesteps(steps)
        timesteps = lcm.timesteps.tolist()
        assert f"| {steps} | `{timesteps}` |" in card
        got = stock(steps, timesteps=timesteps, **text)
        torch.testing.assert_close(got, module(steps, False), rtol=0, atol=1e-5)
    got = stock(2, 3.0, timesteps=sampling_timesteps(2, 1000, 20), **text)
    torch.testing.assert_close(got, module(2, False, guidance=3.0), rtol=0, atol=1e-5)

    pipe.scheduler = lcm
    ours = CoDiPipeline.from_exported(str(out), str(teacher))
    captions = ["a red circle", "a blue square"]
    for steps in (1, 2, 4):
        got = stock(steps, prompt=captions, num_inference_steps=steps)
        torch.testing.assert_close(got, module(steps, True, captions), rtol=0, atol=1e-5)
        mine = ours(cond, captions, steps, stochastic=True,
                    generator=torch.Generator().manual_seed(steps))  # fmt: skip
        torch.testing.assert_close(got, mine, rtol=0, atol=1e-5)


def test_the_run_record_types_what_export_reads():
    """Export reads a checkpoint's hyperparameters through one typed record: lists become
    tuples of ints, what an older checkpoint lacks takes CoDiDistillation's default, and
    the raw record is kept whole for the model card."""
    import inspect

    from codi_lightning.export.parts import RunRecord
    from codi_lightning.training import CoDiDistillation

    hp = {"pretrained": "/m", "method": "codi", "lora_targets": ["to_q"], "test_steps": [1, 2],
          "guidance_range": [2, 14], "adapter_cond_channels": [16, 32], "extra": 1}  # fmt: skip
    run = RunRecord.of(hp)
    assert run.method == "codi" and run.lora_targets == ("to_q",) and run.test_steps == (1, 2)
    assert run.guidance_range == (2, 14) and run.adapter_cond_channels == (16, 32)
    assert dict(run.raw) == hp
    old = RunRecord.of({"pretrained": "/m"})  # a checkpoint from before these options
    defaults = inspect.signature(CoDiDistillation.__init__).parameters
    for name in ("method", "lora_rank", "num_grid", "pixel_space", "cfg_aware"):
        assert getattr(old, name) == defaults[name].default, name


def test_a_checkpoint_without_its_base_model_names_the_option(tmp_path, tiny_teacher):
    """A checkpoint that records no model.pretrained, alone or with a --pretrained that
    has no VAE for a latent run: a one-line error naming --pretrained, no traceback."""
    from codi_lightning.checkpoints import CheckpointError

    ckpt = tmp_path / "bare.ckpt"
    torch.save({"hyper_parameters": {"method": "pe-codi"}, "state_dict": {}, "global_step": 0,
                "pytorch-lightning_version": "2.6.6"}, ckpt)  # fmt: skip
    with pytest.raises(CheckpointError, match="records no model.pretrained.*--pretrained"):
        export_checkpoint(str(ckpt), str(tmp_path / "a"))
    pixel = tmp_path / "pixel"
    from codi_lightning.testing.tiny import write_tiny_teacher

    write_tiny_teacher(pixel, pixel_space=True)
    with pytest.raises(CheckpointError, match="has no VAE.*--pretrained"):
        export_checkpoint(str(ckpt), str(tmp_path / "b"), pretrained=str(pixel))
