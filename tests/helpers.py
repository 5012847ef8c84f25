"""Helpers the tests share (conftest.py holds the fixtures only): CLI configs and inputs,
checkpoints, batches and the checks several families' tests run."""

from __future__ import annotations

from pathlib import Path

import torch


def write_cli_config(tmp_path: Path, name: str, teacher: Path, shards: dict) -> tuple[Path, Path]:
    """``configs/NAME`` for a 2-step CLI run in ``tmp_path``: the tiny ``teacher``, the
    tiny shards, no loader workers, outputs under ``tmp_path`` (run folder ``run/``,
    checkpoints ``run/ckpt``, predictions ``preds/``). Returns (config path, run folder)."""
    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / name).read_text())
    out = tmp_path / "run"
    cfg["trainer"].update(default_root_dir=str(out), max_steps=2, val_check_interval=2,
                          enable_progress_bar=False)  # fmt: skip
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(out / "logs")
    cfg["trainer"]["callbacks"][0]["init_args"].update(dirpath=str(out / "ckpt"))
    cfg["model"]["pretrained"] = str(teacher)
    cfg["data"].update(train_shards=shards["train"], val_shards=shards["val"],
                       num_workers=0, predict_output=str(tmp_path / "preds"))  # fmt: skip
    config = tmp_path / name
    config.write_text(yaml.safe_dump(cfg))
    return config, out


def write_low_res_inputs(folder: Path, count: int = 2) -> Path:
    """``count`` 8x8 PNGs to predict on."""
    from PIL import Image

    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (8, 8), (90 * i, 100, 200)).save(folder / f"in{i}.png")
    return folder


def write_checkpoint(teacher, path, scale: float = 0.01, **kw):
    """A CoDiDistillation checkpoint of ``teacher`` whose EMA target differs from the
    online weights (``scale`` x N(0, 1) added to every target parameter, the zero-init
    adapter outputs included); returns the module."""
    import lightning as L

    from codi_lightning.training import CoDiDistillation

    torch.manual_seed(0)
    m = CoDiDistillation(str(teacher), num_grid=20, **kw)
    with torch.no_grad():
        for p in m.target.parameters():
            p.add_(scale * torch.randn_like(p))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", max_steps=0)
    trainer.strategy.connect(m)
    trainer.save_checkpoint(path)
    return m


def make_batch(batch: int = 2, resolution: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1
    return {
        "image": image,
        "cond": (image + 1) / 2,
        "caption": ["a red circle", ""][:batch] + [""] * max(0, batch - 2),
    }


def predict_and_export(config: Path, last: str, tmp_path: Path, run_card: bool = True) -> str:
    """Through the CLI: predict two low-resolution inputs (both written to ``preds/``),
    export ``last`` to ``exported/`` and, with ``run_card``, run the model card's
    snippet as written on a 32 px condition. Returns the card."""
    from PIL import Image

    from codi_lightning.cli import main

    inputs = write_low_res_inputs(tmp_path / "lowres")
    main(["predict", "--config", str(config), "--ckpt_path", last,
          "--data.predict_images", str(inputs)])  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "preds").iterdir()) == ["in0.png", "in1.png"]
    exported = tmp_path / "exported"
    main(["export", "--ckpt", last, "--output", str(exported)])
    card = (exported / "README.md").read_text()
    if run_card:
        code = card.split("```python\n", 1)[1].split("```", 1)[0]
        namespace = {"condition": Image.new("RGB", (32, 32), (200, 30, 90))}
        exec(compile(code.replace("THIS_FOLDER", str(exported)), "card", "exec"), namespace)
        assert namespace["image"].size == (32, 32)
    return card


