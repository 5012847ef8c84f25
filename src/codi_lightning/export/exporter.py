"""Lightning checkpoint -> diffusers folders (``codi-lightning export``).

Writes ``controlnet/`` (EMA target weights by default), ``unet/`` when the UNet was
trained (full CoDi), two stock diffusers schedulers and a ``README.md`` model card.
Safetensors only. Needs the checkpoint and access to the base model recorded in it (for
configs, not weights). The card's usage snippet loads the folder into the stock pipeline
of the base model's family: ``StableDiffusionControlNetPipeline`` (SD 1.x/2.x),
``StableDiffusionXLControlNetPipeline`` (SDXL; its size conditioning defaults, original =
target size and crop (0, 0), are what ``codi-lightning`` samples with when no sizes are
recorded), ``StableDiffusion3ControlNetPipeline`` (SD3 family) or ``FluxControlNetPipeline``
(Flux; both in ``export/flow.py``).

The schedulers reproduce the two samplers of ``diffusion.sample`` (METHOD.md, "Sampling"):

- ``scheduler/``: ``LCMScheduler`` carrying the training grid N as
  ``original_inference_steps``: the stochastic consistency multistep sampler (fresh noise
  each step), ``stochastic=True`` / ``model.eval_stochastic: true``.
- ``scheduler_deterministic/``: first-order ``DPMSolverMultistepScheduler``
  (``dpmsolver++``, final sigma zero), which is the DDIM step
  ``z <- alpha_next x_hat + sigma_next eps_hat`` and ``x_hat`` after the last step: the
  deterministic sampler (the default, ``model.eval_stochastic: false``) when given the
  same timesteps as ``timesteps=`` (``LCMScheduler.set_timesteps`` picks them; DPMSolver's
  own spacing differs). It leaves out the boundary condition, whose ``c_skip(t) =
  0.25 / ((10 t)^2 + 0.25)`` is 6.9e-6 at t = 19, N = 50's smallest grid point.
  (``TCDScheduler`` with ``eta=0`` picks the right timesteps but ends at ``t = 0``, not
  at ``x_hat``; ``DDIMScheduler`` cannot take the grid's timesteps.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from ..checkpoints import STATE_PREFIXES, CheckpointError, check_teacher, read_checkpoint
from ..diffusion import sampling_timesteps
from ..models import adapter_cond_channels, check_condition_downsampling
from ..models.builders import vae_downsampling
from ..models.lora import LORA_FILE
from ..models.teachers import TeacherFamily, family_of, read_model_index
from .flow import export_flow
from .parts import (
    RunRecord,
    any_size_section,
    card_budgets,
    fused_network,
    lora_metadata,
    lora_state,
    render_card,
    sub_state,
    unweighted,
)

EXPORT_ENTRIES = {"README.md", "controlnet", "unet", "lora", "transformer", "scheduler",
                  "scheduler_deterministic"}  # fmt: skip


def _partial_folder(output: str) -> Path:
    """A fresh ``.<name>.partial`` folder beside ``output`` to write the export into
    (one left by an interrupted run is removed, and said). ``output`` must be new, empty
    or an earlier export (which the finished export replaces), never a folder of other
    files."""
    final = Path(output)
    if final.is_file() or (
        final.is_dir() and not {p.name for p in final.iterdir()} <= EXPORT_ENTRIES
    ):
        raise ValueError(
            f"--output {output!r} holds other files: give a new or empty folder (an earlier "
            "export there is replaced)"
        )
    partial = final.with_name(f".{final.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
        print(f"removed the partial export of an interrupted run: {partial}")
    partial.mkdir(parents=True)
    return partial


def _publish_folder(partial: Path, output: str) -> Path:
    """Move the complete export to ``output`` (replacing an earlier export there), so an
    interrupted export never leaves a half-written folder under its name."""
    final = Path(output)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old)
    else:
        os.replace(partial, final)
    return final


def export_checkpoint(
    ckpt: str,
    output: str,
    weights: Literal["target", "online"] = "target",
    pretrained: str | None = None,
    lora: Literal["separate", "merge"] = "separate",
) -> Path:
    """Export a CoDi Lightning checkpoint to diffusers folders.

    Args:
        ckpt: Lightning checkpoint written by ``codi-lightning fit``: a file, or a
            distributed-checkpoint folder (FSDP2).
        output: folder to write (``controlnet/``, ``unet/``, ``scheduler/``,
            ``scheduler_deterministic/``, ``README.md``); one line on stdout says what.
        weights: ``target`` (EMA, what validation samples with) or ``online``.
        pretrained: base model to read configs from, if not the one recorded in the
            checkpoint (e.g. the same model at another path).
        lora: a checkpoint with a LoRA of the network (``model.lora_rank``): ``separate``
            writes it to ``lora/`` in the format ``pipe.load_lora_weights`` loads, next
            to the ControlNet (the base network stays shared); ``merge`` writes
            ``unet/``, the base network's weights with the LoRA merged in (this reads
            the base model's weights).
    """
    from diffusers import (
        ControlNetModel,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        LCMScheduler,
        UNet2DConditionModel,
    )

    if weights not in ("target", "online"):
        raise ValueError(f"--weights {weights!r}; choose 'target' or 'online'")
    if lora not in ("separate", "merge"):
        raise ValueError(f"--lora {lora!r}; choose 'separate' or 'merge'")
    checkpoint = read_checkpoint(ckpt, mmap=True)
    run = RunRecord.of(checkpoint["hyper_parameters"])
    base = pretrained or run.pretrained
    if not base:
        raise CheckpointError(
            f"{ckpt}: records no model.pretrained (not a checkpoint of a codi-lightning "
            "distillation run?): pass the base model with --pretrained PATH"
        )
    check_teacher(base, "--pretrained PATH")
    state = checkpoint["state_dict"]
    kw = {"revision": run.revision}
    index = read_model_index(base, run.revision)
    family = family_of(index)
    lora_weights = lora_state(state, run, weights, ckpt)
    if family.flow_export is not None:
        out = _partial_folder(output)
        step = checkpoint.get("global_step", 0)
        which = export_flow(family, run, state, base, out, weights, step, kw, lora_weights, lora)
        out = _publish_folder(out, output)
        print(
            f"exported {weights} weights ({which}) to {out}; schedulers: scheduler/ "
            "(FlowMatchLCMScheduler, stochastic) and scheduler_deterministic/ "
            "(FlowMatchEulerDiscreteScheduler, deterministic)",
            flush=True,
        )
        return out
    # SDXL: the module encodes an empty prompt as zeros when the base model says so
    zero_empty = bool(index.get("force_zeros_for_empty_prompt", True))
    unet_config = UNet2DConditionModel.load_config(base, subfolder="unet", **kw)
    # the networks are built without weights and take the checkpoint's (memory-mapped)
    # tensors as they are: no weights are allocated twice (an fp32 SDXL UNet is 10.3 GB;
    # the export of an SDXL checkpoint was killed at 23.8 GB without this)
    unet = unweighted(UNet2DConditionModel.from_config, unet_config)
    vae_scale = 1
    if not run.pixel_space:
        import diffusers

        try:
            vae_config = getattr(diffusers, family.vae).load_config(base, subfolder="vae", **kw)
        except OSError as err:
            raise CheckpointError(
                f"{ckpt} was trained in latent space but {base!r} has no VAE (vae/): give "
                "the base model it was trained on with --pretrained PATH"
            ) from err
        vae_scale = vae_downsampling(vae_config)
    channels = tuple(run.adapter_cond_channels or adapter_cond_channels(vae_scale))
    check_condition_downsampling(channels, vae_scale)

    out = _partial_folder(output)
    controlnet = unweighted(
        ControlNetModel.from_unet, unet, conditioning_embedding_out_channels=channels,
        load_weights_from_unet=False,
    )  # fmt: skip
    prefix = STATE_PREFIXES["adapter"][weights]
    controlnet.load_state_dict(sub_state(state, prefix), strict=True, assign=True)
    controlnet.save_pretrained(out / "controlnet", safe_serialization=True)
    if run.method == "codi":
        prefix = STATE_PREFIXES["network"][weights]
        unet.load_state_dict(sub_state(state, prefix), strict=True, assign=True)
        unet.save_pretrained(out / "unet", safe_serialization=True)
    if lora_weights and lora == "merge":
        merged = fused_network(UNet2DConditionModel, base, "unet", lora_weights, run, kw)
        merged.save_pretrained(out / "unet", safe_serialization=True)
    elif lora_weights:
        import diffusers

        getattr(diffusers, family.lora_saver).save_lora_weights(
            out / "lora",
            weight_name=LORA_FILE,
            unet_lora_layers={k[len("unet.") :]: v for k, v in lora_weights.items()},
            unet_lora_adapter_metadata=lora_metadata(run),
        )

    scheduler_config = DDPMScheduler.load_config(base, subfolder="scheduler", **kw)
    lcm = LCMScheduler.from_config(
        scheduler_config,
        original_inference_steps=run.num_grid,
        timestep_scaling=10.0,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    lcm.save_pretrained(out / "scheduler")
    # first-order DPM-Solver++ = DDIM with eps_hat, x_hat at the end (see the module doc)
    deterministic = DPMSolverMultistepScheduler.from_config(
        {k: v for k, v in scheduler_config.items() if k in _SCHEDULE_KEYS},
        solver_order=1,
        algorithm_type="dpmsolver++",
        final_sigmas_type="zero",
        timestep_spacing="trailing",
    )
    deterministic.save_pretrained(out / "scheduler_deterministic")
    num_train = int(lcm.config.num_train_timesteps)
    step = checkpoint.get("global_step", 0)
    folders = {d for d in ("unet", "lora") if (out / d).is_dir()}
    card = _model_card(
        run, base, weights, step, num_train, family, unet, zero_empty, vae_scale, folders
    )
    (out / "README.md").write_text(card)
    which = " + ".join(f"{d}/" for d in ("unet", "lora", "controlnet") if (out / d).is_dir())
    out = _publish_folder(out, output)
    print(
        f"exported {weights} weights ({which}) to {out}; schedulers: scheduler/ (LCMScheduler, "
        "stochastic) and scheduler_deterministic/ (DPMSolverMultistepScheduler, deterministic)",
        flush=True,
    )
    return out


# what the deterministic scheduler takes from the base model's scheduler config: the noise
# schedule and the parameterization, nothing that changes its update rule
_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
)


def _model_card(
    run: RunRecord,
    base: str,
    weights: str,
    step: int,
    num_train: int,
    family: TeacherFamily | None = None,
    unet: Any = None,
    zero_empty: bool = True,
    vae_scale: int = 8,
    folders: set[str] | None = None,
) -> str:
    family = family or family_of({})  # the SD layout's family
    folders = {"unet"} if folders is None and run.method == "codi" else (folders or set())
    method = {"pe-codi": "PE-CoDi (adapter only)", "codi": "CoDi (adapter + UNet)"}
    method = method.get(run.method, run.method)
    if run.lora_rank:
        how = "in `lora/`" if "lora" in folders else "merged into `unet/`"
        method = f"PE-CoDi (adapter + rank-{run.lora_rank} LoRA of the UNet, {how})"
    config = json.dumps(dict(run.raw), indent=2, default=str)
    num_grid = run.num_grid
    budgets = card_budgets(run, num_grid)
    timesteps = {s: sampling_timesteps(s, num_train, num_grid) for s in budgets}
    table = "\n".join(f"| {s} | `{ts}` |" for s, ts in timesteps.items())
    smallest = min(ts[-1] for ts in timesteps.values())
    c_skip = 0.25 / ((10.0 * smallest) ** 2 + 0.25)
    steps = 4 if 4 in timesteps else budgets[-1]
    args = (base, run.revision, "unet" in folders, steps, timesteps[steps])
    lora = "lora" in folders
    multiple = vae_scale * family.network_multiple(unet.config)[0]
    pipe_call = (
        f"pipe({{prompt}}, image=padded, height=H, width=W, num_inference_steps={steps},\n"
        '             guidance_scale=1.0, output_type="pt").images'
    )
    if run.pixel_space:
        snippet = _pixel_usage(*args, lora=lora)
        pipe_call = (
            f'generate(padded, [""], {timesteps[steps]}, deterministic,\n'
            "                 torch.Generator().manual_seed(0))"
        )
    else:
        spec = family.unet_export
        words, text, prompt = (
            spec.card(unet.config, zero_empty) if spec.card else ("", "", "prompt")
        )
        snippet = words + _controlnet_snippet(
            spec.pipeline, base, spec.from_pretrained_args + _revision(run.revision),
            *args[2:], run.vae_path, text=text, prompt=prompt, lora=lora,
        )  # fmt: skip
        pipe_call = pipe_call.format(prompt=prompt)
    snippet += "\n\n" + any_size_section(multiple, pipe_call.replace("{prompt}", "prompt"))
    return render_card(
        "unet", base=base, method=method, weights=weights, step=step, num_grid=num_grid,
        table=table, c_skip=f"{c_skip:.1e}", snippet=snippet, config=config,
    )  # fmt: skip


def _revision(revision: str | None) -> str:
    return "" if revision is None else f", revision={json.dumps(revision)}"


def _vae_arg(vae_path: str | None) -> str:
    """The ``vae=`` argument for a model trained with ``model.vae_path`` (a VAE folder or hub
    id, or a pipeline folder with ``vae/``, as ``models.load_vae`` reads it)."""
    if not vae_path:
        return ""
    sub = ', subfolder="vae"' if (Path(vae_path).expanduser() / "vae").is_dir() else ""
    return (
        f"\n    vae=AutoencoderKL.from_pretrained({json.dumps(vae_path)}{sub}, torch_dtype=dtype),"
    )


def _controlnet_snippet(
    pipeline: str, base: str, extra_args: str, unet: bool, steps: int, ts: list[int],
    vae_path: str | None, text: str = "", prompt: str = "prompt", lora: bool = False,
) -> str:  # fmt: skip
    """The stock ControlNet pipeline's usage, both samplers: ``pipeline`` is its class,
    ``extra_args`` the family's own ``from_pretrained`` arguments, ``text`` lines after
    ``prompt = ""`` and ``prompt`` how the prompt is passed to the call."""
    unet_arg = (
        '\n    unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),'
        if unet
        else ""
    )
    unet_arg += _vae_arg(vae_path)
    load_lora = (
        '\npipe.load_lora_weights(f"{folder}/lora")  # the LoRA of the base UNet' if lora else ""
    )
    return f"""```python
import torch
from diffusers import (
    AutoencoderKL, ControlNetModel, DPMSolverMultistepScheduler, LCMScheduler,
    {pipeline}, UNet2DConditionModel,
)

folder = "THIS_FOLDER"  # this export
dtype = torch.float32  # torch.bfloat16 or torch.float16 on a GPU
controlnet = ControlNetModel.from_pretrained(folder, subfolder="controlnet", torch_dtype=dtype)
pipe = {pipeline}.from_pretrained(
    {json.dumps(base)}, controlnet=controlnet,{unet_arg}
    torch_dtype=dtype, {extra_args},
){load_lora}
# condition: the control image, a PIL image or a [1, 3, H, W] tensor in [0, 1]
prompt = ""{text}

# deterministic sampler (codi-lightning test --model.eval_stochastic false), {steps} steps
pipe.scheduler = DPMSolverMultistepScheduler.from_pretrained(
    folder, subfolder="scheduler_deterministic"
)
image = pipe({prompt}, image=condition, timesteps={ts}, guidance_scale=1.0,
             generator=torch.Generator().manual_seed(0)).images[0]

# stochastic sampler (codi-lightning test --model.eval_stochastic true), {steps} steps
pipe.scheduler = LCMScheduler.from_pretrained(folder, subfolder="scheduler")
image = pipe({prompt}, image=condition, num_inference_steps={steps}, guidance_scale=1.0,
             generator=torch.Generator().manual_seed(0)).images[0]
```"""


def _pixel_usage(
    base: str, revision: str | None, unet: bool, steps: int, ts: list[int], lora: bool = False
) -> str:
    rev = _revision(revision)
    load_lora = (
        '\nunet.load_lora_adapter(f"{folder}/lora", prefix="unet",  # the LoRA of the base UNet'
        '\n                        weight_name="pytorch_lora_weights.safetensors")'
        if lora
        else ""
    )
    unet_from = "folder" if unet else f"base{rev}"
    return f"""A pixel-space model (no VAE): stock diffusers has no pipeline for it, so call the
