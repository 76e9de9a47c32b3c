"""An lmms-eval model ("lmms") backed by an EVE checkpoint.

lmms-eval hands over `Instance` requests whose `.args` are
`(context, gen_kwargs, doc_to_visual, doc_id, task, split)` for `generate_until` and
`(context, continuation_or_doc_to_target, doc_to_visual, doc_id, task, split)` for
`loglikelihood`; the document is `self.task_dict[task][split][doc_id]` (filled by the evaluator).

The class subclasses lmms-eval's own `lmms` base, so this module needs lmms-eval installed (the
`lmms` extra). The package registers it with lmms-eval's model registry through the entry point
group "lmms_eval.models" (`lmms_eval_manifest`), so
`lmms-eval --model eve --model_args pretrained=PATH --tasks ...` finds it (docs/evaluation.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from eve_vlm.constants import IGNORE_INDEX
from eve_vlm.generate import with_image_placeholders
from eve_vlm.loading import load_for_inference

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as e:  # a clear message instead of a bare ModuleNotFoundError deep in lmms-eval
    raise ImportError(
        "eve_vlm.eval.lmms_adapter needs lmms-eval: pip install 'eve-vlm[lmms]' "
        "(./install.sh --dev installs it without its CUDA-torch dependencies)"
    ) from e

logger = logging.getLogger(__name__)

MODEL_ID = "eve"
"""The name lmms-eval knows the adapter by (`--model eve`)."""

AnswerFn = Callable[..., list[str]]
"""`eve_vlm.generate.answer`'s signature: (model, processor, prompts, images, *, max_new_tokens)."""


