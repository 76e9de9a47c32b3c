"""Official benchmark metrics against hand-computed examples."""

import pytest

from eve_vlm.eval import metrics as M


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs.", "2 dogs"),  # number word -> digit, final period stripped
        ("The man's hat", "man 's hat"),  # article dropped, "'s" split off
        ("An apple", "apple"),
        ("3.5", "3.5"),  # period followed by a digit is kept
        ("3.", "3"),  # upstream regex quirk: a period after a digit is stripped too
        ("yes!", "yes"),  # "!" not next to a space -> replaced by a space, then squeezed
        ("hot-dog", "hot dog"),
        ("t - shirt", "t shirt"),  # " - " next to a space -> removed
        ("(red)", "red"),
        ("dont", "don't"),  # contraction restored
        ("none", "0"),  # official number map includes none -> 0
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("Yes, it is.", "yes it is"),
        ("1,000", "1000"),
        ("What?\n", "what"),
        ("  Coca-Cola.  ", "coca cola"),
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert M.normalize_vqa_answer(raw) == expected


def test_period_strip_count_is_capped_like_upstream():
    # re.UNICODE (32) passed as `count` upstream: only the first 32 periods are removed.
    assert M.normalize_vqa_answer("." * 40 + "x") == "." * 8 + "x"


def test_vqa_soft_accuracy_hand_computed():
    ten_same = ["yes"] * 10
    assert M.vqa_soft_accuracy("Yes", ten_same) == pytest.approx(1.0)
    # 2 of 10 say "yes": 2 subsets keep 1 match (1/3), 8 subsets keep 2 (2/3) -> 6/10.
    two = ["yes"] * 2 + ["no"] * 8
    assert M.vqa_soft_accuracy("yes", two) == pytest.approx(0.6)
    assert M.vqa_soft_accuracy("no", two) == pytest.approx(1.0)
    # 3 of 10: 3 subsets with 2 matches (2/3) + 7 subsets with 3 (1) -> 9/10.
    three = ["red"] * 3 + ["dark red"] * 7
    assert M.vqa_soft_accuracy("Red.", three) == pytest.approx(0.9)
    # 1 of 10: 1 subset with 0 matches + 9 subsets with 1 (1/3) -> 0.3.
    one = ["2"] + ["3"] * 9
    assert M.vqa_soft_accuracy("two", one) == pytest.approx(0.3)
    assert M.vqa_soft_accuracy("four", one) == 0.0


def test_vqa_soft_accuracy_normalises_ground_truth_too():
    gts = ["coca-cola"] * 6 + ["Coca Cola"] * 4  # all normalise to "coca cola"
    assert M.vqa_soft_accuracy("the coca cola", gts) == pytest.approx(1.0)


def test_vqa_answer_scores_rejects_empty():
    with pytest.raises(ValueError, match="at least one"):
        M.vqa_answer_scores([])


def test_gqa_exact_match():
    assert M.gqa_exact_match("Yes.", "yes")
    assert M.gqa_exact_match(" Left ", "left")
    assert not M.gqa_exact_match("the left", "left")
    assert M.gqa_normalize("Dog...") == "dog"


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no, there is not.", "no"),
        ("Yes, there is a dog. There is no cat.", "yes"),  # only the first sentence counts
        ("There is not a dog in the image", "no"),
        ("Nope", "yes"),  # not one of the words {No, no, not}
        ("NO", "yes"),  # case-sensitive like upstream
    ],
)
def test_pope_parse(text, parsed):
    assert M.pope_parse(text) == parsed


def test_pope_counts_and_metrics_by_question_id():
    labels = {"a": "yes", "b": "no", "c": "yes", "d": "no", "e": "yes"}
    # Dict order deliberately differs from the labels: pairing is by id.
    preds = {"e": "No.", "d": "no", "c": "Yes, there is.", "b": "Yes", "a": "yes"}
    c = M.pope_counts(preds, labels)
    assert (c.tp, c.fp, c.tn, c.fn) == (2, 1, 1, 1)
    m = c.as_metrics()
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 5)


def test_pope_missing_prediction_is_an_error():
    with pytest.raises(KeyError, match="no prediction"):
        M.pope_counts({"a": "yes"}, {"a": "yes", "b": "no"})


def test_mme_parse():
    assert M.mme_parse("Yes") == "yes"
    assert M.mme_parse("No, it is not.") == "no"
    assert M.mme_parse("yes.") == "yes"
    assert M.mme_parse("The answer is yes") == "other"  # only the first 4 characters are searched


def test_mme_acc_plus_and_totals():
    answers = [
        M.MMEAnswer("1.jpg", "Yes", "Yes"),
        M.MMEAnswer("1.jpg", "No", "No"),
        M.MMEAnswer("2.jpg", "Yes", "yes"),
        M.MMEAnswer("2.jpg", "No", "Yes"),
        M.MMEAnswer("3.jpg", "Yes", "No"),
        M.MMEAnswer("3.jpg", "No", "Yes"),
    ]
    s = M.mme_subtask_scores(answers)
    assert s["acc"] == pytest.approx(3 / 6)
    assert s["acc_plus"] == pytest.approx(1 / 3)
    assert s["score"] == pytest.approx(50 + 100 / 3)
    totals = M.mme_totals({"existence": s, "count": {"score": 100.0}, "code_reasoning": {"score": 25.0}})
    assert totals == pytest.approx({"perception": 150 + 100 / 3, "cognition": 25.0, "total": 175 + 100 / 3})


@pytest.mark.parametrize(
    ("pred", "letter"),
    [
        ("B", "B"),
        ("B. Louisiana", "B"),
        ("The answer is C.", "C"),
        ("The answer is A. The answer is B.", None),  # two matches -> FAILED
        ("Louisiana", None),
        ("b", None),
    ],
)
def test_sqa_extract_letter(pred, letter):
    assert M.sqa_extract_letter(pred) == letter


def test_sqa_correct_requires_valid_option():
    assert M.sqa_correct("B", 1, 2)
    assert not M.sqa_correct("C", 2, 2)  # letter beyond the available choices
    assert not M.sqa_correct("A", 1, 4)


def test_option_match():
    assert M.option_match("A", "A")
    assert M.option_match(" A ", "A")
    assert not M.option_match("A.", "A")
    assert M.option_match("A.", "A", tolerant=True)
    assert M.option_match("A. cat", "A", tolerant=True)
    assert not M.option_match("(A)", "A", tolerant=True)
    assert not M.option_match("", "A", tolerant=True)
