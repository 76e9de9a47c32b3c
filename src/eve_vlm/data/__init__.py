"""Training data: record readers, encoding with skip accounting, batching / packing, curation."""

from .batching import (
    BatchConfig,
    EveBatches,
    LengthGroupedBatcher,
    StreamingPacker,
    collate_packed,
    collate_padded,
    iter_batches,
    length_grouped_batches,
    pack_examples,
    pack_lengths,
    padding_waste,
)
from .dataset import (
    DataConfig,
    EveDataset,
    Example,
    SkipRecord,
    SkipStats,
    TooManyBrokenRecords,
    encode_record,
    teacher_fn_from_processor,
    truncate,
)
from .records import JsonRecords, ReaderConfig, Record, RecordSource, Split, open_records
from .webdataset import TarRecords, expand_shards

__all__ = [
    "BatchConfig", "DataConfig", "EveBatches", "EveDataset", "Example", "JsonRecords", "LengthGroupedBatcher",
    "ReaderConfig", "Record", "RecordSource", "SkipRecord", "SkipStats", "Split", "StreamingPacker",
    "TarRecords", "TooManyBrokenRecords", "collate_packed", "collate_padded", "encode_record",
    "expand_shards", "iter_batches", "length_grouped_batches", "open_records", "pack_examples",
    "pack_lengths", "padding_waste", "teacher_fn_from_processor", "truncate",
]