def _flatten_visuals(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    out: list[Any] = []
    for v in visuals:
        out.extend(_flatten_visuals(v))
    return out


def _cut_at_stops(text: str, stops: Sequence[str]) -> str:
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _batch_size(value: int | str) -> int:
    """lmms-eval passes `--batch_size` through as given ("8", "auto", "auto:4"): auto means 1 here."""
    text = str(value).strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    if text.startswith("auto"):
        return 1
    raise ValueError(f"batch_size must be a positive integer or 'auto', got {value!r}")


class EveLMM(lmms):
    """lmms-eval model interface for EVE: greedy `generate_until` and exact `loglikelihood`."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: Any = None,
        processor: Any = None,
        batch_size: int | str = 1,
        max_new_tokens: int = 128,
        device: str | None = "auto",
        dtype: str | None = "auto",
        answer_fn: AnswerFn | None = None,
        **kwargs: Any,
    ) -> None:
        """`pretrained` is a checkpoint folder, loaded by `eve_vlm.loading.load_for_inference`
        (`device` / `dtype` "auto": CUDA + bfloat16 when present, else CPU + float32); or pass a
        loaded `model` and `processor`. `answer_fn` replaces `eve_vlm.generate.answer`."""
        super().__init__()
        kwargs.pop("max_batch_size", None)  # lmms-eval's evaluator passes it to every model
        if kwargs:
            logger.warning("EveLMM ignores unknown model_args: %s", sorted(kwargs))
        if model is None or processor is None:
            if pretrained is None:
                raise ValueError("EveLMM needs `pretrained=PATH` or both `model` and `processor`")
            model, processor = load_for_inference(pretrained, device or "auto", dtype or "auto")
        self.model = model.eval() if hasattr(model, "eval") else model
        self.processor = processor
        self.batch_size = _batch_size(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self._answer_fn = answer_fn

    # ------------------------------------------------------------------ helpers
    def _answer(self, prompts: list[str], images: list[list[Any]], max_new_tokens: int) -> list[str]:
        fn = self._answer_fn
        if fn is None:
            from eve_vlm.generate import answer as fn
        return fn(self.model, self.processor, prompts, images, max_new_tokens=max_new_tokens)

    def _doc(self, task: str, split: str, doc_id: Any) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as e:
            raise KeyError(f"no document {doc_id!r} for task {task!r} split {split!r} in task_dict") from e

    def _visuals(
        self, doc_to_visual: Callable[[Any], Any] | None, task: str, split: str, doc_id: Any
    ) -> list[Any]:
        if doc_to_visual is None:
            return []
        visuals = _flatten_visuals(doc_to_visual(self._doc(task, split, doc_id)))
        return [v.convert("RGB") if hasattr(v, "convert") else v for v in visuals]

    def _device(self) -> torch.device:
        params = self.model.parameters() if hasattr(self.model, "parameters") else iter(())
        return next(params, torch.empty(0)).device

    # ------------------------------------------------------------------ lmms interface
    def generate_until(self, requests: Sequence[Instance]) -> list[str]:
        """Greedy answers, batched through `eve_vlm.generate.answer`, cut at the `until` strings."""
        prepared = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen_kwargs = dict(gen_kwargs or {})
            if float(gen_kwargs.get("temperature") or 0) > 0 or gen_kwargs.get("do_sample"):
                logger.warning("EveLMM decodes greedily; ignoring sampling settings %s", gen_kwargs)
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            max_new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            prepared.append((with_image_placeholders(context, len(visuals)), visuals, max_new, until))

        results: list[str | None] = [None] * len(prepared)
        groups: dict[int, list[int]] = {}
        for i, (_, _, max_new, _) in enumerate(prepared):
            groups.setdefault(max_new, []).append(i)
        for max_new, idxs in groups.items():
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start : start + self.batch_size]
                texts = self._answer(
                    [prepared[i][0] for i in chunk], [prepared[i][1] for i in chunk], max_new
                )
                for i, text in zip(chunk, texts, strict=True):
                    results[i] = _cut_at_stops(text, prepared[i][3])
        return [r if r is not None else "" for r in results]

    def loglikelihood(self, requests: Sequence[Instance]) -> list[tuple[float, bool]]:
        """(negative log-likelihood of the continuation, whether greedy decoding would produce it).

        The first value is a loss (-sum of the continuation tokens' log-probs, lower is likelier)
        because lmms-eval's `multiple_choice` scoring picks the choice with `argmin`, the
        convention of its own models. The continuation is the assistant answer of the chat
        template (without the round-end token). One request per forward: with images, spliced
        lengths differ per sample.
        """
        out: list[tuple[float, bool]] = []
        device = self._device()
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            ctx_text, full_text = self._render(with_image_placeholders(context, len(visuals)), continuation)
            images = visuals or None
            ctx = self.processor(ctx_text, images, padding_side="right")
            full = self.processor(full_text, images, padding_side="right")
            ids = full["input_ids"]
            n_cont = ids.shape[1] - ctx["input_ids"].shape[1]
            if n_cont <= 0 or not torch.equal(ids[:, : ctx["input_ids"].shape[1]], ctx["input_ids"]):
                raise ValueError(f"continuation {continuation!r} does not extend the context's tokens")
            labels = ids.clone()
            labels[:, : ids.shape[1] - n_cont] = IGNORE_INDEX
            with torch.inference_mode():
                result = self.model(
                    input_ids=ids.to(device),
                    images=[im.to(device) for im in full["images"]] if full["images"] else None,
                    attention_mask=full["attention_mask"].to(device),
                    labels=labels.to(device),
                )
            logits = result.logits[0]
            valid = getattr(result, "valid", None)
            positions = (
                valid[0].nonzero().squeeze(1)
                if valid is not None
                else torch.arange(logits.shape[0], device=logits.device)
            )
            # Logits at the position before each continuation token predict that token.
            pred_pos = positions[-n_cont - 1 : -1]
            cont_ids = ids[0, -n_cont:].to(logits.device)
            logprobs = torch.log_softmax(logits[pred_pos].float(), dim=-1)
            nll = -float(logprobs.gather(1, cont_ids[:, None]).sum())
            greedy = bool((logprobs.argmax(-1) == cont_ids).all())
            out.append((nll, greedy))
        return out

    def _render(self, user_message: str, continuation: str) -> tuple[str, str]:
        """Prompt text up to the assistant turn, and the same with the continuation appended."""
        user = [{"role": "user", "content": user_message}]
        ctx = self.processor.apply_chat_template(user, add_generation_prompt=True)
        full = self.processor.apply_chat_template(
            [*user, {"role": "assistant", "content": continuation.strip()}], add_generation_prompt=False
        )
        for stop in getattr(self.processor, "stop_strings", []) or []:
            if stop and full.endswith(stop):
                full = full[: -len(stop)]
        if not full.startswith(ctx):
            raise ValueError("chat template does not render the answer as a continuation of the prompt")
        return ctx, full

    def generate_until_multi_round(self, requests: Sequence[Instance]) -> list[str]:
        raise NotImplementedError("EveLMM does not implement multi-round generation")


def lmms_eval_manifest() -> Any:
    """Entry point for lmms-eval's model registry (group "lmms_eval.models")."""
    # Imported here: importing `lmms_eval.models` builds the registry, which loads this entry
    # point, so a module-level import would run while this module is still half-initialised.
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.{EveLMM.__name__}")
