"""Depth-to-image shards with a tiny randomly initialised transformers depth estimator."""

import io

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from codi_lightning.data import ShardDataModule, decode_sample, write_depth_shards


@pytest.fixture(scope="module")
def tiny_estimator(tmp_path_factory):
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
        image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5], is_hybrid=False,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("dpt") / "tiny_dpt"
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(
        folder
    )
    return str(folder)


def test_depth_shards_store_a_depth_map_per_image(tmp_path, tiny_estimator, capsys):
    imgs = tmp_path / "img"
    imgs.mkdir()
    g = np.random.default_rng(0)
    for i, size in enumerate([(40, 30), (48, 48), (30, 40)]):
        Image.fromarray(g.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            imgs / f"{i}.png"
        )
    (imgs / "0.txt").write_text("a room")
    (imgs / "broken.png").write_bytes(b"nope")
    jpeg = io.BytesIO()
    Image.fromarray(g.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (imgs / "cut.jpg").write_bytes(jpeg.getvalue()[:-200])  # passes verify(), fails to decode
    summary = write_depth_shards(str(imgs), str(tmp_path / "d-%06d.tar"), depth_model=tiny_estimator,
                                 batch_size=2, progress=False)  # fmt: skip
    assert summary == {"written": 3, "skipped_unreadable": 2}
    out = capsys.readouterr().out
    assert "  cut.jpg (unreadable): not a readable image (truncated image)" in out
    assert "  broken.png (unreadable): not a readable image (cannot identify image file)" in out
    samples = {
        s["__key__"]: decode_sample(s)
        for s in wds.WebDataset(str(tmp_path / "d-000000.tar"), shardshuffle=False)
    }
    assert set(samples) == {"0", "1", "2"}
    for s in samples.values():
        assert s["cond"].size == s["image"].size  # depth at the image's resolution
        arr = np.asarray(s["cond"])
        assert (arr[..., 0] == arr[..., 1]).all() and arr.min() == 0 and arr.max() == 255
        assert s["meta"]["cond"]["recipe"] == "depth"
    assert samples["0"]["caption"] == "a room"
    dm = ShardDataModule(str(tmp_path / "d-000000.tar"), str(tmp_path / "d-000000.tar"), resolution=16,
                         batch_size=3, num_workers=0, condition="stored")  # fmt: skip
    batch = next(iter(dm.val_dataloader()))
    assert batch["cond"].shape == (3, 3, 16, 16)


def test_depth_batches_give_the_same_maps_as_single_images(tmp_path, tiny_estimator):
    from codi_lightning.data.depth import estimate_depth, load_depth_estimator

    model, proc = load_depth_estimator(tiny_estimator, torch.device("cpu"))
    images = [Image.new("RGB", (32, 32), (i * 60, 80, 200 - i * 50)) for i in range(3)]
    together = estimate_depth(model, proc, images)
    alone = [estimate_depth(model, proc, [img])[0] for img in images]
    for a, b in zip(together, alone, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_depth_errors_name_the_fix(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    with pytest.raises(OSError, match="local folder"):
        write_depth_shards(
            str(tmp_path / "img"), str(tmp_path / "o-%06d.tar"), depth_model=str(tmp_path / "none")
        )
    with pytest.raises(ValueError, match="batch_size"):
        write_depth_shards(str(tmp_path / "img"), str(tmp_path / "o-%06d.tar"), batch_size=0)
