"""Readers, scorers and submission writers for the benchmarks of the EVE papers.

Each benchmark reads its standard released files (the LLaVA-1.5 evaluation layout plus the
official annotation files), yields `EvalItem`s whose prompts carry the exact suffixes of the
original evaluation, scores predictions locally where ground truth is available and writes the
file the evaluation server expects where it is not. Accuracies are reported in percent.
The expected directory layout of every benchmark is documented in docs/evaluation.md.
"""

from __future__ import annotations

import abc
import base64
import csv
import io
import json
import logging
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from eve_vlm.eval import metrics as M

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
MC_SUFFIX_CN = "\n请直接回答选项字母。"
VIZWIZ_HINT = "\nWhen the provided information is insufficient, respond with 'Unanswerable'."

ImageSource = Path | bytes | Image.Image
"""A file path, the encoded bytes of an image file (MMBench's base64 column) or a PIL image."""


@dataclass(frozen=True)
class EvalItem:
    """One benchmark question.

    `prompt_text` is the user message without image placeholders; `user_message` adds one
    "<image>\\n" per image in front, which is how every EVE/LLaVA eval script builds it.
    `meta` carries what the scorer and the submission writer need (gold answers, category...).
    """

    question_id: str | int
    prompt_text: str
    images: tuple[ImageSource, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Question id as a string: the key of the predictions file and of score lookups."""
        return str(self.question_id)

    @property
    def user_message(self) -> str:
        return f"{IMAGE_PLACEHOLDER}\n" * len(self.images) + self.prompt_text

    def load_images(self) -> list[Image.Image]:
        """Decode the images as RGB (the original `model_vqa.py` forgot `.convert('RGB')`)."""
        out = []
        for src in self.images:
            if isinstance(src, Image.Image):
                out.append(src.convert("RGB"))
                continue
            if isinstance(src, bytes):
                handle: Any = io.BytesIO(src)
            else:
                if not Path(src).is_file():
                    raise FileNotFoundError(f"image {src} of question {self.question_id!r} does not exist")
                handle = src
            with Image.open(handle) as im:
                out.append(im.convert("RGB"))
        return out


def ensure_suffix(text: str, suffix: str) -> str:
    """Append `suffix` unless the question file already carries it (LLaVA files do)."""
    return text if text.endswith(suffix) else text + suffix


def format_options(options: Sequence[str], letters: Sequence[str] = M.OPTION_LETTERS) -> str:
    """Options as "A. ..." lines, each preceded by a newline."""
    if len(options) > len(letters):
        raise ValueError(f"{len(options)} options but only {len(letters)} letters")
    return "".join(f"\n{letter}. {opt}" for letter, opt in zip(letters, options, strict=False))


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: invalid JSON line ({e})") from e


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    return path


def _pct(x: float) -> float:
    return 100.0 * x


def _accuracy_by(items: Sequence[EvalItem], correct: Mapping[str, float], meta_key: str) -> dict[str, float]:
    """Per-group accuracy in percent, keyed "accuracy/<group>"."""
    groups: dict[str, list[float]] = defaultdict(list)
    for it in items:
        group = it.meta.get(meta_key)
        if group is not None:
            groups[str(group)].append(correct[it.key])
    return {f"accuracy/{g}": _pct(M.mean(v)) for g, v in sorted(groups.items())}


class Benchmark(abc.ABC):
    """A benchmark bound to its data directory.

    `data_dir` may also be the question file itself (then its folder is the root), so a
    non-standard file name never needs a code change.
    """

    name: ClassVar[str]
    headline: ClassVar[str | None] = "accuracy"  # the metric the papers report, None if server-only
    question_files: ClassVar[tuple[str, ...]] = ()

    def __init__(self, data_dir: str | Path):
        path = Path(data_dir)
        if not path.exists():
            raise FileNotFoundError(f"{self.name}: data path {path} does not exist")
        self.question_file: Path | None = path if path.is_file() else None
        self.root = path.parent if path.is_file() else path
        if self.question_file is None:
            self.question_file = self._optional(*self.question_files)

    def _optional(self, *names: str) -> Path | None:
        for name in names:
            p = self.root / name
            if p.exists():
                return p
        return None

    def _required(self, *names: str) -> Path:
        p = self._optional(*names)
        if p is None:
            tried = ", ".join(str(self.root / n) for n in names)
            raise FileNotFoundError(
                f"{self.name}: none of these files exist: {tried} (see docs/evaluation.md)"
            )
        return p

    def _image(self, name: str, *folders: str) -> Path:
        """Resolve an image name against candidate folders; the first folder wins if none exist."""
        for folder in folders:
            p = self.root / folder / name
            if p.exists():
                return p
        return self.root / folders[0] / name

    @abc.abstractmethod
    def items(self) -> Iterator[EvalItem]:
        """All questions, in file order."""

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str]) -> dict[str, float]:
        """Metrics over `items` (all answered); empty for server-scored benchmarks."""
        return {}

    def write_submission(
        self, items: Sequence[EvalItem], predictions: Mapping[str, str], out_dir: Path
    ) -> list[Path]:
        """Files for an evaluation server or an official offline tool (none by default)."""
        return []


# --------------------------------------------------------------------------------------
# Short-answer benchmarks scored with VQA soft accuracy
# --------------------------------------------------------------------------------------


def _soft_accuracy(items: Sequence[EvalItem], predictions: Mapping[str, str]) -> dict[str, float]:
    scored = [it for it in items if it.meta.get("answers")]
    if not scored:
        return {}
    accs = [M.vqa_soft_accuracy(predictions[it.key], it.meta["answers"]) for it in scored]
    return {"accuracy": _pct(M.mean(accs)), "num_scored": len(scored)}


class VQAv2(Benchmark):
    """VQAv2 test-dev (server). Scored locally only if an annotations file is present (val)."""

    name = "vqav2"
    question_files = ("llava_vqav2_mscoco_test-dev2015.jsonl", "llava_vqav2_mscoco_val2014.jsonl")

    def _annotations(self) -> dict[str, list[str]]:
        ann = self._optional("v2_mscoco_val2014_annotations.json", "annotations.json")
        if ann is None:
            return {}
        return {
            str(a["question_id"]): [x["answer"] for x in a["answers"]] for a in _read_json(ann)["annotations"]
        }

    def items(self) -> Iterator[EvalItem]:
        if self.question_file is None:
            self._required(*self.question_files)
        answers = self._annotations()
        for q in _read_jsonl(self.question_file):
            meta = {"answers": answers[str(q["question_id"])]} if str(q["question_id"]) in answers else {}
            yield EvalItem(
                question_id=q["question_id"],
                prompt_text=ensure_suffix(q["text"], SHORT_ANSWER_SUFFIX),
                images=(self._image(q["image"], "test2015", "val2014", "images", "."),),
                meta=meta,
            )

    def score(self, items, predictions):
        return _soft_accuracy(items, predictions)

    def write_submission(self, items, predictions, out_dir):
        # The server wants every test2015 question; test-dev ones carry answers, others "".
        full = self._optional("llava_vqav2_mscoco_test2015.jsonl")
        ids = [q["question_id"] for q in _read_jsonl(full)] if full else [it.question_id for it in items]
        sub = [
            {
                "question_id": qid,
                "answer": M.normalize_vqa_answer(predictions[str(qid)]) if str(qid) in predictions else "",
            }
            for qid in ids
        ]
        return [_write_json(out_dir / "vqav2_test2015_submission.json", sub)]


class VizWiz(Benchmark):
    """VizWiz-VQA: LLaVA's test jsonl (server) or the official Annotations/{val,test}.json."""

    name = "vizwiz"
    question_files = (
        "llava_test.jsonl",
        "Annotations/val.json",
        "val.json",
        "Annotations/test.json",
        "test.json",
    )

    def __init__(self, data_dir: str | Path):
        super().__init__(data_dir)
        if self.root.name == "Annotations":  # official layout: Annotations/val.json next to val/
            self.root = self.root.parent

    @staticmethod
    def _prompt(question: str) -> str:
        if question.endswith(SHORT_ANSWER_SUFFIX):
            return question
        return ensure_suffix(question, VIZWIZ_HINT) + SHORT_ANSWER_SUFFIX

    def _annotation_answers(self) -> dict[str, list[str]]:
        ann = self._optional("Annotations/val.json", "val.json")
        if ann is None:
            return {}
        return {a["image"]: [x["answer"] for x in a["answers"]] for a in _read_json(ann) if a.get("answers")}

    def items(self) -> Iterator[EvalItem]:
        qf = self.question_file or self._required(*self.question_files)
        if qf.suffix == ".jsonl":
            answers = self._annotation_answers()
            rows = ((q["question_id"], q["image"], q["text"]) for q in _read_jsonl(qf))
        else:
            records = _read_json(qf)
            answers = {a["image"]: [x["answer"] for x in a["answers"]] for a in records if a.get("answers")}
            rows = ((a["image"], a["image"], a["question"]) for a in records)
        for qid, image, text in rows:
            meta: dict[str, Any] = {"image": image}
            if image in answers:
                meta["answers"] = answers[image]
            yield EvalItem(qid, self._prompt(text), (self._image(image, "test", "val", "images", "."),), meta)

    def score(self, items, predictions):
        return _soft_accuracy(items, predictions)

    def write_submission(self, items, predictions, out_dir):
        if all(it.meta.get("answers") for it in items):
            return []
        sub = [
            {"image": it.meta["image"], "answer": M.normalize_vqa_answer(predictions.get(it.key, ""))}
            for it in items
        ]
        return [_write_json(out_dir / "vizwiz_test_submission.json", sub)]


class TextVQA(Benchmark):
    """TextVQA val with OCR tokens in a 3-line prompt, scored with the m4c soft accuracy."""

    name = "textvqa"
    question_files = ("llava_textvqa_val_v051_ocr.jsonl",)

    @staticmethod
    def question_from_prompt(prompt: str) -> str:
        """Recover the lower-cased question from a LLaVA prompt (`eval_textvqa.py::prompt_processor`)."""
        lines = prompt.split("\n")
        if prompt.startswith("OCR tokens: "):
            match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
            if match is None:
                raise ValueError(f"TextVQA: cannot find the question in prompt {prompt!r}")
            question = match.group(1)
        elif "Reference OCR token: " in prompt and len(lines) == 3:
            question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
        elif len(lines) == 2:
            question = lines[0]
        else:
            raise ValueError(f"TextVQA: unexpected prompt layout {prompt!r}")
        return question.lower()

    @staticmethod
    def build_prompt(question: str, ocr_tokens: Sequence[str]) -> str:
        ocr = f"\nReference OCR token: {', '.join(ocr_tokens)}" if ocr_tokens else ""
        return question + ocr + SHORT_ANSWER_SUFFIX

    def items(self) -> Iterator[EvalItem]:
        ann_path = self._optional("TextVQA_0.5.1_val.json")
        annotations = _read_json(ann_path)["data"] if ann_path else []
        if self.question_file is not None:
            yield from self._from_llava_jsonl(annotations)
            return
        if not annotations:
            self._required(*self.question_files, "TextVQA_0.5.1_val.json")
        ocr_path = self._optional("TextVQA_Rosetta_OCR_v0.2_val.json")
        ocr = {d["image_id"]: d["ocr_tokens"] for d in _read_json(ocr_path)["data"]} if ocr_path else {}
        for a in annotations:
            tokens = a.get("ocr_tokens", ocr.get(a["image_id"], []))
            yield EvalItem(
                question_id=a["question_id"],
                prompt_text=self.build_prompt(a["question"], tokens),
                images=(self._image(f"{a['image_id']}.jpg", "train_images", "images", "."),),
                meta={"answers": a["answers"]},
            )

    def _from_llava_jsonl(self, annotations: list[dict[str, Any]]) -> Iterator[EvalItem]:
        # LLaVA's "question_id" is the image id (not unique); annotations are matched on
        # (image id, lower-cased question) exactly like eval_textvqa.py.
        by_key = {(a["image_id"], a["question"].lower()): a for a in annotations}
        for line_no, q in enumerate(_read_jsonl(self.question_file)):
            text = ensure_suffix(q["text"], SHORT_ANSWER_SUFFIX)
            ann = by_key.get((q["question_id"], self.question_from_prompt(text)))
            if annotations and ann is None:
                raise KeyError(
                    f"TextVQA: no annotation for question {q['question_id']!r} (line {line_no + 1})"
                )
            yield EvalItem(
                question_id=ann["question_id"] if ann else f"{q['question_id']}#{line_no}",
                prompt_text=text,
                images=(self._image(q["image"], "train_images", "images", "."),),
                meta={"answers": ann["answers"]} if ann else {},
            )

    def score(self, items, predictions):
        return _soft_accuracy(items, predictions)


# --------------------------------------------------------------------------------------
# Exact-match / yes-no benchmarks
# --------------------------------------------------------------------------------------


class GQA(Benchmark):
    """GQA testdev-balanced: exact match of the lower-cased, period-stripped answer."""

    name = "gqa"
    question_files = ("llava_gqa_testdev_balanced.jsonl",)

    def items(self) -> Iterator[EvalItem]:
        official = self._optional("testdev_balanced_questions.json", "data/testdev_balanced_questions.json")
        questions = _read_json(official) if official else {}
        folders = ("images", "data/images", ".")
        if self.question_file is None:
            if not questions:
                self._required(*self.question_files, "testdev_balanced_questions.json")
            rows = ((qid, f"{q['imageId']}.jpg", q["question"]) for qid, q in questions.items())
        else:
            rows = ((str(q["question_id"]), q["image"], q["text"]) for q in _read_jsonl(self.question_file))
        for qid, image, text in rows:
            gold = questions.get(qid)
            meta = {"answer": gold["answer"], "type": gold.get("types", {}).get("structural")} if gold else {}
            yield EvalItem(
                qid, ensure_suffix(text, SHORT_ANSWER_SUFFIX), (self._image(image, *folders),), meta
            )

    def score(self, items, predictions):
        scored = [it for it in items if "answer" in it.meta]
        if not scored:
            return {}
        correct = {it.key: float(M.gqa_exact_match(predictions[it.key], it.meta["answer"])) for it in scored}
        return {"accuracy": _pct(M.mean(correct.values())), **_accuracy_by(scored, correct, "type")}

    def write_submission(self, items, predictions, out_dir):
        # Input of the official eval.py (`--predictions`), for bit-exact parity checks.
        sub = [
            {"questionId": it.key, "prediction": M.gqa_normalize(predictions.get(it.key, ""))} for it in items
        ]
        return [_write_json(out_dir / "testdev_balanced_predictions.json", sub)]


class POPE(Benchmark):
    """POPE on COCO val2014, three splits; labels paired with predictions by question id."""

    name = "pope"
    headline = "f1_mean"
    SPLITS: ClassVar[tuple[str, ...]] = ("adversarial", "popular", "random")

    def items(self) -> Iterator[EvalItem]:
        found = False
        for split in self.SPLITS:
            path = self._optional(f"coco/coco_pope_{split}.json", f"coco_pope_{split}.json")
            if path is None:
                continue
            found = True
            for q in _read_jsonl(path):
                yield EvalItem(
                    question_id=f"{split}/{q['question_id']}",
                    prompt_text=ensure_suffix(q["text"], SHORT_ANSWER_SUFFIX),
                    images=(self._image(q["image"], "val2014", "images", "."),),
                    meta={"split": split, "label": q["label"]},
                )
        if not found:
            self._required(*(f"coco/coco_pope_{s}.json" for s in self.SPLITS))

    def score(self, items, predictions):
        out: dict[str, float] = {}
        per_split: dict[str, dict[str, float]] = {}
        for split in self.SPLITS:
            labels = {it.key: it.meta["label"] for it in items if it.meta["split"] == split}
            if not labels:
                continue
            counts = M.pope_counts(predictions, labels)
            per_split[split] = {k: _pct(v) for k, v in counts.as_metrics().items()}
            out.update({f"{split}/{k}": v for k, v in per_split[split].items()})
            out.update({f"{split}/{k}": getattr(counts, k) for k in ("tp", "fp", "tn", "fn")})
        if per_split:
            out["f1_mean"] = M.mean(s["f1"] for s in per_split.values())
            out["accuracy_mean"] = M.mean(s["accuracy"] for s in per_split.values())
        return out


class MME(Benchmark):
    """MME in the official release layout; score = sum over subtasks of (acc + acc+) * 100."""

    name = "mme"
    headline = "perception"
    IMAGE_EXTS: ClassVar[tuple[str, ...]] = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")

    def _base(self) -> Path:
        nested = self.root / "MME_Benchmark_release_version"
        return nested if nested.is_dir() else self.root

    def items(self) -> Iterator[EvalItem]:
        base = self._base()
        subtasks = [s for s in (*M.MME_PERCEPTION, *M.MME_COGNITION) if (base / s).is_dir()]
        if not subtasks:
            raise FileNotFoundError(
                f"mme: no subtask folders (e.g. {base / 'existence'}) found (see docs/evaluation.md)"
            )
        for sub in subtasks:
            qa_dir = base / sub / "questions_answers_YN"
            img_dir = base / sub / "images"
            if not qa_dir.is_dir():
                qa_dir = img_dir = base / sub
            for txt in sorted(qa_dir.glob("*.txt")):
                image = next(
                    (
                        img_dir / (txt.stem + e)
                        for e in self.IMAGE_EXTS
                        if (img_dir / (txt.stem + e)).exists()
                    ),
                    None,
                )
                if image is None:
                    raise FileNotFoundError(f"mme: no image for {txt} in {img_dir}")
                lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
                for i, line in enumerate(lines):
                    question, sep, gold = line.rpartition("\t")
                    if not sep:
                        raise ValueError(f"mme: {txt}:{i + 1} is not 'question<TAB>answer'")
                    yield EvalItem(
                        question_id=f"{sub}/{image.name}/{i}",
                        prompt_text=ensure_suffix(question.strip(), SHORT_ANSWER_SUFFIX),
                        images=(image,),
                        meta={
                            "subtask": sub,
                            "image": image.name,
                            "question": question.strip(),
                            "answer": gold.strip(),
                        },
                    )

    def score(self, items, predictions):
        by_sub: dict[str, list[M.MMEAnswer]] = defaultdict(list)
        for it in items:
            by_sub[it.meta["subtask"]].append(
                M.MMEAnswer(it.meta["image"], it.meta["answer"], predictions[it.key])
            )
        subs = {sub: M.mme_subtask_scores(ans) for sub, ans in by_sub.items()}
        out: dict[str, float] = dict(M.mme_totals(subs))
        for sub, s in subs.items():
            out.update(
                {
                    f"{sub}/acc": _pct(s["acc"]),
                    f"{sub}/acc_plus": _pct(s["acc_plus"]),
                    f"{sub}/score": s["score"],
                }
            )
        return out

    def write_submission(self, items, predictions, out_dir):
        # `eval_tool/calculation.py --results_dir` layout: "<image>\t<question>\t<gt>\t<prediction>".
        lines: dict[str, list[str]] = defaultdict(list)
        for it in items:
            pred = " ".join(predictions.get(it.key, "").split())
            lines[it.meta["subtask"]].append(
                "\t".join((it.meta["image"], it.meta["question"], it.meta["answer"], pred))
            )
        paths = []
        for sub, rows in lines.items():
            path = out_dir / "mme_results" / f"{sub}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(rows) + "\n", encoding="utf-8")
            paths.append(path)
        return paths


# --------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------


class ScienceQA(Benchmark):
    """ScienceQA-IMG: test-split questions with an image, prompt "Context: ...", CQM-A format."""

    name = "scienceqa"
    question_files = ("llava_test_CQM-A.json",)

    @staticmethod
    def build_prompt(problem: Mapping[str, Any]) -> str:
        context = (problem.get("hint") or "").strip() or "N/A"
        text = f"Context: {context}\n{problem['question']}{format_options(problem['choices'])}"
        return text.replace("  ", " ").strip() + MC_SUFFIX

    def items(self) -> Iterator[EvalItem]:
        problems = _read_json(self._required("problems.json"))
        test_ids = _read_json(self._required("pid_splits.json"))["test"]
        llava_prompts: dict[str, str] = {}
        if self.question_file is not None:
            for entry in _read_json(self.question_file):
                human = next(c["value"] for c in entry["conversations"] if c["from"] == "human")
                llava_prompts[str(entry["id"])] = ensure_suffix(
                    human.replace(IMAGE_PLACEHOLDER, "").strip(), MC_SUFFIX
                )
        for pid in test_ids:
            prob = problems[pid]
            if not prob.get("image"):
                continue  # ScienceQA-IMG only
            yield EvalItem(
                question_id=pid,
                prompt_text=llava_prompts.get(pid) or self.build_prompt(prob),
                images=(self._image(f"{pid}/{prob['image']}", "images/test", "test"),),
                meta={
                    "answer": prob["answer"],
                    "num_choices": len(prob["choices"]),
                    "subject": prob.get("subject"),
                },
            )

    def score(self, items, predictions):
        correct = {
            it.key: float(M.sqa_correct(predictions[it.key], it.meta["answer"], it.meta["num_choices"]))
            for it in items
        }
        failed = sum(M.sqa_extract_letter(predictions[it.key]) is None for it in items)
        return {
            "accuracy": _pct(M.mean(correct.values())),
            "failed": failed,
            **_accuracy_by(items, correct, "subject"),
        }


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "nan", "none"))


