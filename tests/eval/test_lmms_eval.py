"""The adapter driven by the real lmms-eval package: its model registry, its `Instance` objects,
its task loader and scoring, and its `lmms-eval` command on a task defined in a local folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402

from eve_vlm.eval.lmms_adapter import EveLMM  # noqa: E402
from eve_vlm.generate import answer, with_image_placeholders  # noqa: E402
from eve_vlm.testing import draw_shape  # noqa: E402

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
SHAPES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("red", "square")]
COLORS = ["red", "blue", "green"]

TASK_UTILS = """from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent


def doc_to_visual(doc):
    return [Image.open(HERE / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
"""


def _task_yaml(name: str, data: Path, output_type: str, body: str) -> str:
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
{body}metadata:
  version: 0.0
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local lmms-eval task folder: 4 shape images, a JSONL of questions, two task YAMLs."""
    folder = tmp_path_factory.mktemp("lmms_tasks")
    (folder / "images").mkdir()
    records = []
    for i, (color, shape) in enumerate(SHAPES):
        draw_shape(color, shape).save(folder / "images" / f"{i}.png")
        records.append(
            {
                "id": i,
                "image": f"images/{i}.png",
                "question": "What color is the shape?",
                "answer": color,
                "choices": COLORS,
            }
        )
    data = folder / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "utils.py").write_text(TASK_UTILS)
    gen = 'generation_kwargs:\n  max_new_tokens: 4\n  until: ["\\n"]\n'
    metric = "metric_list:\n  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
    (folder / "tiny_shapes.yaml").write_text(
        _task_yaml("tiny_shapes", data, "generate_until", gen + metric.format(m="exact_match"))
    )
    (folder / "tiny_shapes_mc.yaml").write_text(
        _task_yaml(
            "tiny_shapes_mc", data, "multiple_choice", "doc_to_choice: choices\n" + metric.format(m="acc")
        )
    )
    return folder


@pytest.fixture(scope="module")
def lm(tiny_v2_dir: Path) -> EveLMM:
    from lmms_eval.models import get_model

    return get_model("eve").create_from_arg_string(
        f"pretrained={tiny_v2_dir},device=cpu,max_new_tokens=4",
        {"batch_size": "2", "max_batch_size": None, "device": None},
    )


def _instance(kind: str, args: tuple, doc_id: int, task: str = "shapes") -> Instance:
    return Instance(
        request_type=kind, arguments=args, idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1}
    )


def test_the_registry_resolves_eve_to_the_adapter_loaded_through_load_for_inference(lm):
    from lmms_eval.models import MODEL_REGISTRY_V2

    from eve_vlm import EveForCausalLM

    assert MODEL_REGISTRY_V2.resolve("eve").class_path == "eve_vlm.eval.lmms_adapter.EveLMM"
    assert isinstance(lm, lmms) and lm.is_simple
    assert isinstance(lm.model, EveForCausalLM) and not lm.model.training
    assert next(lm.model.parameters()).device.type == "cpu"
    assert lm.batch_size == 2 and lm.max_new_tokens == 4 and lm.rank == 0 and lm.world_size == 1


def test_generate_until_on_real_instances_equals_our_answer(lm):
    images = [draw_shape(c, s) for c, s in SHAPES[:3]]
    lm.task_dict = {"shapes": {"test": [{"img": im} for im in images]}}
    visual = lambda doc: [doc["img"]]  # noqa: E731
    reqs = [
        _instance(
            "generate_until",
            ("What color?", {"max_new_tokens": 3, "until": []}, visual, i, "shapes", "test"),
            i,
        )
        for i in range(3)
    ]
    got = lm.generate_until(reqs)
    want = answer(
        lm.model,
        lm.processor,
        [with_image_placeholders("What color?", 1)] * 3,
        [[im] for im in images],
        max_new_tokens=3,
    )
    assert got == want and all(isinstance(t, str) for t in got)


def test_lmms_evals_own_multiple_choice_scoring_picks_the_likeliest_choice(
    lm, task_dir, monkeypatch, tmp_path
):
    """lmms-eval builds the requests from the local task and scores our answers with its own
    `process_results` (argmin over the returned values): the chosen colour must be the one with
    the highest log-likelihood under the model, computed here independently from its loss."""
    import datasets.config
    import huggingface_hub.constants
    from PIL import ImageFile

    # lmms_eval.api.task sets Pillow's global LOAD_TRUNCATED_IMAGES on import: undone after the test.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", ImageFile.LOAD_TRUNCATED_IMAGES)
    from lmms_eval.tasks import TaskManager, get_task_dict

    # Read at import time, so the environment variables come too late here: no network tries.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")

    task = get_task_dict(
        ["tiny_shapes_mc"], TaskManager("WARNING", include_path=str(task_dir), include_defaults=False)
    )["tiny_shapes_mc"]
    lm.task_dict = {"tiny_shapes_mc": task.dataset}
    task.build_all_requests(rank=0, world_size=1)
    assert task.instances and all(isinstance(r, Instance) for r in task.instances)
    results = lm.loglikelihood(task.instances)
    assert all(isinstance(nll, float) and nll > 0 and isinstance(g, bool) for nll, g in results)

    by_doc: dict[int, list[tuple[float, bool]]] = {}
    for inst, res in zip(task.instances, results, strict=True):
        by_doc.setdefault(inst.doc_id, []).append(res)
    docs = task.test_docs()
    for doc_id, res in by_doc.items():
        doc = docs[doc_id]
        scores = []
        for color in COLORS:
            image = draw_shape(*SHAPES[doc_id])
            ctx, full = lm._render(with_image_placeholders(doc["question"], 1), " " + color)
            enc_ctx = lm.processor(ctx, [image], padding_side="right")
            enc = lm.processor(full, [image], padding_side="right")
            labels = enc["input_ids"].clone()
            labels[:, : enc_ctx["input_ids"].shape[1]] = -100
            with torch.inference_mode():
                out = lm.model(
                    input_ids=enc["input_ids"],
                    images=enc["images"],
                    labels=labels,
                    attention_mask=enc["attention_mask"],
                )
            scores.append(-float(out.lm_loss_sum))
        likeliest = COLORS[max(range(len(COLORS)), key=scores.__getitem__)]
        assert task.process_results(doc, res)["acc"] == float(likeliest == doc["answer"])


@pytest.mark.slow
def test_the_lmms_eval_command_runs_a_local_task_end_to_end(lm, tiny_v2_dir, task_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf")}
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "eve",
        "--model_args",
        f"pretrained={tiny_v2_dir},device=cpu",
        "--tasks",
        "tiny_shapes",
        "--include_path",
        str(task_dir),
        "--batch_size",
        "2",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_file,) = out.rglob("*_results.json")
    results = json.loads(results_file.read_text())["results"]["tiny_shapes"]
    assert 0.0 <= results["exact_match,none"] <= 1.0
    (samples_file,) = out.rglob("*_samples_tiny_shapes.jsonl")
    samples = sorted(
        (json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"]
    )
    assert [s["target"] for s in samples] == [c for c, _ in SHAPES]

    # The command's answers are the adapter's own greedy answers, cut at the task's "\n".
    images = [draw_shape(c, s) for c, s in SHAPES]
    prompts = [with_image_placeholders("What color is the shape?", 1)] * len(images)
    want = [
        t.split("\n", 1)[0]
        for t in answer(lm.model, lm.processor, prompts, [[im] for im in images], max_new_tokens=4)
    ]
    assert [s["filtered_resps"] for s in samples] == want
