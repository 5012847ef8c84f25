"""Write the digits testbed's shards (codi_lightning.data.digits: 4,000 training digits,
1,000 test digits, of which test-000000.tar holds the 512 that are evaluated).

    python bench/digits_data.py --out bench_out/digits
"""

from __future__ import annotations

import argparse

from codi_lightning.data.digits import N_TRAIN, TEST_SHARD, digits, prepare, split

__all__ = ["N_TRAIN", "TEST_SHARD", "digits", "prepare", "split"]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench_out/digits")
    print(prepare(parser.parse_args().out))
