"""Training records: the one format every reader yields, and the reader interface.

Readers (``manifest.py`` for JSON / JSONL, ``webdataset.py`` for tar shards; ``sources.py`` picks
one by path) yield :class:`Record` objects in a deterministic order given a seed and an epoch, can
be split over data-parallel ranks x dataloader workers, and can resume after a number of
already-consumed samples (the rule: ``order.py``). Parsing is lazy: a reader never decodes images,
and a record that cannot be parsed is yielded with ``error`` set so the dataset layer can count it
instead of crashing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .order import Split

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "system": "system"}


# --------------------------------------------------------------------------------------------
# records


@dataclass
class TarMember:
    """Location of one file inside a tar shard; read lazily so buffers and skips stay cheap."""

    shard: str
    name: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"truncated tar member {self.name} in {self.shard}")
        return data


ImageRef = str | TarMember  # a file path, or a member of a tar shard


@dataclass
class Record:
    """One training sample before encoding.

    ``messages`` is a chat as ``[{"role": "user"|"assistant"|"system", "content": str}]`` (LLaVA
    ``from``/``value`` keys are converted); caption pairs set ``caption`` instead. ``error`` names
    why a record could not be parsed (``bad_json``, ``bad_record``); it is then otherwise empty.
    """

    id: str
    images: list[ImageRef] = field(default_factory=list)
    messages: list[dict[str, str]] | None = None
    caption: str | None = None
    error: str | None = None
    # a record's own choice between its turns as one dialogue (False) or as independent questions
    # about the image (True); None follows the data set's DataConfig.independent_turns
    independent_turns: bool | None = None
    index: int = -1  # position in the split's stream (after shuffling), for resume bookkeeping

    @property
    def has_image(self) -> bool:
        return len(self.images) > 0

    def open_image(self, i: int) -> str | bytes:
        """A source for ``load_image``: a path, or the bytes of a tar member."""
        ref = self.images[i]
        return ref.read() if isinstance(ref, TarMember) else ref


def _resolve(path: str, image_root: str | None) -> str:
    if image_root is None or os.path.isabs(path):
        return path
    return os.path.join(image_root, path)


def record_from_dict(obj: Any, image_root: str | None = None, default_id: str = "") -> Record:
    """Convert a LLaVA-style conversation dict or an ``{"image", "caption"}`` pair to a Record.

    Raises ValueError naming the problem for anything else.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"record must be a JSON object, got {type(obj).__name__}")
    rid = str(obj.get("id", default_id))
    image = obj.get("image")
    if image is None:
        images: list[ImageRef] = []
    elif isinstance(image, str):
        images = [_resolve(image, image_root)]
    elif isinstance(image, list) and all(isinstance(p, str) for p in image):
        images = [_resolve(p, image_root) for p in image]
    else:
        raise ValueError(f"record {rid!r}: 'image' must be a string or a list of strings")
    if "conversations" in obj:
        convs = obj["conversations"]
        if not isinstance(convs, list):
            raise ValueError(f"record {rid!r}: 'conversations' must be a list")
        messages = []
        for turn in convs:
            if not isinstance(turn, dict):
                raise ValueError(f"record {rid!r}: conversation turn is not an object")
            role = ROLE_MAP.get(str(turn.get("from", turn.get("role", ""))).lower())
            value = turn.get("value", turn.get("content"))
            if role is None or not isinstance(value, str):
                raise ValueError(f"record {rid!r}: turn needs 'from' (human|gpt) and a string 'value'")
            messages.append({"role": role, "content": value})
        independent = obj.get("independent_turns")
        if independent is not None and not isinstance(independent, bool):
            raise ValueError(f"record {rid!r}: 'independent_turns' must be true or false")
        return Record(id=rid, images=images, messages=messages, independent_turns=independent)
    if "caption" in obj:
        caption = obj["caption"]
        if not isinstance(caption, str):
            raise ValueError(f"record {rid!r}: 'caption' must be a string")
        return Record(id=rid, images=images, caption=caption)
    raise ValueError(f"record {rid!r}: needs 'conversations' or 'caption'")


# --------------------------------------------------------------------------------------------
# the reader interface


@dataclass
class ReaderConfig:
    """Order / split / resume settings shared by every reader."""

    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1000
    image_root: str | None = None  # default: the manifest's directory


class RecordSource:
    """Base class: ``iter(epoch, split, position)`` yields Records; subclasses implement it."""

    def iter(self, epoch: int = 0, split: Split = Split(), position: int = 0) -> Iterator[Record]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Record]:
        return self.iter()
