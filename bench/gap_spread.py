"""The spread of a "share of the gap closed": a paired bootstrap over the test images.

Every run of the quality bench is tested on the same test digits in the same order and
stores each digit's features (``metrics.save_features``), so a resample of the test
digits (drawn with replacement) picks the same digits from every run and from the real
set. On each resample the FID of every run is recomputed, and with it the share of the
baseline's 4 -> 50 step gap a distilled model closes: (FID_b4 - FID_m) / (FID_b4 - FID_b50),
from the means over seeds as the report's main number is. The 2.5 and 97.5 percentiles of
those shares are the interval the report gives; the spread over seeds is given next to it,
seed by seed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fid_resamples(real: Tensor, fakes: dict[str, Tensor], draws: int, seed: int = 0
                  ) -> dict[str, Tensor]:  # fmt: skip
    """FID of each ``fakes[name]`` [N, D] against ``real`` [N, D] (row i: the same test
    image) on ``draws`` bootstrap resamples of the N rows, the same rows for every set.

    Per resample the real covariance's square root R is taken once (eigh), and
    tr((S_r S_f)^(1/2)) as the sum of the square roots of the eigenvalues of R S_f R (a
    symmetric matrix with the eigenvalues of S_r S_f); float64.
    """
    real = real.double()
    fakes = {name: f.double() for name, f in fakes.items()}
    n = len(real)
    for name, f in fakes.items():
        if len(f) != n:
            raise ValueError(f"{name}: {len(f)} feature rows against {n} real ones")
    gen = torch.Generator().manual_seed(seed)
    out = {name: torch.empty(draws, dtype=torch.float64) for name in fakes}
    for b in range(draws):
        rows = torch.randint(n, (n,), generator=gen)
        r = real[rows]
        mu_r, cov_r = r.mean(0), torch.cov(r.T)
        w, v = torch.linalg.eigh(cov_r)
        root = (v * w.clamp_min(0).sqrt()) @ v.T
        for name, f in fakes.items():
            x = f[rows]
            mu_f, cov_f = x.mean(0), torch.cov(x.T)
            tr_sqrt = torch.linalg.eigvalsh(root @ cov_f @ root).clamp_min(0).sqrt().sum()
            out[name][b] = (
                (mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * tr_sqrt
            )
    return out


def share_interval(b4: list[Tensor], b50: list[Tensor], model: list[Tensor],
                   level: float = 0.95) -> tuple[float, float]:  # fmt: skip
    """The ``level`` percentile interval of the share of the gap closed, from per-seed
    resampled FIDs (one tensor of draws per seed, the same resamples for all): the
    share of the seed means, draw by draw."""
    m4, m50, mm = (torch.stack(v).mean(0) for v in (b4, b50, model))
    shares = (m4 - mm) / (m4 - m50)
    lo, hi = torch.quantile(
        shares, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=shares.dtype)
    )
    return float(lo), float(hi)
