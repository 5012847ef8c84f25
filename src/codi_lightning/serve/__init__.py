"""``codi-lightning serve``: a local page to try a distilled model in the browser."""

from __future__ import annotations

from pathlib import Path

from .model import STEP_CHOICES, Defaults, InputError, Result, ServedModel

MAX_EXAMPLES = 8


def example_files(folder: str | None) -> list[str]:
    """Up to :data:`MAX_EXAMPLES` image files of ``folder`` (sorted), for the page's examples."""
    from ..data.folder import PREDICT_EXTS

    if folder is None:
        return []
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--examples {folder!r} is not a folder of images")
    files = sorted(p for p in root.iterdir() if p.suffix.lower().lstrip(".") in PREDICT_EXTS)
    if not files:
        raise FileNotFoundError(f"--examples {folder!r} holds no images")
    return [str(p.resolve()) for p in files[:MAX_EXAMPLES]]


def serve(
    ckpt_path: str | None = None,
    folder: str | None = None,
    pretrained: str | None = None,
    pixel_space: bool | None = None,
    upscale: int | None = None,
    examples: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "cpu",
) -> None:
    """Open a local page to try a distilled model in the browser.

    Upload an image (or pick an example), choose steps, guidance, seed and sampler, and
    see input | output with the time each took. Needs the UI extra: pip install
    'codi-lightning[ui]'.

    Args:
        ckpt_path: a checkpoint of `codi-lightning fit` (a file or an FSDP2 folder).
        folder: or an exported folder (`codi-lightning export`; SD 1.x/2.x and SDXL
            families), with --pretrained, its base model.
        pretrained: the base model, if not the one the checkpoint records (also
            --model.pretrained, as in the other commands).
        pixel_space: the exported folder's base is a pixel-space model (default: a local
            base folder without vae/).
        upscale: scale factor applied to inputs before sampling (4 for 4x
            super-resolution); default: the checkpoint's data.predict_upscale (or its SR
            factor), 1 for a folder.
        examples: a folder of example inputs shown on the page (the first 8 images).
        host: the address to listen on (127.0.0.1: this machine only).
        port: the port to listen on.
        device: where the model runs (cpu, cuda, cuda:1, ...).
    """
    from .page import build_page, import_gradio, launch

    if (ckpt_path is None) == (folder is None):
        raise ValueError("give --ckpt_path (a fit checkpoint) or --folder (an export), one of them")
    import_gradio()  # before the model loads: a missing extra is said at once
    shown = example_files(examples)
    if folder is not None:
        if not pretrained:
            raise ValueError(f"--folder {folder!r}: give its base model with --pretrained")
        model = ServedModel.from_exported(folder, pretrained, pixel_space, upscale or 1, device)
    else:
        model = ServedModel.from_checkpoint(ckpt_path, pretrained, upscale, device)
    page = build_page(model, shown)
    try:
        launch(page, host, port, block=False)
    except OSError as err:
        why = "is in use" if "empty port" in str(err) else f"cannot be used ({err})"
        raise ValueError(f"{host}:{port} {why}: choose another --port") from err
    print(f"serving {model.source} at http://{host}:{port} (Ctrl+C stops)", flush=True)
    page.block_thread()


__all__ = ["STEP_CHOICES", "Defaults", "InputError", "Result", "ServedModel", "serve"]
