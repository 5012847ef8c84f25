"""The cost of the up-front checkpoint check on a 1 GB file.

    python bench/checkpoint_check.py [--gb 1] [--repeats 3]

Writes a Lightning-shaped checkpoint of ``--gb`` GB of fp32 weights, then times, each
``--repeats`` times (the file in the page cache after the first write, as right after
training): ``check_checkpoint`` (the zip's CRC-32s over the whole file, then the
``weights_only`` probe with memory-mapped tensors) and, for scale, ``torch.load`` of the
whole checkpoint with ``weights_only=True``. Numbers go to docs/performance.md by hand.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from codi_lightning.checkpoints import _probe, _verify_crc, check_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = int(args.gb * 2**30 / 4)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.ckpt"
        chunks = {f"w{i}": torch.randn(n // 16) for i in range(16)}
        torch.save({"global_step": 1, "state_dict": chunks, "hyper_parameters": {}}, path)
        print(f"{path.stat().st_size / 2**30:.2f} GiB", flush=True)
        timings: dict[str, list[float]] = {"check_checkpoint": [], "crc": [], "probe": [],
                                           "torch.load": []}  # fmt: skip
        for _ in range(args.repeats):
            for name, run in (
                ("check_checkpoint", lambda: check_checkpoint(path)),
                ("crc", lambda: _verify_crc(path)),
                ("probe", lambda: _probe(path)),
                ("torch.load", lambda: torch.load(path, map_location="cpu", weights_only=True)),
            ):
                start = time.perf_counter()
                run()
                timings[name].append(time.perf_counter() - start)
        for name, values in timings.items():
            print(f"{name}: " + ", ".join(f"{v:.2f} s" for v in values), flush=True)


if __name__ == "__main__":
    main()
