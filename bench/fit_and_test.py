"""Train, then test the last checkpoint, in one process.

    python bench/fit_and_test.py --config configs/toy/distill.yaml [overrides...]
    python bench/fit_and_test.py --curve_steps 4 --config ... \
        --trainer.callbacks.every_n_train_steps 250 --trainer.callbacks.save_top_k -1

The same as ``codi-lightning fit ...`` followed by ``codi-lightning test ... --ckpt_path
<last.ckpt>``, without the second start-up (the imports alone take ~14 s on 2
CPU cores, then the model is built again). Used by bench/quality.py.

With ``--curve_steps N [M ...]`` every intermediate checkpoint the run saved
(``every_n_train_steps``) is tested too, at N, M, ... sampling steps only, before the
last one is tested in full: ``curve.json`` in the run folder holds, per training step,
the wall-clock seconds since the start of training and the metrics (a learning curve).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from codi_lightning.cli import CoDiCLI


def split_args(args: list[str]) -> tuple[list[int], list[str]]:
    """``--curve_steps 4 8 ...`` (this script's) and the rest (the CLI's)."""
    if "--curve_steps" not in args:
        return [], args
    i = args.index("--curve_steps")
    j = i + 1
    while j < len(args) and args[j].isdigit():
        j += 1
    if j == i + 1:
        raise SystemExit("--curve_steps needs at least one step count, e.g. --curve_steps 4")
    return [int(a) for a in args[i + 1 : j]], args[:i] + args[j:]


def checkpoint_step(path: Path) -> int | None:
    found = re.search(r"step=(\d+)", path.name)
    return int(found.group(1)) if found else None


def main(args: list[str]) -> None:
    curve_steps, cli_args = split_args(args)
    start = time.time()
    cli = CoDiCLI(args=["fit", *cli_args])
    trainer, model = cli.trainer, cli.model
    callback = trainer.checkpoint_callback
    if callback is None or not callback.save_last:
        raise SystemExit("fit_and_test needs a ModelCheckpoint with save_last: true")
    last_step = trainer.global_step
    if curve_steps:
        saved = [
            p
            for p in Path(callback.dirpath).glob("*.ckpt")
            if checkpoint_step(p) and checkpoint_step(p) < last_step  # the last: tested below
        ]
        curve = {}
        full_steps = model.hparams.test_steps
        model.hparams.test_steps = curve_steps
        for path in sorted(saved, key=checkpoint_step):
            model.eval_suite = None  # rebuilt for the curve's step counts
            trainer.test(model, datamodule=cli.datamodule, ckpt_path=str(path))
            curve[checkpoint_step(path)] = {
                "train_seconds": path.stat().st_mtime - start,
                "results": {str(k): v for k, v in model.test_results.items()},
            }
        model.hparams.test_steps = full_steps
        model.eval_suite = None
    trainer.test(model, datamodule=cli.datamodule, ckpt_path="last")
    if curve_steps and trainer.global_rank == 0:
        final = Path(callback.dirpath) / "last.ckpt"
        curve[last_step] = {
            "train_seconds": final.stat().st_mtime - start,
            "results": {str(k): v for k, v in model.test_results.items() if k in curve_steps},
        }
        out = model.run_dir / "curve.json"
        out.write_text(json.dumps(dict(sorted(curve.items())), indent=2))
        print(f"learning curve written to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