class MMBench(Benchmark):
    """MMBench (EN or CN) TSV with base64 images; xlsx/tsv submission, local single-pass accuracy."""

    name = "mmbench"
    question_files = ("mmbench_dev_20230712.tsv", "mmbench_dev_cn_20231003.tsv")

    def _tsv(self) -> Path:
        if self.question_file is not None:
            return self.question_file
        tsvs = sorted(self.root.glob("*.tsv"))
        if len(tsvs) != 1:
            raise FileNotFoundError(
                f"mmbench: expected one .tsv in {self.root}, found {len(tsvs)}; pass the file path"
            )
        return tsvs[0]

    def items(self) -> Iterator[EvalItem]:
        path = self._tsv()
        suffix = MC_SUFFIX_CN if "cn" in path.stem.lower() else MC_SUFFIX
        csv.field_size_limit(sys.maxsize)
        images: dict[str, str] = {}
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                options = []
                for letter in "ABCD":
                    if letter not in row or _is_none(row[letter]):
                        break
                    options.append(row[letter])
                question = row["question"]
                if not _is_none(row.get("hint")):
                    question = f"{row['hint']}\n{question}"
                img = row["image"]
                if len(img) < 64 and img.isdigit():  # later releases reference another row's image
                    img = images[img]
                images[row["index"]] = img
                meta = {
                    "row": {k: v for k, v in row.items() if k != "image"},
                    "category": row.get("category"),
                }
                if not _is_none(row.get("answer")):
                    meta["answer"] = row["answer"].strip()
                yield EvalItem(
                    int(row["index"]),
                    question + format_options(options) + suffix,
                    (base64.b64decode(img),),
                    meta,
                )

    def score(self, items, predictions):
        scored = [it for it in items if "answer" in it.meta]
        if not scored:
            return {}
        correct = {it.key: float(M.option_match(predictions[it.key], it.meta["answer"])) for it in scored}
        tolerant = [M.option_match(predictions[it.key], it.meta["answer"], tolerant=True) for it in scored]
        return {
            "accuracy": _pct(M.mean(correct.values())),
            "accuracy_tolerant": _pct(M.mean(tolerant)),
            **_accuracy_by(scored, correct, "category"),
        }

    def write_submission(self, items, predictions, out_dir):
        rows = [{**it.meta["row"], "prediction": predictions.get(it.key, "")} for it in items]
        if not rows:
            return []
        columns = list(rows[0])
        try:
            import openpyxl  # optional: the server takes xlsx, LLaVA wrote xlsx
        except ImportError:
            path = out_dir / "mmbench_submission.tsv"
            with open(path, "w", encoding="utf-8", newline="") as f:
                writer = csv.DictWriter(f, columns, delimiter="\t")
                writer.writeheader()
                writer.writerows(rows)
            logger.info("openpyxl not installed: wrote %s (convert to xlsx for the MMBench server)", path)
            return [path]
        path = out_dir / "mmbench_submission.xlsx"
        wb = openpyxl.Workbook()
        ws = wb.active
        ws.append(columns)
        for r in rows:
            ws.append([r.get(c) for c in columns])
        wb.save(path)
        return [path]


