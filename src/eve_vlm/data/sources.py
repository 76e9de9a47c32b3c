"""Open a training data source by its path: tar shards or a JSON / JSONL manifest.

This sits above both readers so that neither has to know the other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .manifest import JsonRecords
from .records import ReaderConfig, RecordSource
from .webdataset import TarRecords


def open_records(path: str | Sequence[str], config: ReaderConfig | None = None) -> RecordSource:
    """Pick the reader from the path: ``*.tar`` (glob / brace patterns allowed) or JSON / JSONL."""
    if not isinstance(path, str) or ".tar" in path:
        return TarRecords(path, config)
    if not os.path.exists(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    return JsonRecords(path, config)
