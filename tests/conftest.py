"""Shared fixtures: tiny teacher folders and tiny shards, built offline (helpers the tests
share are in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _reset_torch_state():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    from codi_lightning.testing.tiny import write_tiny_teacher

    return write_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny")


@pytest.fixture(scope="session")
def tiny_pixel_teacher(tmp_path_factory) -> Path:
    from codi_lightning.testing.tiny import write_tiny_teacher

    return write_tiny_teacher(
        tmp_path_factory.mktemp("teacher") / "tiny_pixel",
        pixel_space=True,
        prediction_type="v_prediction",
    )


@pytest.fixture(scope="session")
def tiny_sdxl_teacher(tmp_path_factory) -> Path:
    from codi_lightning.testing.tiny import write_tiny_sdxl_teacher

    return write_tiny_sdxl_teacher(tmp_path_factory.mktemp("teacher") / "tiny_sdxl")


@pytest.fixture(scope="session")
def tiny_sd3_teacher(tmp_path_factory) -> Path:
    from codi_lightning.testing.tiny import write_tiny_sd3_teacher

    return write_tiny_sd3_teacher(tmp_path_factory.mktemp("teacher") / "tiny_sd3")


@pytest.fixture(scope="session")
def tiny_flux_teacher(tmp_path_factory) -> Path:
    from codi_lightning.testing.tiny import write_tiny_flux_teacher

    return write_tiny_flux_teacher(tmp_path_factory.mktemp("teacher") / "tiny_flux")


@pytest.fixture(scope="session")
def tiny_sana_teacher(tmp_path_factory) -> Path:
    from codi_lightning.testing.tiny import write_tiny_sana_teacher

    return write_tiny_sana_teacher(tmp_path_factory.mktemp("teacher") / "tiny_sana")


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> dict[str, str]:
    """Two train shards (32 images) and one val shard (10 images) of generated pictures."""
    from codi_lightning.data import write_shards
    from codi_lightning.demo import write_image_folder

    root = tmp_path_factory.mktemp("shards")
    write_image_folder(root / "train_img", 32, seed=0)
    write_image_folder(root / "val_img", 10, seed=1)
    write_shards(str(root / "train_img"), str(root / "train-%06d.tar"), maxcount=16, progress=False)
    write_shards(str(root / "val_img"), str(root / "val-%06d.tar"), maxcount=16, progress=False)
    return {
        "train": str(root / "train-{000000..000001}.tar"),
        "val": str(root / "val-000000.tar"),
        "root": str(root),
    }
