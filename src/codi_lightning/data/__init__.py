"""Data: safe WebDataset decoding, condition recipes, paired transforms, the DataModule and
the shard writers."""

from .cache import write_cached_shards
from .datamodule import PairStage, ShardDataModule, ShardSource
from .decode import BadSample, decode_sample
from .depth import write_depth_shards
from .pixels import float_pixels
from .recipes import CONDITIONS, canny_edges, inpaint_condition, make_recipe, realesrgan_low
from .shards import write_edit_shards, write_shards
from .transforms import PairTransform, sr_bicubic

__all__ = [
    "CONDITIONS",
    "BadSample",
    "PairStage",
    "PairTransform",
    "ShardDataModule",
    "ShardSource",
    "canny_edges",
    "decode_sample",
    "float_pixels",
    "inpaint_condition",
    "make_recipe",
    "realesrgan_low",
    "sr_bicubic",
    "write_cached_shards",
    "write_depth_shards",
    "write_edit_shards",
    "write_shards",
]
