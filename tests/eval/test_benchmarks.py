"""Benchmark readers, prompts, scorers, submission files and the resumable runner.

Every benchmark runs end to end over a tiny fixture in its real file layout with a fake
answerer whose answers are chosen so the expected scores can be computed by hand.
"""

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from eve_vlm.eval import EvalItem, format_table, get_benchmark, rescore, run_eval
from eve_vlm.eval.benchmarks import MC_SUFFIX, SHORT_ANSWER_SUFFIX, VIZWIZ_HINT, ScienceQA, TextVQA
from eve_vlm.eval.runner import load_predictions

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"


class FakeAnswerer:
    """Answers from a table keyed by question id; loads every image to prove paths resolve."""

    def __init__(self, answers: dict[str, str], default: str = "unknown"):
        self.answers = answers
        self.default = default
        self.calls: list[list[str]] = []

    def __call__(self, items: list[EvalItem]) -> list[str]:
        self.calls.append([it.key for it in items])
        for it in items:
            images = it.load_images()
            assert len(images) == len(it.images) and all(im.mode == "RGB" for im in images)
            assert it.user_message.count("<image>") == len(it.images)
        return [self.answers.get(it.key, self.default) for it in items]

    @property
    def asked(self) -> list[str]:
        return [k for call in self.calls for k in call]


CASES = {
    "gqa": (
        "gqa",
        {"201307251": "No.", "201640614": "Left", "202225914": "dog"},
        {"accuracy": 200 / 3, "accuracy/query": 50.0, "accuracy/verify": 100.0},
    ),
    "vizwiz_val": (
        "vizwiz/Annotations/val.json",
        {"VizWiz_val_00000000.jpg": "Unanswerable", "VizWiz_val_00000001.jpg": "Red"},
        {"accuracy": 95.0},  # (1.0 + 0.9) / 2
    ),
    "textvqa": (
        "textvqa",
        {"34602": "Coca-Cola.", "34603": "two"},
        {"accuracy": 80.0},  # (1.0 + 0.6) / 2
    ),
    "pope": (
        "pope",
        {
            "adversarial/1": "Yes, there is.",
            "adversarial/2": "No.",
            "adversarial/3": "There is not a car.",
            "adversarial/4": "Yes",
            "popular/1": "yes",
            "popular/2": "no",
            "random/1": "yes",
            "random/2": "no",
        },
        {
            "adversarial/f1": 50.0,
            "adversarial/accuracy": 50.0,
            "adversarial/tp": 1,
            "adversarial/fn": 1,
            "popular/f1": 100.0,
            "random/precision": 100.0,
            "random/recall": 50.0,
            "random/f1": 200 / 3,
            "random/yes_ratio": 50.0,
            "f1_mean": (50 + 100 + 200 / 3) / 3,
        },
    ),
    "mme": (
        "mme",
        {
            "existence/000000006040.jpg/0": "Yes",
            "existence/000000006040.jpg/1": "No",
            "existence/000000018150.png/0": "yes, there is",
            "existence/000000018150.png/1": "Yes",
            "artwork/10002.jpg/0": "No",
            "artwork/10002.jpg/1": "no",
            "code_reasoning/0020.png/0": "The answer is yes",
            "code_reasoning/0020.png/1": "no",
        },
        {
            "existence/acc": 75.0,
            "existence/acc_plus": 50.0,
            "existence/score": 125.0,
            "artwork/score": 50.0,
            "code_reasoning/score": 50.0,
            "perception": 175.0,
            "cognition": 50.0,
            "total": 225.0,
        },
    ),
    "scienceqa": (
        "scienceqa",
        {"5": "The answer is A.", "7": "B", "11": "C"},
        {
            "accuracy": 200 / 3,
            "failed": 0,
            "accuracy/social science": 100.0,
            "accuracy/natural science": 50.0,
        },
    ),
    "mmbench": (
        "mmbench",
        {"0": "A", "1": "B. dog", "2": "D"},
        {"accuracy": 100 / 3, "accuracy_tolerant": 200 / 3},
    ),
    "seed": (
        "seed",
        {"101669": "A", "101670": "B", "101671": "C."},
        {"accuracy": 100 / 3, "accuracy_tolerant": 200 / 3, "accuracy/Scene Understanding": 100.0},
    ),
    "generic": (
        "generic",
        {"q1": "red", "q2": "1", "q3": "Same"},
        {"accuracy": (0.6 + 1.0 + 0.0) / 3 * 100},
    ),
}


