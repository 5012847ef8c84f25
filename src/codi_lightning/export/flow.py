"""Export of flow-transformer checkpoints (SD3 family, Flux): ``controlnet/`` (the
family's ControlNet), ``transformer/`` for full CoDi, the two flow samplers as stock
schedulers and a model card for the family's stock ControlNet pipeline
(``StableDiffusion3ControlNetPipeline``, ``FluxControlNetPipeline``).

- ``scheduler/``: ``FlowMatchLCMScheduler`` (the stochastic consistency multistep sampler,
  ``model.eval_stochastic: true``): ``x_hat = z - sigma v``, then fresh noise at the next
  sigma.
- ``scheduler_deterministic/``: ``FlowMatchEulerDiscreteScheduler`` (the default
  deterministic sampler: on a flow schedule the DDIM step with the model's own noise
  estimate is the Euler step, and the last step lands on ``x_hat``).

Both take the training grid's timesteps as ``sigmas=`` (the unshifted ``(t + 1) / T``:
the schedulers shift them by the base model's ``shift``, or, for Flux, by the shift of the
image size the pipeline is asked for; at the training resolution that is the training
shift); their default spacing does not lie on the grid. ``tests/export/test_export_flow.py``
checks that the stock pipelines with either scheduler reproduce the module's samplers.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoints import STATE_PREFIXES
from ..diffusion import FlowSchedule, sampling_timesteps
from ..diffusion.schedule import flow_match_config
from ..models.builders import vae_downsampling
from ..models.lora import LORA_FILE
from ..models.teachers.base import FlowExport, TeacherFamily
from .parts import (
    RunRecord,
    any_size_section,
    card_budgets,
    fused_network,
    lora_metadata,
    render_card,
    sub_state,
    unweighted,
)


def text_length(spec: FlowExport, base: str, kw: dict) -> int | None:
    """The sequence length of the text encoder the pipeline's ``max_sequence_length``
    sets (T5's; SANA: Gemma's) that the run's prompt encoder used (as ``models.teachers``
    sets it: the family's length, or the tokenizer's maximum if shorter); None for a
    base model without that tokenizer (SD3 without T5)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base, subfolder=spec.text_tokenizer, **kw)
    except (OSError, ValueError):
        return None
    return min(spec.text_length, int(tokenizer.model_max_length))