UNet, the ControlNet and a scheduler in a short loop (the project's
`codi_lightning.export.CoDiPipeline.from_exported(folder, base, pixel_space=True)` does
the same).

```python
import torch
from diffusers import (
    ControlNetModel, DPMSolverMultistepScheduler, LCMScheduler, UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

base, folder = {json.dumps(base)}, "THIS_FOLDER"  # the base model, this export
unet = UNet2DConditionModel.from_pretrained({unet_from}, subfolder="unet").eval(){load_lora}
controlnet = ControlNetModel.from_pretrained(folder, subfolder="controlnet").eval()
tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"{rev})
text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder"{rev}).eval()


@torch.no_grad()
def generate(condition, prompts, timesteps, scheduler, generator):
    \"\"\"condition: [B, 3, H, W] in [0, 1]; returns images in [0, 1].\"\"\"
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    text = text_encoder(ids)[0]
    scheduler.set_timesteps(timesteps=timesteps)
    shape = (len(condition), unet.config.in_channels, *condition.shape[-2:])
    x = torch.randn(shape, generator=generator)
    for t in scheduler.timesteps:
        down, mid = controlnet(x, t, encoder_hidden_states=text, controlnet_cond=condition,
                               return_dict=False)
        out = unet(x, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return ((x + 1) / 2).clamp(0, 1)


# condition: a [B, 3, H, W] tensor in [0, 1]
prompts = [""] * len(condition)
# deterministic sampler (codi-lightning test --model.eval_stochastic false), {steps} steps
deterministic = DPMSolverMultistepScheduler.from_pretrained(
    folder, subfolder="scheduler_deterministic"
)
images = generate(condition, prompts, {ts}, deterministic,
                  torch.Generator().manual_seed(0))
# stochastic sampler (codi-lightning test --model.eval_stochastic true), {steps} steps
stochastic = LCMScheduler.from_pretrained(folder, subfolder="scheduler")
images = generate(condition, prompts, {ts}, stochastic,
                  torch.Generator().manual_seed(0))
```"""
