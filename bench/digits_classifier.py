"""Train the digit classifiers whose features the digits experiment's FID/KID use.

    OMP_NUM_THREADS=1 python bench/digits_classifier.py                         # the main one
    OMP_NUM_THREADS=1 python bench/digits_classifier.py --architecture resnet   # the second

A :class:`~codi_lightning.metrics.DigitsClassifier` (small CNN, 128-d penultimate layer)
trained on the 4,000 TRAINING digits of bench/digits_data.py only (the split is the
same seeded permutation), with random shifts of up to 2 px; the test accuracy is measured
on the 1,000 test digits, which neither the classifier, the teacher nor the adapters see.
Writes ``bench/assets/digits_classifier/model.safetensors`` and ``info.json`` (accuracy,
command, settings, time). The metrics load it with ``metrics.feature: classifier`` and
``metrics.classifier_weights: bench/assets/digits_classifier/model.safetensors``.

``--architecture resnet`` trains the second feature network instead, a
:class:`~codi_lightning.metrics.DigitsResNet` (residual, strided, global pooling, 96-d
penultimate layer; another seed), on the same training digits only, into
``bench/assets/digits_resnet/``; ``metrics.resnet_classifier_weights`` adds its FID as the
column ``fid_res``, so that no claim rests on one feature network.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from digits_data import digits, split  # noqa: E402

from codi_lightning.metrics.features import ARCHITECTURES  # noqa: E402


def as_images(x) -> torch.Tensor:
    """uint8 [N, 32, 32] -> float [N, 3, 32, 32] in [0, 1] (as the metrics see images)."""
    return torch.from_numpy(x).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def shift(images: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Each image moved by a random integer offset in [-max_shift, max_shift] (zero fill)."""
    padded = F.pad(images, (max_shift,) * 4)
    out = torch.empty_like(images)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=gen)
    size = images.shape[-1]
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(images[i : i + 500]).argmax(1) for i in range(0, len(images), 500)])
    return float((pred == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="vgg")
    parser.add_argument("--out", default=None, help="default bench/assets/digits_classifier "
                        "(vgg) or bench/assets/digits_resnet (resnet)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--seed", type=int, default=None, help="default 0 (vgg), 1 (resnet)")
    args = parser.parse_args()
    resnet = args.architecture == "resnet"
    if args.seed is None:
        args.seed = 1 if resnet else 0
    if args.out is None:
        folder = "digits_resnet" if resnet else "digits_classifier"
        args.out = str(ROOT / "bench" / "assets" / folder)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = digits()
    train, test = split()
    x_train, y_train = as_images(x[train]), torch.from_numpy(y[train])
    x_test, y_test = as_images(x[test]), torch.from_numpy(y[test])
    model = ARCHITECTURES[args.architecture]()
    steps = args.epochs * (len(x_train) // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(len(x_train) // args.batch_size):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            loss = F.cross_entropy(model(shift(x_train[idx], gen)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, "
              f"train acc {accuracy(model, x_train, y_train):.4f}", flush=True)  # fmt: skip
    minutes = (time.time() - start) / 60
    acc = accuracy(model, x_test, y_test)
    evaluated = accuracy(model, x_test[:512], y_test[:512])  # test-000000.tar
    print(f"test accuracy {acc:.4f} on {len(x_test)} digits ({evaluated:.4f} on the first 512)")
    from safetensors.torch import save_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    info = {
        "command": "OMP_NUM_THREADS=1 python bench/digits_classifier.py " + " ".join(sys.argv[1:]),
        "architecture": f"codi_lightning.metrics.{type(model).__name__}",
        "train_digits": len(x_train),
        "test_digits": len(x_test),
        "test_accuracy": round(acc, 4),
        "test_accuracy_first_512": round(evaluated, 4),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "train_minutes_one_thread": round(minutes, 2),
        "torch": torch.__version__,
    }
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
