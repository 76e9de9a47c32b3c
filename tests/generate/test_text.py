"""TextDeltas: incremental detokenisation equals decoding the whole answer, with bounded work per token."""

from __future__ import annotations

import random

import pytest

from eve_vlm.generate import TextDeltas
from eve_vlm.testing import make_tiny_tokenizer

SENTENCE = "The red circle sits next to a blue triangle. Größe: 12 €; café, naïve — done!\n"


class CountingTokenizer:
    """Wraps a tokenizer and records the length of every token list it is asked to decode."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, ids, **kwargs) -> str:
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def metaspace_tokenizer():
    """A SentencePiece-style tokenizer ("▁" marks a word start, stripped at the start of a decode)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False)
    tok.train_from_iterator([SENTENCE] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module", params=["byte-level", "metaspace"])
def tokenizer(request):
    return make_tiny_tokenizer("v2") if request.param == "byte-level" else metaspace_tokenizer()


def stream(deltas: TextDeltas, ids: list[int], row: int = 0) -> list[str]:
    pieces = [deltas.delta(row, ids[: n + 1]) for n in range(len(ids))]
    return [*pieces, deltas.delta(row, ids, final=True)]


def test_pieces_concatenate_to_the_full_decode(tokenizer):
    ids = tokenizer.encode(SENTENCE * 3, add_special_tokens=False)
    pieces = stream(TextDeltas(tokenizer, 1), ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert sum(1 for p in pieces if p) > len(ids) // 4, "text should arrive as the tokens do"


def test_random_tokens_and_split_utf8_characters():
    tok = make_tiny_tokenizer("v2")
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tok)) for _ in range(40)]
        pieces = stream(TextDeltas(tok, 1), ids)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
        assert not any(p.endswith("\ufffd") for p in pieces[:-1]), "half a character was printed"


def test_each_token_decodes_only_a_short_window(tokenizer):
    counting = CountingTokenizer(tokenizer)
    ids = tokenizer.encode(SENTENCE * 12, add_special_tokens=False)
    assert len(ids) > 200
    pieces = stream(TextDeltas(counting, 1), ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(counting.lengths) <= 8, "decoding must not grow with the answer length"
    assert len(counting.lengths) <= 2 * len(ids) + 2


def test_stop_strings_are_held_back_and_cut_strings_end_the_text(tokenizer):
    ids = tokenizer.encode(SENTENCE, add_special_tokens=False)
    text = tokenizer.decode(ids)
    held = TextDeltas(tokenizer, 1, stop_strings=["blue triangle!"])
    pieces = stream(held, ids)
    assert "".join(pieces) == text  # never completed: everything arrives, some of it late
    assert not any(p.endswith("blue") for p in pieces[:-1] if "triangle" not in p)

    cut = TextDeltas(tokenizer, 1, cut_strings=["circle"])
    out = []
    for n in range(len(ids)):
        out.append(cut.delta(0, ids[: n + 1]))
        if cut.stopped[0]:
            break
    assert cut.stopped[0]
    assert "".join(out) == text[: text.index("circle")]
    assert cut.delta(0, ids, final=True) == ""
    assert cut.text(0) == text[: text.index("circle")]


def test_a_trimmed_token_list_resyncs(tokenizer):
    """When generation drops tokens it had produced (a stop string), the final text follows."""
    ids = tokenizer.encode(SENTENCE, add_special_tokens=False)
    deltas = TextDeltas(tokenizer, 2)
    printed = "".join(deltas.delta(1, ids[: n + 1]) for n in range(len(ids)))
    kept = ids[: len(ids) // 2]
    printed += deltas.delta(1, kept, final=True)
    full = tokenizer.decode(ids)
    assert printed == full  # what was printed stays printed; nothing is repeated
    assert deltas.delta(0, kept, final=True) == tokenizer.decode(kept)  # rows are independent