def _benchmark_name(case: str) -> str:
    return case.split("_")[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_end_to_end_scores(case, tmp_path):
    data, answers, expected = CASES[case]
    fake = FakeAnswerer(answers)
    results = run_eval(_benchmark_name(case), FIXTURES / data, fake, out_dir=tmp_path, batch_size=2)
    assert sorted(fake.asked) == sorted(answers), "every fixture question is asked exactly once"
    assert results["num_missing"] == 0
    for key, value in expected.items():
        assert results["metrics"][key] == pytest.approx(value), key
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert results["headline"]["value"] == pytest.approx(results["metrics"][results["headline"]["metric"]])
    assert "answered" in format_table(results)


def test_prompts_carry_the_official_suffixes():
    items = {it.key: it for it in get_benchmark("vqav2", FIXTURES / "vqav2").items()}
    # Already present in the LLaVA file: not doubled; missing: appended.
    assert items["1000"].prompt_text == "What color is the bus?" + SHORT_ANSWER_SUFFIX
    assert items["2000"].prompt_text == "Is it raining?" + SHORT_ANSWER_SUFFIX
    assert items["2000"].user_message == "<image>\nIs it raining?" + SHORT_ANSWER_SUFFIX

    viz = next(get_benchmark("vizwiz", FIXTURES / "vizwiz/Annotations/val.json").items())
    assert viz.prompt_text == "What is this?" + VIZWIZ_HINT + SHORT_ANSWER_SUFFIX

    sqa = {it.key: it for it in get_benchmark("scienceqa", FIXTURES / "scienceqa").items()}
    assert sorted(sqa) == ["11", "5", "7"]  # the image-less question 9 and train question 12 are skipped
    assert sqa["7"].prompt_text == (
        "Context: Lynxes live in cold places.\nWhich animal's feet are also adapted for walking on snow?"
        "\nA. camel\nB. lynx" + MC_SUFFIX
    )
    assert sqa["5"].prompt_text.startswith("Context: N/A\nWhich of these states")

    mmb = {it.key: it for it in get_benchmark("mmbench", FIXTURES / "mmbench").items()}
    assert mmb["1"].prompt_text == (
        "The picture was taken in a zoo.\nWhich animal is shown?\nA. cat\nB. dog\nC. bird" + MC_SUFFIX
    )
    assert mmb["2"].load_images()[0].getpixel((0, 0)) == (10, 200, 10)  # image referenced by row index

    seed = {it.key: it for it in get_benchmark("seed", FIXTURES / "seed").items()}
    assert "900001" not in seed  # video question skipped
    assert (
        seed["101669"].prompt_text
        == "What is the weather?\nA. sunny\nB. rainy\nC. snowy\nD. foggy" + MC_SUFFIX
    )

    tvqa = list(get_benchmark("textvqa", FIXTURES / "textvqa").items())
    assert tvqa[0].prompt_text.split("\n") == [
        "what brand is the drink?",
        "Reference OCR token: Coca, Cola, Classic",
        SHORT_ANSWER_SUFFIX.strip(),
    ]
    assert [it.question_id for it in tvqa] == [34602, 34603]  # real ids, not LLaVA's image ids

    mmvet = next(get_benchmark("mmvet", FIXTURES / "mmvet").items())
    assert mmvet.prompt_text == "What is x in the equation?"  # free-form: raw question

    generic = list(get_benchmark("generic", FIXTURES / "generic").items())
    assert generic[2].user_message.startswith("<image>\n<image>\nCompare")


def test_text_helpers():
    assert TextVQA.build_prompt("what?", []) == "what?" + SHORT_ANSWER_SUFFIX
    assert TextVQA.question_from_prompt("What Is It?\nReference OCR token: a, b\nAnswer.") == "what is it?"
    assert TextVQA.question_from_prompt("Reference OCR token: a\nWhat?\nAnswer.") == "what?"
    with pytest.raises(ValueError, match="unexpected prompt layout"):
        TextVQA.question_from_prompt("one line")
    p = {"question": "Q?", "choices": ["x", "y", "z"], "hint": "  "}
    assert ScienceQA.build_prompt(p) == "Context: N/A\nQ?\nA. x\nB. y\nC. z" + MC_SUFFIX


def test_vqav2_submission_covers_all_test_ids(tmp_path):
    answers = {"1000": "Red.", "1001": "Two", "2000": "yes"}
    results = run_eval("vqav2", FIXTURES / "vqav2", FakeAnswerer(answers), out_dir=tmp_path)
    assert results["metrics"] == {} and results["headline"] is None  # test-dev is scored by the server
    sub = json.loads(Path(results["submission_files"][0]).read_text())
    assert sub == [
        {"question_id": 1000, "answer": "red"},
        {"question_id": 1001, "answer": "2"},
        {"question_id": 2000, "answer": "yes"},
        {"question_id": 3000, "answer": ""},  # in test2015 but not test-dev
    ]


def test_vizwiz_test_submission(tmp_path):
    results = run_eval(
        "vizwiz", FIXTURES / "vizwiz", FakeAnswerer({"0": "Unanswerable.", "1": "The red"}), out_dir=tmp_path
    )
    sub = json.loads(Path(results["submission_files"][0]).read_text())
    assert sub == [
        {"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"},
        {"image": "VizWiz_test_00000001.jpg", "answer": "red"},
    ]


def test_server_and_tool_files(tmp_path):
    res = run_eval(
        "mmvet",
        FIXTURES / "mmvet",
        FakeAnswerer({"v1_0": "x = -1", "v1_1": "A cat."}),
        out_dir=tmp_path / "v",
    )
    assert json.loads(Path(res["submission_files"][0]).read_text()) == {"v1_0": "x = -1", "v1_1": "A cat."}

    res = run_eval("mme", FIXTURES / "mme", FakeAnswerer({}, default="Yes\nindeed"), out_dir=tmp_path / "m")
    art = next(p for p in res["submission_files"] if p.endswith("artwork.txt"))
    first = Path(art).read_text().splitlines()[0].split("\t")
    assert first == [
        "10002.jpg",
        "Does this artwork exist in the form of painting? Please answer yes or no.",
        "Yes",
        "Yes indeed",
    ]

    res = run_eval(
        "mmbench", FIXTURES / "mmbench", FakeAnswerer({"0": "A"}, default="C"), out_dir=tmp_path / "b"
    )
    path = Path(res["submission_files"][0])
    if path.suffix == ".tsv":
        rows = list(csv.DictReader(path.open(encoding="utf-8"), delimiter="\t"))
        assert [r["prediction"] for r in rows] == ["A", "C", "C"]
        assert "image" not in rows[0] and rows[1]["answer"] == "B"

    res = run_eval("gqa", FIXTURES / "gqa", FakeAnswerer({}, default="Yes."), out_dir=tmp_path / "g")
    preds = json.loads(Path(res["submission_files"][0]).read_text())
    assert preds[0] == {"questionId": "201307251", "prediction": "yes"}


def test_resume_only_asks_missing_items(tmp_path):
    answers = CASES["pope"][1]
    first = FakeAnswerer(answers)
    partial = run_eval("pope", FIXTURES / "pope", first, out_dir=tmp_path, limit=3, batch_size=2)
    assert first.calls == [["adversarial/1", "adversarial/2"], ["adversarial/3"]]
    assert partial["num_items"] == 3

    second = FakeAnswerer(answers)
    full = run_eval("pope", FIXTURES / "pope", second, out_dir=tmp_path, batch_size=4)
    assert second.asked == ["adversarial/4", "popular/1", "popular/2", "random/1", "random/2"]
    assert full["metrics"]["f1_mean"] == pytest.approx(CASES["pope"][2]["f1_mean"])

    third = FakeAnswerer(answers)
    run_eval("pope", FIXTURES / "pope", third, out_dir=tmp_path)
    assert third.calls == []
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 8


def test_interrupted_run_resumes_and_rescores(tmp_path):
    answers = CASES["textvqa"][1]

    class Crash(Exception):
        pass

    def crashing(items):
        if any(it.key == "34603" for it in items):
            raise Crash
        return [answers[it.key] for it in items]

    with pytest.raises(Crash):
        run_eval("textvqa", FIXTURES / "textvqa", crashing, out_dir=tmp_path, batch_size=1)
    # The first answer survived the crash; a torn final line (killed mid-write) is tolerated.
    with open(tmp_path / "predictions.jsonl", "a") as f:
        f.write('{"question_id": 346')
    assert load_predictions(tmp_path / "predictions.jsonl") == {"34602": "Coca-Cola."}

    partial = rescore(tmp_path)
    assert partial["num_missing"] == 1 and partial["metrics"]["accuracy"] == pytest.approx(100.0)

    # Resuming cuts the torn line before appending, so every record stays on its own line.
    fake = FakeAnswerer(answers)
    run_eval("textvqa", FIXTURES / "textvqa", fake, out_dir=tmp_path)
    assert fake.asked == ["34603"]
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 2
    assert rescore(tmp_path)["metrics"]["accuracy"] == pytest.approx(80.0)


def test_rescore_reads_edited_predictions(tmp_path):
    run_eval("seed", FIXTURES / "seed", FakeAnswerer({}, default="Z"), out_dir=tmp_path)
    assert rescore(tmp_path)["metrics"]["accuracy"] == 0.0
    path = tmp_path / "predictions.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    for r in recs:
        r["prediction"] = {"101669": "A", "101670": "C", "101671": "C"}[r["question_id"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert rescore(tmp_path)["metrics"]["accuracy"] == pytest.approx(100.0)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark"):
        get_benchmark("nope", FIXTURES)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_benchmark("gqa", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="none of these files"):
        list(get_benchmark("seed", tmp_path).items())
    with pytest.raises(RuntimeError, match="returned 0 answers"):
        run_eval("seed", FIXTURES / "seed", lambda items: [], out_dir=tmp_path / "a")
    run_eval("seed", FIXTURES / "seed", lambda items: ["A"] * len(items), out_dir=tmp_path / "b")
    with pytest.raises(ValueError, match="holds predictions for benchmark 'seed'"):
        run_eval("mmvet", FIXTURES / "mmvet", lambda items: ["x"] * len(items), out_dir=tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EvalItem("q", "text", (tmp_path / "nope.png",)).load_images()


def test_eval_item_loads_pil_and_bytes(tmp_path):
    im = Image.new("L", (3, 3), 7)
    path = tmp_path / "x.png"
    im.save(path)
    item = EvalItem("q", "hi", (im, path.read_bytes(), path))
    loaded = item.load_images()
    assert [x.mode for x in loaded] == ["RGB"] * 3 and loaded[1].size == (3, 3)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _parser():
    import argparse

    from eve_vlm.eval import cli

    parser = argparse.ArgumentParser(prog="eve")
    cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_rescore_prints_table(tmp_path, capsys):
    run_eval("gqa", FIXTURES / "gqa", FakeAnswerer(CASES["gqa"][1]), out_dir=tmp_path)
    args = _parser().parse_args(["eval", "--rescore", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "* accuracy" in out and "66.67" in out


def test_cli_reports_missing_arguments_and_bad_dirs(tmp_path, capsys):
    from eve_vlm.cli import main

    assert main(["eval", "--benchmark", "gqa"]) == 2
    err = capsys.readouterr().err
    assert "--model, --data required" in err and err.count("\n") == 1  # one line, no traceback
    assert main(["eval", "--rescore", str(tmp_path)]) == 2
    assert "not an eval output folder" in capsys.readouterr().err


def test_cli_parses_a_model_run():
    args = _parser().parse_args(
        [
            "eval",
            "--model",
            "ckpt",
            "--benchmark",
            "pope",
            "--data",
            "d",
            "--limit",
            "5",
            "--batch-size",
            "4",
            "--out",
            "o",
            "--max-new-tokens",
            "16",
        ]
    )
    assert (args.model, args.benchmark, args.limit, args.batch_size, args.max_new_tokens) == (
        "ckpt",
        "pope",
        5,
        4,
        16,
    )


# --------------------------------------------------------------------------------------
# lmms-eval adapter (fake processor and model; the request objects follow lmms-eval's Instance.args)
# --------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")


class Req:
    def __init__(self, *args):
        self.args = args


class CharProcessor:
    """Character-level stand-in for EveProcessor, rendering with the real vicuna_v1 template."""

    vocab = 128

    def __init__(self):
        from eve_vlm.processing.templates import get_template

        self.template = get_template("vicuna_v1")
        self.stop_strings = [self.template.stop_str]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return self.template.render(messages, add_generation_prompt=add_generation_prompt)

    def tokens(self, text):
        ids = []
        for i, part in enumerate(text.split("<image>")):
            if i:
                ids.append(-200)
            ids.extend(ord(c) % self.vocab for c in part)
        return ids

    def __call__(self, text, images=None, padding_side="right"):
        ids = torch.tensor([self.tokens(text)])
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "images": [torch.zeros(3, 2, 2) for _ in (images or [])],
        }


class BigramModel(torch.nn.Module):
    """logits[p] = table[token at p]; each image becomes 3 visual tokens; 2 right-pad positions."""

    def __init__(self, vocab=128):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g) * 3)

    def forward(self, input_ids, images=None, attention_mask=None, labels=None):
        seq = []
        for t in input_ids[0].tolist():
            seq.extend([0, 0, 0] if t == -200 else [t])
        n_img = int((input_ids == -200).sum())
        assert len(images or []) == n_img
        tokens = torch.tensor(seq + [0, 0])
        valid = torch.tensor([True] * len(seq) + [False, False])

        class Out:
            pass

        out = Out()
        out.logits = self.table[tokens][None]
        out.valid = valid[None]
        return out


def _adapter(**kw):
    from eve_vlm.eval.lmms_adapter import EveLMM

    lm = EveLMM(model=BigramModel(), processor=CharProcessor(), **kw)
    lm.task_dict = {"t": {"test": {0: {"img": Image.new("RGB", (2, 2))}, 1: {"img": None}}}}
    return lm


def _expected_logprob(model, proc, ctx_text, full_text):
    ctx, full = proc.tokens(ctx_text), proc.tokens(full_text)
    n = len(full) - len(ctx)
    logp = torch.log_softmax(model.table.detach(), -1)
    return sum(float(logp[full[i - 1], full[i]]) for i in range(len(full) - n, len(full)))


def test_lmms_loglikelihood_matches_hand_computation():
    lm = _adapter()
    visual = lambda doc: [doc["img"]] if doc["img"] is not None else None  # noqa: E731
    reqs = [
        Req("What is it?", " A cat", visual, 0, "t", "test"),
        Req("Say hi", lambda doc: "hi", visual, 1, "t", "test"),
    ]
    res = lm.loglikelihood(reqs)
    proc = lm.processor
    ctx0 = proc.apply_chat_template([{"role": "user", "content": "<image>\nWhat is it?"}])
    assert ctx0.endswith("USER: <image>\nWhat is it? ASSISTANT:")
    assert -res[0][0] == pytest.approx(_expected_logprob(lm.model, proc, ctx0, ctx0 + " A cat"), rel=1e-5)
    ctx1 = proc.apply_chat_template([{"role": "user", "content": "Say hi"}])
    assert -res[1][0] == pytest.approx(_expected_logprob(lm.model, proc, ctx1, ctx1 + " hi"), rel=1e-5)
    assert all(isinstance(g, bool) for _, g in res)

    # The greedy flag is true exactly when every continuation token (" z": the template's space,
    # then "z") is the argmax of the previous position.
    with torch.no_grad():
        lm.model.table[ord(":"), ord(" ")] = 100.0
        lm.model.table[ord(" "), ord("z")] = 100.0
    res = lm.loglikelihood([Req("Q", "z", visual, 1, "t", "test"), Req("Q", "y", visual, 1, "t", "test")])
    assert [g for _, g in res] == [True, False]
    assert res[0][0] < 1e-3 and res[1][0] > 50  # negative log-likelihoods


def test_lmms_generate_until_batches_and_cuts_at_stop_strings():
    calls = []

    def fake_answer(model, processor, prompts, images, *, max_new_tokens):
        calls.append((list(prompts), [len(i) for i in images], max_new_tokens))
        return [f"answer to {p.splitlines()[-1]}. More text" for p in prompts]

    lm = _adapter(batch_size=2, answer_fn=fake_answer)
    visual = lambda doc: [doc["img"]] if doc["img"] is not None else []  # noqa: E731
    reqs = [
        Req("q0", {"until": ["."], "max_new_tokens": 8}, visual, 0, "t", "test"),
        Req("q1", {"until": "."}, visual, 1, "t", "test"),
        Req("q2", {"max_new_tokens": 8}, visual, 0, "t", "test"),
        Req("<image>\nq3", {"max_new_tokens": 8}, visual, 0, "t", "test"),
    ]
    out = lm.generate_until(reqs)
    assert out == ["answer to q0", "answer to q1", "answer to q2. More text", "answer to q3. More text"]
    by_budget = {c[2]: c for c in calls if c[2] == 128}
    assert by_budget[128][0] == ["q1"]  # default budget, no image
    eight = [c for c in calls if c[2] == 8]
    assert [len(c[0]) for c in eight] == [2, 1]  # batch_size 2
    assert eight[0][0] == ["<image>\nq0", "<image>\nq2"] and eight[1][0] == [
        "<image>\nq3"
    ]  # placeholder not doubled
    with pytest.raises(NotImplementedError):
        lm.generate_until_multi_round(reqs)


def test_lmms_adapter_requires_a_model():
    from eve_vlm.eval.lmms_adapter import EveLMM

    with pytest.raises(ValueError, match="pretrained"):
        EveLMM()


# --------------------------------------------------------------------------------------
# Integration with a tiny random checkpoint (real model, processor and generate.answer)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_v2_dir):
    torch.set_num_threads(1)
    return tiny_v2_dir


def test_cli_runs_a_real_checkpoint_and_resumes(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "eval",
        "--model",
        str(tiny_ckpt),
        "--benchmark",
        "pope",
        "--data",
        str(FIXTURES / "pope"),
        "--limit",
        "3",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in recs] == ["adversarial/1", "adversarial/2", "adversarial/3"]
    assert all(isinstance(r["prediction"], str) for r in recs)
    assert "adversarial/f1" in capsys.readouterr().out
    assert args.func(args) == 0  # everything answered: resumes without new lines
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3


def test_lmms_loglikelihood_agrees_with_the_model_loss(tiny_ckpt):
    from eve_vlm import EveForCausalLM, EveProcessor
    from eve_vlm.eval.lmms_adapter import EveLMM

    model = EveForCausalLM.from_pretrained(tiny_ckpt).eval()
    proc = EveProcessor.from_pretrained(tiny_ckpt)
    lm = EveLMM(model=model, processor=proc)
    img = Image.new("RGB", (40, 24), (200, 30, 30))
    lm.task_dict = {"t": {"test": [{"img": img}]}}
    ((nll, _),) = lm.loglikelihood(
        [Req("What is in the image?", " A red circle", lambda d: [d["img"]], 0, "t", "test")]
    )

    ctx, full = lm._render("<image>\nWhat is in the image?", "A red circle")
    enc_ctx = proc(ctx, [img], padding_side="right")
    enc = proc(full, [img], padding_side="right")
    labels = enc["input_ids"].clone()
    labels[:, : enc_ctx["input_ids"].shape[1]] = -100
    with torch.inference_mode():
        ref = model(
            input_ids=enc["input_ids"],
            images=enc["images"],
            attention_mask=enc["attention_mask"],
            labels=labels,
        )
    assert ref.num_label_tokens == enc["input_ids"].shape[1] - enc_ctx["input_ids"].shape[1] > 0
    assert nll == pytest.approx(float(ref.lm_loss_sum), rel=1e-4)
