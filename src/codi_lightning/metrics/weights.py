"""Find metric weights locally, or fail at once with a message that says where to put them.

torchmetrics (through torch-fidelity and torchvision) downloads Inception and LPIPS
backbone weights into the torch hub cache on first use. Offline, that download fails
only after retries; here we look first and, when the file is missing and its host
cannot be reached within a few seconds, stop with the file name and the place for it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
LPIPS_BACKBONE_URLS = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
}


class MissingWeightsError(FileNotFoundError):
    """Metric weights are neither given, cached nor downloadable."""


def reachable(host: str, timeout: float = 3.0) -> bool:
    """True if a TCP connection to ``host:443`` opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_cache_file(url: str) -> Path:
    """Where ``torch.hub`` keeps the file of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def resolve_weights(what: str, url: str, given: str | None, option: str) -> Path | None:
    """The local weights file for ``url``: ``given`` if set (must exist), else the torch
    hub cache copy if present, else None when the host is reachable (the library
    downloads it). Otherwise raise :class:`MissingWeightsError` naming the file."""
    name = os.path.basename(urlparse(url).path)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise MissingWeightsError(
                f"{option}={given!r}: no such file (expected {name}, from {url})"
            )
        return path
    cached = hub_cache_file(url)
    if cached.is_file():
        return cached
    host = urlparse(url).hostname or ""
    if reachable(host):
        return None
    raise MissingWeightsError(
        f"{what} weights {name} are not in the torch hub cache ({cached}) and {host} cannot be "
        f"reached. Download {url} and put it at {cached}, or set {option}=/path/to/{name}. "
        "To evaluate without these weights, turn the metric off in model.metrics."
    )


@contextlib.contextmanager
def hub_dir_holding(path: Path, url: str) -> Iterator[None]:
    """Temporarily point ``torch.hub`` at a folder where ``path`` appears under the file
    name of ``url``, so libraries that load ``url`` through the hub cache find it."""
    old = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / "checkpoints" / os.path.basename(urlparse(url).path)
        link.parent.mkdir(parents=True)
        link.symlink_to(Path(path).resolve())
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub.set_dir(old)