class SEEDBench(Benchmark):
    """SEED-Bench image questions (SEED-Bench.json); exact letter match, tolerant as a second number."""

    name = "seed"
    question_files = ("SEED-Bench.json",)

    def items(self) -> Iterator[EvalItem]:
        data = _read_json(self.question_file or self._required(*self.question_files))
        type_names = {v: k for k, v in data.get("question_type", {}).items()}
        for q in data["questions"]:
            if q.get("data_type", "image") != "image":
                continue
            name = q["data_id"]
            image = self._image(name, "SEED-Bench-image", ".")
            if not image.exists() and not Path(name).suffix:
                image = self._image(f"{name}.jpg", "SEED-Bench-image", ".")
            options = [q[f"choice_{c}"] for c in "abcd"]
            yield EvalItem(
                question_id=str(q["question_id"]),
                prompt_text=q["question"] + format_options(options) + MC_SUFFIX,
                images=(image,),
                meta={
                    "answer": q["answer"],
                    "type": type_names.get(q.get("question_type_id"), q.get("question_type_id")),
                },
            )

    def score(self, items, predictions):
        correct = {it.key: float(M.option_match(predictions[it.key], it.meta["answer"])) for it in items}
        tolerant = [M.option_match(predictions[it.key], it.meta["answer"], tolerant=True) for it in items]
        return {
            "accuracy": _pct(M.mean(correct.values())),
            "accuracy_tolerant": _pct(M.mean(tolerant)),
            **_accuracy_by(items, correct, "type"),
        }

    def write_submission(self, items, predictions, out_dir):
        path = out_dir / "seed_submission.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for it in items:
                f.write(
                    json.dumps({"question_id": it.key, "prediction": predictions.get(it.key, "").strip()})
                    + "\n"
                )
        return [path]


