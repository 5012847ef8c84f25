"""The page of ``codi-lightning serve``, in Gradio (the optional ``ui`` extra).

Offline: Gradio serves its page and fonts itself (its default theme's fonts ship in the
package), analytics are off, nothing is shared; the browser tests check that the page
requests nothing but the local server.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .model import STEP_CHOICES, InputError, ServedModel

SAMPLERS = ("deterministic", "stochastic")
# small images (digits are 32 px) fill their box, without blur
CSS = """
#input-image img, #output-image img, #compare-gallery img {
  width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;
}
"""
UI_EXTRA = "pip install 'codi-lightning[ui]'"


def import_gradio():
    """Gradio, imported with its analytics and version checks off; a ``ValueError``
    naming the extra to install when it is missing."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio as gr
    except ImportError as err:
        raise ValueError(
            f"serve needs the optional UI packages (Gradio): {UI_EXTRA} "
            "(from a checkout: pip install -e '.[ui]')"
        ) from err
    return gr


def build_page(model: ServedModel, examples: Sequence[str] = (), title: str = "codi-lightning"):
    """The Blocks of the page: an upload (or an example), the sampler's settings, and
    input | output with the time each took; ``compare`` adds every step count side by
    side. A file that cannot be used puts its reason in the status line."""
    gr = import_gradio()
    d = model.defaults
    out_dir = Path(tempfile.mkdtemp(prefix="codi-serve-"))

    def check_upload(path: str | None):
        if not path:
            return None, ""
        try:
            condition = model.prepare(path)
        except InputError as err:
            return None, f"**Cannot use this file:** {err}"
        w, h = condition.size
        return condition, f"Ready: the condition is {w}x{h} px. Press **Run**."

    def run(path, steps, guidance, seed, sampler, prompt, compare):
        hidden = gr.update(value=None, visible=False)
        if not path:
            return None, None, hidden, None, "**Upload an image** (or pick an example) first."
        try:
            condition = model.prepare(path)
        except InputError as err:
            return None, None, hidden, None, f"**Cannot use this file:** {err}"
        counts = STEP_CHOICES if compare else (int(steps),)
        seed = int(seed or 0)  # an emptied box: seed 0
        try:
            results = [model.generate(condition, n, float(guidance), seed,
                                      sampler == "stochastic", prompt or "") for n in counts]  # fmt: skip
        except (RuntimeError, ValueError) as err:  # e.g. out of memory: said, the page stays
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            return condition, None, hidden, None, f"**Sampling failed:** {first}"
        main = next(r for r in results if r.steps == int(steps)) if compare else results[0]
        # a folder per request: two pages asking at once never share a file
        file = Path(tempfile.mkdtemp(dir=out_dir)) / f"{Path(path).stem}-{main.steps}steps.png"
        main.image.save(file)
        w, h = main.image.size
        times = ", ".join(
            f"{r.steps} step{'s' * (r.steps > 1)}: {r.seconds:.2f} s" for r in results
        )
        gallery = [(r.image, f"{r.steps} step{'s' * (r.steps > 1)}, {r.seconds:.2f} s")
                   for r in results]  # fmt: skip
        status = f"Done: {w}x{h} px output. Sampling took {times}."
        shown = gr.update(value=gallery, visible=True) if compare else hidden
        return condition, main.image, shown, str(file), status

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(
            f"## {title}\nModel: `{model.source}`"
            + (f" · inputs are upscaled {model.upscale}x" if model.upscale > 1 else "")
        )
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Input image", type="filepath", elem_id="upload")
                if examples:
                    gr.Examples(examples=[[str(e)] for e in examples], inputs=[upload],
                                label="Examples")  # fmt: skip
                steps = gr.Radio([str(n) for n in STEP_CHOICES], value=str(d.steps),
                                 label="Sampling steps", elem_id="steps")  # fmt: skip
                guidance = gr.Slider(1.0, 10.0, value=d.guidance, step=0.5,
                                     label="Guidance scale", elem_id="guidance")  # fmt: skip
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                sampler = gr.Radio(list(SAMPLERS), label="Sampler", elem_id="sampler",
                                   value=SAMPLERS[int(d.stochastic)])  # fmt: skip
                prompt = gr.Textbox(value=d.prompt, label="Prompt (for tasks that use one)",
                                    elem_id="prompt")  # fmt: skip
                compare = gr.Checkbox(label=f"Compare {', '.join(map(str, STEP_CHOICES))} steps",
                                      elem_id="compare")  # fmt: skip
                button = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                status = gr.Markdown("Upload an image or pick an example.", elem_id="status")
                with gr.Row():
                    shown_input = gr.Image(label="Input (condition)", type="pil", height=320,
                                           interactive=False, elem_id="input-image",
                                           buttons=["fullscreen"])  # fmt: skip
                    output = gr.Image(label="Output", type="pil", format="png", height=320,
                                      interactive=False, elem_id="output-image",
                                      buttons=["download", "fullscreen"])  # fmt: skip
                gallery = gr.Gallery(label="All step counts", columns=len(STEP_CHOICES),
                                     height=260, object_fit="contain", visible=False,
                                     buttons=["download"], elem_id="compare-gallery")  # fmt: skip
                download = gr.File(label="Download the output (PNG)", elem_id="download")
        upload.change(check_upload, [upload], [shown_input, status])
        button.click(run, [upload, steps, guidance, seed, sampler, prompt, compare],
                     [shown_input, output, gallery, download, status])  # fmt: skip
    page.served_output_dir = out_dir
    return page


def launch(page: Any, host: str, port: int, block: bool = True) -> Any:
    """Start the server (one request samples at a time; the others wait in the queue)."""
    page.queue(default_concurrency_limit=1)
    return page.launch(
        server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False,
        css=CSS, prevent_thread_lock=not block, footer_links=[], quiet=True,
        allowed_paths=[str(page.served_output_dir)], max_file_size="200mb",
    )  # fmt: skip
