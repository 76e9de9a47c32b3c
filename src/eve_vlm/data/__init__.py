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
    merge_data_stats,
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
from .manifest import JsonRecords, is_jsonl, iter_manifest
from .order import Split
from .records import ReaderConfig, Record, RecordSource, record_from_dict
from .sources import open_records
from .stream import BatchStream, GlobalOrderRecords
from .webdataset import TarRecords, expand_shards

__all__ = [
    "BatchConfig", "BatchStream", "DataConfig", "EveBatches", "EveDataset", "Example", "GlobalOrderRecords",
    "JsonRecords", "LengthGroupedBatcher", "ReaderConfig", "Record", "RecordSource", "SkipRecord", "SkipStats",
    "Split", "StreamingPacker", "TarRecords", "TooManyBrokenRecords", "collate_packed", "collate_padded",
    "encode_record", "expand_shards", "is_jsonl", "iter_batches", "iter_manifest", "length_grouped_batches",
    "merge_data_stats", "open_records", "pack_examples", "pack_lengths", "padding_waste", "record_from_dict",
    "teacher_fn_from_processor", "truncate",
]
