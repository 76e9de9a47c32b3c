"""Incremental detokenisation: printable text deltas from growing token lists.

Decoding a whole answer on every new token costs time quadratic in its length. Here each row keeps
two offsets into its tokens (as text-generation servers do): text is decoded only from a short
window of recent tokens, and the new text is what the window's decode adds to the decode of its
already-printed part. Decoding a window rather than the single new token keeps tokenisers that
merge or drop spaces at word starts right, and an incomplete UTF-8 character (a decode ending in
U+FFFD) is held back until the token that completes it arrives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 5  # tokens of context decoded before new ones after a resync


class TextDeltas:
    """Turns growing token lists into printable text deltas, one decoder state per row.

    `stop_strings` are held back while the text ends with a proper prefix of one, so a stop string
    is never printed in part. `cut_strings` (a server's per-request stops) are held back the same
    way and also end the text: the delta that completes one returns the text before it and marks
    the row in `stopped`; later calls for that row return "".
    """

    def __init__(
        self,
        tokenizer: Any,
        rows: int,
        stop_strings: Sequence[str] | None = None,
        cut_strings: Sequence[str] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.cuts = [s for s in (cut_strings or []) if s]
        self.stops = [s for s in (stop_strings or []) if s] + self.cuts
        self.stopped = [False] * rows
        self._prefix = [0] * rows  # start of the decode window
        self._read = [0] * rows  # tokens whose text has been produced
        self._pending = [""] * rows  # produced but not printed: could start a stop string
        self._printed: list[list[str]] = [[] for _ in range(rows)]

    def text(self, row: int) -> str:
        """Everything printed for `row` so far."""
        return "".join(self._printed[row])

    def delta(self, row: int, tokens: list[int], final: bool = False) -> str:
        """The printable text `tokens` add since the last call for `row` (`final`: flush all)."""
        if self.stopped[row]:
            return ""
        if len(tokens) < self._read[row]:
            self._resync(row, tokens)  # the list was cut back (a stop string was trimmed)
        else:
            self._pending[row] += self._decode_new(row, tokens, final)
        pending = self._pending[row]
        cut = self._find_cut(pending)
        if cut is not None:
            self.stopped[row] = True
            return self._print(row, pending[:cut], "")
        hold = 0 if final else self._stop_prefix_len(pending)
        return self._print(row, pending[: len(pending) - hold], pending[len(pending) - hold :])

    # ------------------------------------------------------------------ internals
    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _decode_new(self, row: int, tokens: list[int], final: bool) -> str:
        prefix, read = self._prefix[row], self._read[row]
        if read == len(tokens):
            return ""
        before = self._decode(tokens[prefix:read]) if read > prefix else ""
        window = self._decode(tokens[prefix:])
        if not final and (len(window) <= len(before) or window.endswith(REPLACEMENT_CHAR)):
            return ""  # nothing printable yet: keep widening the window
        self._prefix[row], self._read[row] = read, len(tokens)
        return window[len(before) :]

    def _resync(self, row: int, tokens: list[int]) -> None:
        """Re-derive the pending text from a full decode (once, when a row's tokens shrink)."""
        full, printed = self._decode(tokens), self.text(row)
        self._pending[row] = full[len(printed) :] if full.startswith(printed) else ""
        self._read[row] = len(tokens)
        self._prefix[row] = max(len(tokens) - CONTEXT_TOKENS, 0)

    def _print(self, row: int, piece: str, rest: str) -> str:
        self._pending[row] = rest
        if piece:
            self._printed[row].append(piece)
        return piece

    def _find_cut(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.cuts) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that could be the start of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[-n:]):
                    best = n
                    break
        return best
