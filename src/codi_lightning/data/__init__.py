"""Data: safe WebDataset decoding, paired transforms, the DataModule and the shard writer."""

from .datamodule import ShardDataModule
from .decode import BadSample, decode_sample
from .shards import write_shards
from .transforms import PairTransform, sr_bicubic

__all__ = [
    "BadSample",
    "PairTransform",
    "ShardDataModule",
    "decode_sample",
    "sr_bicubic",
    "write_shards",
]
