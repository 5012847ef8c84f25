"""``codi-lightning serve``'s model side (no browser): what an upload becomes, what is
sampled, and the command's refusals."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch
from helpers import write_checkpoint
from PIL import Image

from codi_lightning.cli import main
from codi_lightning.serve import InputError, ServedModel


@pytest.fixture(scope="module")
def served(tiny_pixel_teacher, tmp_path_factory):
    """A pixel-space checkpoint whose run recorded ``data.predict_upscale: 4`` and
    ``predict_steps: 2``, its export, and the checkpoint's served model."""
    root = tmp_path_factory.mktemp("serve")
    ckpt = root / "run.ckpt"
    write_checkpoint(tiny_pixel_teacher, ckpt, scale=0.05, pixel_space=True, predict_steps=2)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    checkpoint["datamodule_hyper_parameters"] = {"predict_upscale": 4, "predict_prompt": "a 7",
                                                 "predict_max_pixels": 64 * 64}  # fmt: skip
    torch.save(checkpoint, ckpt)
    main(["export", "--ckpt", str(ckpt), "--output", str(root / "exported")])
    return ckpt, root / "exported", ServedModel.from_checkpoint(str(ckpt))


def digit(path, size=8, value=200):
    image = Image.new("L", (size, size), 0)
    image.paste(value, (2, 1, size - 3, size - 1))
    image.save(path)
    return path


def test_the_run_settings_set_the_size_and_the_defaults(served):
    _, _, model = served
    assert model.upscale == 4 and model.max_output_pixels == 64 * 64
    assert model.defaults.steps == 2 and model.defaults.prompt == "a 7"
    assert not model.defaults.stochastic and model.defaults.guidance == 1.0


def test_an_upload_is_read_as_predict_reads_it(served, tmp_path):
    _, _, model = served
    condition = model.prepare(digit(tmp_path / "d.png"))  # grey, 8x8
    assert condition.mode == "RGB" and condition.size == (32, 32)
    expected = Image.open(tmp_path / "d.png").convert("RGB").resize((32, 32), Image.BICUBIC)
    assert np.array_equal(np.asarray(condition), np.asarray(expected))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="not an image"):
        model.prepare(tmp_path / "notes.txt")
    (tmp_path / "cut.png").write_bytes((tmp_path / "d.png").read_bytes()[:40])
    with pytest.raises(InputError, match="not an image"):
        model.prepare(tmp_path / "cut.png")
    with pytest.raises(InputError, match="too large.*predict_max_pixels"):  # 4 x 17 > 64
        model.prepare(digit(tmp_path / "big.png", size=17))


def test_the_checkpoint_and_its_export_sample_the_same_image(served, tmp_path):
    """The page's two sources agree: the checkpoint (sampled by the LightningModule) and
    its export (sampled by CoDiPipeline) give the same image for the same seed."""
    ckpt, exported, model = served
    condition = model.prepare(digit(tmp_path / "d.png"))
    first = model.generate(condition, 2, seed=3)
    assert first.image.size == (32, 32) and first.steps == 2 and first.seconds > 0
    again = model.generate(condition, 2, seed=3)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    other = model.generate(condition, 2, seed=4)
    assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))
    folder = ServedModel.from_exported(str(exported), str(served_teacher(ckpt)), upscale=4)
    from_folder = folder.generate(folder.prepare(tmp_path / "d.png"), 2, seed=3)
    diff = np.abs(np.asarray(first.image, float) - np.asarray(from_folder.image, float))
    assert diff.max() <= 1


def served_teacher(ckpt):
    return torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"][
        "pretrained"
    ]


def test_a_missing_ui_extra_is_named(monkeypatch):
    from codi_lightning.serve.page import import_gradio

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(ValueError, match=r"codi-lightning\[ui\]"):
        import_gradio()


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give --ckpt_path"),
        (["--ckpt_path", "a.ckpt", "--folder", "b"], "one of them"),
        (["--folder", "{exported}"], "--pretrained"),
        (["--folder", "{teacher}", "--pretrained", "{teacher}"], "no controlnet/"),
        (["--ckpt_path", "{teacher}/missing.ckpt"], "missing.ckpt"),
        (["--ckpt_path", "{ckpt}", "--examples", "{teacher}/nowhere"], "--examples"),
        (["--ckpt_path", "{ckpt}", "--model.pretrained", "{teacher}/gone"], "gone' not found"),
    ],
)
def test_the_command_refuses_bad_options_in_a_line(served, tiny_pixel_teacher, capsys, args,
                                                   message):  # fmt: skip
    ckpt, exported, _ = served
    names = {"ckpt": ckpt, "exported": exported, "teacher": tiny_pixel_teacher}
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *(a.format(**names) for a in args)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and len(err.splitlines()) <= 4


def test_a_port_in_use_is_said_in_a_line(served, capsys):
    import socket

    ckpt, _, _ = served
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", "--ckpt_path", str(ckpt), "--port", str(port)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port} is in use: choose another --port" in err


def test_the_server_calls_no_one(served, monkeypatch):
    """Building and starting the page, and serving it, opens no connection beyond the
    loopback address (Gradio's analytics and version check off)."""
    import socket
    import urllib.request

    pytest.importorskip("gradio", reason="needs the UI extra (pip install -e '.[ui]')")
    from distributed.procwatch import free_port

    from codi_lightning.serve.page import build_page, launch

    outside = []
    connect = socket.socket.connect

    def local_only(sock, address):
        host = address[0] if isinstance(address, tuple) else str(address)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in (
            "127.0.0.1", "::1", "localhost"
        ):  # fmt: skip
            outside.append(address)
            raise OSError("no network in this test")
        return connect(sock, address)

    lookup = socket.getaddrinfo

    def local_lookup(host, *args, **kwargs):  # a call home starts with a name look-up
        if host not in ("127.0.0.1", "::1", "localhost", None):
            outside.append(host)
            raise OSError("no network in this test")
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    monkeypatch.setattr(socket, "getaddrinfo", local_lookup)
    _, _, model = served
    page = build_page(model)
    port = free_port()
    launch(page, "127.0.0.1", port, block=False)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            assert response.status == 200
    finally:
        page.close()
    time.sleep(1)  # a version check runs in a thread of its own
    assert outside == []


def test_a_failed_sampling_is_said_on_the_page(tmp_path):
    """An error while sampling (out of memory, say) ends in the status line, not in a
    broken page; an emptied seed box samples seed 0."""
    pytest.importorskip("gradio", reason="needs the UI extra (pip install -e '.[ui]')")
    from codi_lightning.serve.page import build_page

    def failing(cond, prompt, steps, guidance, stochastic, generator):
        raise RuntimeError("CPU out of memory\n(details)")

    page = build_page(ServedModel(failing, "failing"))
    run = next(f.fn for f in page.fns.values() if getattr(f.fn, "__name__", "") == "run")
    out = run(str(digit(tmp_path / "d.png")), "4", 1.0, None, "deterministic", "", False)
    assert out[1] is None and out[-1] == "**Sampling failed:** CPU out of memory"
