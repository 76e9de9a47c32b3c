"""ChatSession: KV reuse across turns gives the answers of re-encoding the whole conversation."""

from __future__ import annotations

import pytest
import torch

from eve_vlm import EveForCausalLM
from eve_vlm.generate import GenerationConfig, generate
from eve_vlm.generate.chat import ChatSession, run_repl
from eve_vlm.processing import EveProcessor
from eve_vlm.testing import make_png

TURNS = ["What is this?", "And the colour?", "IMAGE2 Compare the two.", "Say more."]


def _play(session: ChatSession) -> list[tuple[str, int, int]]:
    """Run TURNS; returns (answer, reused tokens, fed tokens) per turn."""
    session.add_image(make_png(48, 32, (200, 30, 30), 0))
    out = []
    for turn in TURNS:
        if turn.startswith("IMAGE2 "):
            session.add_image(make_png(20, 70, (0, 0, 200), 1))
            turn = turn[len("IMAGE2 ") :]
        out.append((session.ask(turn), session.last_stats.reused_tokens, session.last_stats.fed_tokens))
    return out


def _reference(model, processor, session: ChatSession, cfg: GenerationConfig) -> str:
    """Re-encode the conversation so far (minus the last answer) from scratch and answer."""
    ids, images = session.full_prompt()
    res = generate(
        model,
        torch.tensor([ids]),
        images or None,
        torch.ones(1, len(ids), dtype=torch.long),
        config=GenerationConfig(
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=[processor.tokenizer.eos_token_id],
            stop_strings=cfg.stop_strings or processor.stop_strings,
        ),
        tokenizer=processor.tokenizer,
    )
    return processor.tokenizer.decode(res.sequences[0], skip_special_tokens=True).strip()


def test_kv_reuse_matches_reencoding(tiny):
    model, processor = tiny
    cfg = GenerationConfig(max_new_tokens=10)
    reused = _play(ChatSession(model, processor, cfg))
    fresh = _play(ChatSession(model, processor, cfg, reuse_cache=False))
    assert [a for a, _, _ in reused] == [a for a, _, _ in fresh]
    assert len({a for a, _, _ in reused}) > 1
    # Turn 1 feeds everything; later turns reuse at least the whole previous prompt (image included).
    assert reused[0][1] == 0
    for (_, reuse, fed), (_, prev_reuse, prev_fed) in zip(reused[1:], reused[:-1], strict=False):
        assert reuse >= prev_reuse + prev_fed
        assert 0 < fed < reuse
    assert all(r == 0 for _, r, _ in fresh)


def test_each_turn_equals_a_from_scratch_generation(tiny):
    model, processor = tiny
    cfg = GenerationConfig(max_new_tokens=10)
    session = ChatSession(model, processor, cfg)
    session.add_image(make_png(40, 40, (20, 180, 20), 2))
    for turn in TURNS[:3]:
        got = session.ask(turn.replace("IMAGE2 ", ""))
        session.messages.pop()  # the conversation as it was when this answer was generated
        expected = _reference(model, processor, session, cfg)
        session.messages.append({"role": "assistant", "content": got})
        assert got == expected


def test_stop_string_turn_keeps_cache_consistent(tiny):
    model, processor = tiny
    probe = ChatSession(model, processor, GenerationConfig(max_new_tokens=12))
    probe.add_image(make_png(48, 32))
    first = probe.ask("What is this?")
    stop = next(
        (first[i : i + 2] for i in range(3, len(first) - 2) if "\ufffd" not in first[i : i + 2]), None
    )
    if stop is None:
        pytest.skip("the tiny model's answer has no usable stop substring")
    cfg = GenerationConfig(max_new_tokens=12, stop_strings=[stop])
    answers = []
    for reuse in (True, False):
        session = ChatSession(model, processor, cfg, reuse_cache=reuse)
        session.add_image(make_png(48, 32))
        answers.append([session.ask("What is this?"), session.ask("Go on."), session.ask("And then?")])
        if reuse:
            assert session.last_stats.reused_tokens > 0
    assert answers[0] == answers[1]
    assert stop not in answers[0][0]


def test_reset_and_rollback(tiny):
    model, processor = tiny
    session = ChatSession(model, processor, GenerationConfig(max_new_tokens=6))
    session.add_image(make_png(48, 32))
    first = session.ask("What is this?")
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    # A turn abandoned half way is rolled back (the conversation stays consistent).
    stream = session.send("Another question")
    next(stream, None)
    stream.close()
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert len(session.images) == 1
    session.reset()
    assert session.messages == [] and session.images == []
    session.add_image(make_png(48, 32))
    assert session.ask("What is this?") == first
    assert session.last_stats.reused_tokens == 0


def test_repl_commands(tiny, tmp_path):
    model, processor = tiny
    image = tmp_path / "red.png"
    image.write_bytes(make_png(48, 32))
    lines = iter(
        [f"/image {image}", "What is this?", "/image /no/such/file.png", "/bogus", "/reset", "/help", "Hi"]
    )
    out: list[str] = []

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    session = ChatSession(model, processor, GenerationConfig(max_new_tokens=6))
    run_repl(session, read, out.append)
    text = "".join(out)
    expected = ChatSession(model, processor, GenerationConfig(max_new_tokens=6))
    expected.add_image(str(image))
    assert expected.ask("What is this?") in text
    assert "attached" in text
    assert "error: image file not found" in text
    assert "unknown command /bogus" in text
    assert "conversation reset" in text
    assert [m["role"] for m in session.messages] == ["user", "assistant"]  # only "Hi" after the reset
    assert session.messages[0]["content"] == "Hi"


def _cli(argv: list[str]) -> int:
    """`eve ARGV` in-process, through the real entry point (its error handling included)."""
    from eve_vlm.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def checkpoint(tiny_v2_dir):
    return tiny_v2_dir


def test_ask_cli_prints_only_the_answer(checkpoint, tmp_path, capsys):
    from eve_vlm.generate import answer

    image = tmp_path / "img.png"
    image.write_bytes(make_png(48, 32))
    code = _cli(
        ["ask", "--model", str(checkpoint), "--image", str(image), "--max-new-tokens", "8", "What is this?"]
    )
    out = capsys.readouterr()
    model, processor = EveForCausalLM.from_pretrained(checkpoint), EveProcessor.from_pretrained(checkpoint)
    expected = answer(model, processor, ["<image>\nWhat is this?"], [[str(image)]], max_new_tokens=8)[0]
    assert code == 0
    assert out.out == expected + "\n"

    code = _cli(["ask", "--model", str(checkpoint), "--image", str(tmp_path / "missing.png"), "Hi"])
    out = capsys.readouterr()
    assert code == 2 and out.out == "" and "missing.png" in out.err


def test_chat_cli_streams_answers(checkpoint, tmp_path, capsys, monkeypatch):
    import io

    image = tmp_path / "img.png"
    image.write_bytes(make_png(48, 32))
    monkeypatch.setattr("sys.stdin", io.StringIO("What is this?\nAnd now?\n"))
    code = _cli(["chat", "--model", str(checkpoint), "--image", str(image), "--max-new-tokens", "6"])
    out = capsys.readouterr()
    model, processor = EveForCausalLM.from_pretrained(checkpoint), EveProcessor.from_pretrained(checkpoint)
    session = ChatSession(model, processor, GenerationConfig(max_new_tokens=6))
    session.add_image(str(image))
    first, second = session.ask("What is this?"), session.ask("And now?")
    assert code == 0
    assert first in out.out and second in out.out
    assert "/image FILE" in out.err  # the help line goes to stderr, not into the transcript