# --------------------------------------------------------------------------------------
# Free-form and generic
# --------------------------------------------------------------------------------------


class MMVet(Benchmark):
    """MM-Vet: raw questions; writes {"v1_<id>": answer} for the GPT-4 grader."""

    name = "mmvet"
    headline = None
    question_files = ("mm-vet.json",)

    def items(self) -> Iterator[EvalItem]:
        data = _read_json(self.question_file or self._required(*self.question_files))
        for key, q in data.items():
            yield EvalItem(
                key, q["question"], (self._image(q["imagename"], "images", "."),), {"answer": q.get("answer")}
            )

    def write_submission(self, items, predictions, out_dir):
        return [
            _write_json(
                out_dir / "mmvet_submission.json", {it.key: predictions.get(it.key, "") for it in items}
            )
        ]


class Generic(Benchmark):
    """Any questions JSONL: {"question_id"?, "image" (str or list), "text", "answer" | "answers"}.

    The prompt is used verbatim. A list of answers is scored with VQA soft accuracy, a single
    answer with exact match after VQA normalisation.
    """

    name = "generic"
    question_files = ("questions.jsonl",)

    def items(self) -> Iterator[EvalItem]:
        qf = self.question_file or self._required(*self.question_files)
        seen: set[str] = set()
        for i, q in enumerate(_read_jsonl(qf)):
            qid = q.get("question_id", i)
            if str(qid) in seen:
                raise ValueError(f"generic: duplicate question_id {qid!r} in {qf}")
            seen.add(str(qid))
            names = q.get("image") or []
            names = [names] if isinstance(names, str) else names
            meta = {}
            if "answers" in q:
                meta["answers"] = list(q["answers"])
            elif "answer" in q:
                meta["answer"] = str(q["answer"])
            yield EvalItem(qid, q["text"], tuple(self._image(n, "images", ".") for n in names), meta)

    def score(self, items, predictions):
        scored = [it for it in items if it.meta]
        if not scored:
            return {}

        def acc(it: EvalItem) -> float:
            pred = predictions[it.key]
            if "answers" in it.meta:
                return M.vqa_soft_accuracy(pred, it.meta["answers"])
            return float(M.normalize_vqa_answer(pred) == M.normalize_vqa_answer(it.meta["answer"]))

        return {"accuracy": _pct(M.mean(acc(it) for it in scored)), "num_scored": len(scored)}


BENCHMARKS: dict[str, Callable[[str | Path], Benchmark]] = {
    cls.name: cls
    for cls in (VQAv2, GQA, VizWiz, ScienceQA, TextVQA, POPE, MME, MMBench, SEEDBench, MMVet, Generic)
}


def get_benchmark(name: str, data_dir: str | Path) -> Benchmark:
    """Instantiate a benchmark by name (see `BENCHMARKS`)."""
    try:
        cls = BENCHMARKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}") from None
    return cls(data_dir)