def check_step_and_sampling(m, **sample_kw) -> None:
    """One CoDi loss on a tiny batch: finite, gradients reach the trained modules and
    not the frozen teacher; sampling gives images in [0, 1]."""
    loss, terms = m.compute_loss(make_batch(), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and set(terms) == {"consistency", "guidance", "loss"}
    loss.backward()
    trained = [p for mod in m.trainable_modules().values() for p in mod.parameters()]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert all(p.grad is None for p in m.network.parameters())  # the teacher stays frozen
    images = m.sample_images(make_batch()["cond"], ["a", ""], 2, **sample_kw)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


def check_adapter_reads_the_condition(m, batch, text, cond, z, t, teacher) -> None:
    """Once the adapter's zero-initialised outputs have weights, the adapted model leaves
    the teacher (``teacher``: its output at ``z, t``) and another condition gives
    another output; the adapter's weights are restored after."""
    adapter = m.controlnet
    saved = {k: v.clone() for k, v in adapter.state_dict().items()}
    with torch.no_grad():
        for p in adapter.parameters():
            if (p == 0).all():
                p.normal_(0, 0.1)
        a = m.denoiser("online", text, cond)(z, t)
        b = m.denoiser("online", text, m.adapter_condition(1 - batch["cond"]))(z, t)
    adapter.load_state_dict(saved)
    assert not torch.allclose(a, teacher) and not torch.allclose(a, b)


def write_photo_folder(root: Path) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """A folder of predict inputs as users have them: non-square and odd sizes, a 1x1
    image, three same-size images (one batch), inputs whose names clash (``same.jpg``,
    ``same.png`` and, case-insensitively, ``Same.bmp``), a unicode name with spaces in a
    subfolder, a two-frame GIF, a side prompt file, a truncated PNG, a JSON file and a
    300x300 image (1200x1200 at 4x, above a 1 MP output limit).

    Returns the expected outputs at 4x (``{relative name: (width, height)}``) and the
    expected skips (``{input path: start of the reason}``); run predict with
    ``--data.predict_max_pixels 1000000``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def save(name: str, w: int, h: int, **kw) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, **kw)

    sizes = {"wide.png": (12, 7), "tall.jpg": (5, 11), "one.png": (1, 1), "odd.webp": (9, 13),
             "same.jpg": (8, 8), "same.png": (6, 10), "Same.bmp": (7, 7), "sq1.png": (8, 8),
             "sq2.png": (8, 8), "sq3.png": (8, 8), "sub dir/ünïcode name.png": (7, 5)}  # fmt: skip
    for name, (w, h) in sizes.items():
        save(name, w, h)
    frames = [Image.new("RGB", (10, 6), c) for c in ((200, 30, 30), (30, 200, 30))]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    (root / "wide.txt").write_text("a wide picture")  # a side prompt, not an input
    save("big.png", 300, 300)
    (root / "trunc.png").write_bytes((root / "sq1.png").read_bytes()[:60])
    (root / "notes.json").write_text("{}")
    names = {"same.jpg": "same.jpg", "same.png": "same.png", "Same.bmp": "Same.bmp"}
    expected = {names.get(k, k.rsplit(".", 1)[0]): (4 * w, 4 * h) for k, (w, h) in sizes.items()}
    expected["anim"] = (40, 24)
    skipped = {"big.png": "a 300x300 input makes a 1200x1200 output (1.4 MP), above "
               "data.predict_max_pixels=1000000", "trunc.png": "not a readable image",
               "notes.json": "not an image file"}  # fmt: skip
    return expected, skipped


def check_predictions(preds: Path, expected: dict[str, tuple[int, int]]) -> None:
    """Every expected output written once, at its pixel size, and nothing else."""
    from PIL import Image

    written = {p.relative_to(preds).as_posix()[: -len(".png")]: p for p in preds.rglob("*.png")}
    assert sorted(written) == sorted(expected)
    assert not [p for p in preds.rglob("*") if p.is_file() and p.suffix != ".png"]
    for name, size in expected.items():
        assert Image.open(written[name]).size == size, name


def stored_in_bf16(teacher: Path, folder: Path) -> Path:
    """A copy of the diffusers ``teacher`` folder with every weight file and config in
    bf16, as hub models such as FLUX.1 are stored."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(teacher, folder)
    for file in folder.rglob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(file).items()}, file)
    for file in folder.rglob("config.json"):
        config = json.loads(file.read_text())
        config.update({k: "bfloat16" for k in ("dtype", "torch_dtype") if k in config})
        file.write_text(json.dumps(config))
    return folder
