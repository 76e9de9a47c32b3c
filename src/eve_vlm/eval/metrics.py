"""Official benchmark metrics, re-implemented so scores match the published numbers.

Every function here is pure (strings in, numbers out) so it can be unit-tested against
hand-computed examples. Accuracies are returned as fractions in [0, 1]; the benchmark
layer converts them to percentages.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# --------------------------------------------------------------------------------------
# EvalAI / VQA answer normaliser
# --------------------------------------------------------------------------------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
# "none" -> "0" is part of the official VQA map (kept: it changes which answers match).
_NUMBER_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATIONS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
_COMMA_STRIP = re.compile(r"(?<=\d)(,)+(?=\d)")
# Upstream quirk kept for score parity: the official regex is `(?!<=\d)(\.)(?!\d)`, a typo for the
# look-behind `(?<!\d)`. As written it removes every period NOT FOLLOWED by a digit (so "3." -> "3",
# while "3.5" is kept), and upstream passes `re.UNICODE` (= 32) as the `count` argument, so at most
# 32 periods are removed. We reproduce exactly that behaviour.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    out = text
    comma_digits = _COMMA_STRIP.search(text) is not None
    for p in _PUNCTUATIONS:
        # Upstream tests the *input* text for every symbol, not the running output.
        if (p + " " in text or " " + p in text) or comma_digits:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """EvalAI answer processor (TextVQA/VQAv2/VizWiz servers and LLaVA's m4c evaluator).

    Lower-cases, drops ',' and '?', splits "'s", applies the punctuation rule, strips periods
    (with the upstream regex quirk), maps number words to digits, drops articles and restores
    contractions.
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_answer_scores(gt_answers: Sequence[str]) -> dict[str, float]:
    """Soft score of every distinct (normalised) ground-truth answer.

    score(a) = mean over the leave-one-out subsets of the GT list of min(1, #matches / 3),
    exactly as the m4c TextVQA evaluator computes it (10 answers give 10 subsets).
    """
    if not gt_answers:
        raise ValueError("VQA soft accuracy needs at least one ground-truth answer")
    answers = [normalize_vqa_answer(a) for a in gt_answers]
    n = len(answers)
    scores = {}
    for unique in set(answers):
        matches = sum(a == unique for a in answers)
        # Leaving out one of the `matches` equal answers leaves matches-1, else matches.
        total = matches * min(1.0, (matches - 1) / 3) + (n - matches) * min(1.0, matches / 3)
        scores[unique] = total / n
    return scores


def vqa_soft_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against its (usually 10) human answers."""
    return vqa_answer_scores(gt_answers).get(normalize_vqa_answer(prediction), 0.0)


# --------------------------------------------------------------------------------------
# GQA
# --------------------------------------------------------------------------------------


def gqa_normalize(prediction: str) -> str:
    """LLaVA's `convert_gqa_for_eval.py`: strip trailing periods, lower-case."""
    return prediction.strip().rstrip(".").lower()


def gqa_exact_match(prediction: str, answer: str) -> bool:
    """GQA's official eval.py compares the converted prediction with the gold answer verbatim."""
    return gqa_normalize(prediction) == answer


# --------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------


def pope_parse(text: str) -> str:
    """POPE answer parsing: first sentence, no commas, "no" iff a word is No/no/not."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


@dataclass(frozen=True)
class BinaryCounts:
    """Confusion counts with "yes" as the positive class."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def as_metrics(self) -> dict[str, float]:
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        total = self.total or 1
        return {
            "accuracy": (self.tp + self.tn) / total,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "yes_ratio": (self.tp + self.fp) / total,
        }


def pope_counts(predictions: Mapping[str, str], labels: Mapping[str, str]) -> BinaryCounts:
    """Confusion counts, pairing prediction and label by question id.

    The original `eval_pope.py` zips answers and labels in file order, which silently scores the
    wrong pairs if the orders differ; here every labelled id must have a prediction.
    """
    missing = [qid for qid in labels if qid not in predictions]
    if missing:
        raise KeyError(f"POPE: {len(missing)} labelled questions have no prediction, e.g. {missing[:3]}")
    tp = fp = tn = fn = 0
    for qid, label in labels.items():
        if label not in ("yes", "no"):
            raise ValueError(f"POPE label for {qid!r} must be 'yes' or 'no', got {label!r}")
        pred = pope_parse(predictions[qid])
        if pred == "yes":
            tp += label == "yes"
            fp += label == "no"
        else:
            tn += label == "no"
            fn += label == "yes"
    return BinaryCounts(tp=tp, fp=fp, tn=tn, fn=fn)


# --------------------------------------------------------------------------------------
# MME
# --------------------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_parse(prediction: str) -> str:
    """MME `calculation.py`: "yes"/"no" exactly, else look for them in the first 4 characters."""
    pred = prediction.lower()
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


@dataclass(frozen=True)
class MMEAnswer:
    """One MME question: the image it belongs to, its gold yes/no and the model's raw answer."""

    image: str
    gold: str
    prediction: str


def mme_subtask_scores(answers: Iterable[MMEAnswer]) -> dict[str, float]:
    """Accuracy, accuracy+ (both questions of an image right) and score = (acc + acc+) * 100.

    Upstream groups consecutive line pairs; we group by image name, which gives the same result
    on the official files and stays right if lines are reordered.
    """
    per_image: dict[str, list[bool]] = {}
    for a in answers:
        per_image.setdefault(a.image, []).append(mme_parse(a.prediction) == a.gold.strip().lower())
    if not per_image:
        raise ValueError("MME subtask has no answers")
    flat = [c for cs in per_image.values() for c in cs]
    acc = sum(flat) / len(flat)
    acc_plus = sum(all(cs) for cs in per_image.values()) / len(per_image)
    return {"acc": acc, "acc_plus": acc_plus, "score": (acc + acc_plus) * 100}


def mme_totals(subtask_scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Perception and cognition totals: sums of the subtask scores present."""
    perception = sum(s["score"] for k, s in subtask_scores.items() if k in MME_PERCEPTION)
    cognition = sum(s["score"] for k, s in subtask_scores.items() if k in MME_COGNITION)
    return {"perception": perception, "cognition": cognition, "total": perception + cognition}


# --------------------------------------------------------------------------------------
# Multiple choice: ScienceQA, SEED-Bench, MMBench
# --------------------------------------------------------------------------------------

OPTION_LETTERS = ("A", "B", "C", "D", "E")
_SQA_PATTERN = re.compile(r"The answer is ([A-Z]).")


def sqa_extract_letter(prediction: str, letters: Sequence[str] = OPTION_LETTERS) -> str | None:
    """ScienceQA letter extraction (`eval_science_qa.py`); None means FAILED.

    Accepts the bare letter, a leading "X. ", or exactly one "The answer is X." match.
    """
    if prediction in letters:
        return prediction
    if len(prediction) >= 3 and prediction[0] in letters and prediction[1:3] == ". ":
        return prediction[0]
    found = _SQA_PATTERN.findall(prediction)
    return found[0] if len(found) == 1 else None


def sqa_correct(prediction: str, answer_index: int, num_choices: int) -> bool:
    """True if the extracted letter is a valid option and equals the gold index."""
    letter = sqa_extract_letter(prediction)
    if letter is None or letter not in OPTION_LETTERS[:num_choices]:
        return False
    return OPTION_LETTERS.index(letter) == answer_index


def option_match(prediction: str, answer: str, *, tolerant: bool = False) -> bool:
    """SEED/MMBench matching: exact letter, or (tolerant) the first character is the letter.

    The tolerant form accepts "A.", "A. cat" or "Apple" for "A" (it compares only the first
    character, like `convert_seed_for_submission.py --tolerance`); "(A)" is not accepted.
    """
    pred = prediction.strip()
    if pred == answer:
        return True
    return tolerant and pred[:1] == answer


def mean(values: Iterable[float]) -> float:
    """Mean that raises a clear error on empty input instead of ZeroDivisionError."""
    vals = list(values)
    if not vals:
        raise ValueError("cannot average an empty list of scores")
    return sum(vals) / len(vals)
