"""Data: images -> WebDataset shards (sources, writer; tools/make_shards.py) -> training batches (shards, stream)."""
from ebmscale.data.shards import check_shards, list_shards
from ebmscale.data.stream import CorruptDataError, Stream, build_stream

__all__ = ["build_stream", "check_shards", "list_shards", "CorruptDataError", "Stream"]