def export_flow(
    family: TeacherFamily, run: RunRecord, state: dict, base: str, out: Path, weights: str,
    step: int, kw: dict, lora: dict | None = None, lora_mode: str = "separate",
) -> str:  # fmt: skip
    """Write the export of a checkpoint of a flow ``family`` (its ``flow_export``) into ``out``;
    returns what was written (for the summary). ``lora``: the checkpoint's LoRA of the
    transformer (``parts.lora_state``), written to ``lora/`` or, with ``lora_mode``
    ``merge``, merged into ``transformer/``."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler

    spec = family.flow_export
    network_cls = getattr(diffusers, spec.network)
    config = network_cls.load_config(base, subfolder="transformer", **kw)
    # built without weights, taking the (memory-mapped) checkpoint's tensors as they are
    # (SD3.5 medium's export held a 5 GB adapter of its own; FLUX.1's full-CoDi
    # transformer would be 47.6 GB in fp32)
    adapter_cls = getattr(diffusers, spec.adapter)
    controlnet = unweighted(
        adapter_cls.from_config, spec.adapter_config(config, run.adapter_layers)
    )
    prefix = STATE_PREFIXES["adapter"][weights]
    controlnet.load_state_dict(sub_state(state, prefix), strict=True, assign=True)
    controlnet.save_pretrained(out / "controlnet", safe_serialization=True)
    codi = run.method == "codi"
    if codi:
        transformer = unweighted(network_cls.from_config, config)
        prefix = STATE_PREFIXES["network"][weights]
        transformer.load_state_dict(sub_state(state, prefix), strict=True, assign=True)
        transformer.save_pretrained(out / "transformer", safe_serialization=True)
    if lora:
        lora = {"transformer." + k.removeprefix("unet."): v for k, v in lora.items()}
        if lora_mode == "merge":
            fused = fused_network(network_cls, base, "transformer", lora, run, kw)
            fused.save_pretrained(out / "transformer", safe_serialization=True)
        else:
            saver = getattr(diffusers, spec.lora_saver)
            saver.save_lora_weights(
                out / "lora",
                transformer_lora_layers={
                    k.removeprefix("transformer."): v for k, v in lora.items()
                },
                transformer_lora_adapter_metadata=lora_metadata(run),
                weight_name=LORA_FILE,
            )
    scheduler_config = flow_match_config(
        FlowMatchEulerDiscreteScheduler.load_config(base, subfolder="scheduler", **kw)
    )
    FlowMatchLCMScheduler.from_config(scheduler_config).save_pretrained(out / "scheduler")
    FlowMatchEulerDiscreteScheduler.from_config(scheduler_config).save_pretrained(
        out / "scheduler_deterministic"
    )
    size, tokens = None, None
    vae_scale = vae_downsampling(
        getattr(diffusers, family.vae).load_config(base, subfolder="vae", **kw)
    )
    multiple = vae_scale * family.network_multiple(config)[0]
    if scheduler_config.get("use_dynamic_shifting"):  # the training resolution's shift
        size = run.shift_resolution
        if size is None:
            raise ValueError(
                "the checkpoint does not record model.shift_resolution (the training "
                "resolution), which fixes this teacher's sigma shift: it is not a "
                "checkpoint of a codi-lightning run on this teacher"
            )
        tokens = (int(size) // vae_scale // 2) ** 2
    schedule = FlowSchedule.from_config(scheduler_config, tokens)
    folders = [d for d in ("transformer", "lora") if (out / d).is_dir()]
    card = _card(spec, family.name, run, base, weights, step, schedule, "transformer" in folders, size,
                 multiple, text_length(spec, base, kw), lora="lora" in folders)  # fmt: skip
    (out / "README.md").write_text(card)
    return " + ".join(f"{d}/" for d in [*folders, "controlnet"])


def _card(
    spec: FlowExport, tag: str, run: RunRecord, base: str, weights: str, step: int,
    schedule: FlowSchedule, codi: bool, size: int | None, multiple: int = 16,
    max_length: int | None = None, lora: bool = False,
) -> str:  # fmt: skip
    """``codi``: the export has its own ``transformer/`` (full CoDi, or a merged LoRA);
    ``lora``: a ``lora/`` of the base transformer."""
    method = "CoDi (adapter + transformer)" if run.method == "codi" else "PE-CoDi (adapter only)"
    if run.lora_rank:
        how = "in `lora/`" if lora else "merged into `transformer/`"
        method = f"PE-CoDi (adapter + rank-{run.lora_rank} LoRA of the transformer, {how})"
    num_grid, num_train = run.num_grid, schedule.num_train_timesteps
    budgets = card_budgets(run, num_grid)
    rows, sigmas = [], {}
    for s in budgets:
        ts = sampling_timesteps(s, num_train, num_grid)
        sigmas[s] = schedule.unshifted(ts)
        rows.append(f"| {s} | `{ts}` | `{sigmas[s]}` |")
    steps = 4 if 4 in sigmas else budgets[-1]
    revision = "" if run.revision is None else f", revision={json.dumps(run.revision)}"
    transformer = (
        f'\n    transformer={spec.network}.from_pretrained(folder, subfolder="transformer", '
        "torch_dtype=dtype),"
        if codi
        else ""
    )
    shift = f"sigma shift {schedule.shift:.4g}"
    sized, size_args = "", ""
    if size is not None:  # Flux: the shift follows the image size
        shift += f" (the shift of {size} x {size} px images: the scheduler shifts by size)"
        sized = (
            f"\nThe schedulers shift the sigmas by the image size: at {size} x {size} px (the "
            "training resolution) they take exactly the training steps; other sizes shift "
            "them as the base model does.\n"
        )
        size_args = f" height={size}, width={size},"
        sized += (
            "\nIn this pipeline `FlowMatchLCMScheduler` draws the per-step noise for the packed "
            "latent tokens, so a seed gives other noise values than in `codi-lightning` "
            "(from the same distribution).\n"
        )
    prelude = ""
    if spec.size_from_condition and not size_args:  # else it samples at its default size
        prelude = (
            "\nheight, width = (condition.shape[-2:] if torch.is_tensor(condition)\n"
            "                 else (condition.height, condition.width))  # the condition's size"
        )
        size_args = " height=height, width=width,"
    guidance = ""
    if spec.guidance != 1.0:  # a guidance input (Flux-dev): one pass, no CFG
        low_high = list(run.guidance_range)
        trained = (
            f"over the integer scales in [{low_high[0]}, {low_high[1]}) (`model.cfg_aware`); "
            f"{spec.guidance} below is the base pipeline's default"
            if run.cfg_aware and len(low_high) == 2
            else f"at {spec.guidance}"
        )
        guidance = (
            "\n`guidance_scale` is fed to the transformer's guidance input (one pass, no "
            f"classifier-free guidance); the model was distilled {trained}.\n"
        )
    load_lora = (
        '\npipe.load_lora_weights(f"{folder}/lora")  # the LoRA of the base transformer'
        if lora
        else ""
    )
    config = json.dumps(dict(run.raw), indent=2, default=str)
    extra = f" {spec.call_args}" if spec.call_args else ""
    length = "" if max_length is None else f" max_sequence_length={max_length},"
    if max_length is not None:
        guidance += (
            f"\nThe text encoder reads {max_length} prompt tokens, as in training: the snippet passes "
            f"`max_sequence_length={max_length}` (the pipeline's default may differ).\n"
        )
    call = (
        f"image = pipe(prompt, control_image=condition, sigmas=sigmas,{size_args}{length}{extra}\n"
        f"             guidance_scale={spec.guidance}, "
        "generator=torch.Generator().manual_seed(0)).images[0]"
    )
    any_size = any_size_section(
        multiple,
        f"pipe(prompt, control_image=padded, sigmas=sigmas, height=H, width=W,{length}{extra}\n"
        f'             guidance_scale={spec.guidance}, output_type="pt").images',
        "[-1, 1]",
    )
    if size is not None:
        any_size += (
            f"\nAt sizes other than {size} x {size} px the scheduler shifts the sigmas by the "
            "size, as the base model does; `codi-lightning predict` keeps the training shift.\n"
        )
    return render_card(
        "flow", base=base, tag=tag, title=spec.title, method=method, weights=weights,
        step=step, num_grid=num_grid, shift=shift, sized=sized, rows="\n".join(rows),
        sampling_notes=spec.sampling_notes, guidance=guidance, adapter=spec.adapter,
        network=spec.network, pipeline=spec.pipeline, base_json=json.dumps(base),
        transformer=transformer, revision=revision.lstrip(", "), load_lora=load_lora,
        sigmas=sigmas[steps], steps=steps, prelude=prelude, call=call, any_size=any_size,
        config=config,
    )  # fmt: skip
