"""An lmms-eval model ("lmms") backed by an EVE checkpoint.

lmms-eval hands over `Instance` requests whose `.args` are
`(context, gen_kwargs, doc_to_visual, doc_id, task, split)` for `generate_until` and
`(context, continuation_or_doc_to_target, doc_to_visual, doc_id, task, split)` for
`loglikelihood`; the document is `self.task_dict[task][split][doc_id]` (filled by the evaluator).
lmms-eval itself is optional: without it the class has the same interface on a plain base, so
it can be driven (and tested) with any objects carrying `.args`.

Register it with lmms-eval through the entry point group "lmms_eval.models" pointing at
`lmms_eval_manifest` (see docs/evaluation.md), then `lmms-eval --model eve --model_args pretrained=PATH`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from eve_vlm.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)

try:  # pragma: no cover - depends on the optional package
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError:  # lmms-eval is optional

    class _LmmsBase:  # type: ignore[no-redef]
        """Stand-in for `lmms_eval.api.model.lmms` (rank 0 of 1, empty task_dict)."""

        def __init__(self) -> None:
            self._rank = 0
            self._world_size = 1
            self.task_dict: dict[str, Any] = {}

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size


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


class EveLMM(_LmmsBase):
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
        device: str | None = None,
        answer_fn: AnswerFn | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not hasattr(self, "task_dict"):
            self.task_dict = {}
        if kwargs:
            logger.warning("EveLMM ignores unknown model_args: %s", sorted(kwargs))
        if model is None or processor is None:
            if pretrained is None:
                raise ValueError("EveLMM needs `pretrained=PATH` or both `model` and `processor`")
            from eve_vlm import EveForCausalLM, EveProcessor

            model = EveForCausalLM.from_pretrained(pretrained)
            processor = EveProcessor.from_pretrained(pretrained)
        if device is not None:
            model = model.to(device)
        self.model = model.eval() if hasattr(model, "eval") else model
        self.processor = processor
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1  # lmms-eval may pass "auto"
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

    @staticmethod
    def _user_message(context: str, n_images: int) -> str:
        """Put one placeholder per image in front unless the task already placed them (as LLaVA does)."""
        if n_images and IMAGE_PLACEHOLDER not in context:
            return " ".join([IMAGE_PLACEHOLDER] * n_images) + "\n" + context
        return context

    # ------------------------------------------------------------------ lmms interface
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
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
            prepared.append((self._user_message(context, len(visuals)), visuals, max_new, until))

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

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation, whether greedy decoding would produce it).

        The continuation is the assistant answer of the chat template (without the round-end
        token). One request per forward: with images, spliced lengths differ per sample.
        """
        import torch

        out: list[tuple[float, bool]] = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            ctx_text, full_text = self._render(self._user_message(context, len(visuals)), continuation)
            images = visuals or None
            ctx = self.processor(ctx_text, images, padding_side="right")
            full = self.processor(full_text, images, padding_side="right")
            ids = full["input_ids"]
            n_cont = ids.shape[1] - ctx["input_ids"].shape[1]
            if n_cont <= 0 or not torch.equal(ids[:, : ctx["input_ids"].shape[1]], ctx["input_ids"]):
                raise ValueError(f"continuation {continuation!r} does not extend the context's tokens")
            labels = ids.clone()
            labels[:, : ids.shape[1] - n_cont] = IGNORE_INDEX
            device = next(self.model.parameters()).device if hasattr(self.model, "parameters") else "cpu"
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
            total = float(logprobs.gather(1, cont_ids[:, None]).sum())
            greedy = bool((logprobs.argmax(-1) == cont_ids).all())
            out.append((total, greedy))
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

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("EveLMM does not implement multi-round generation")


def lmms_eval_manifest() -> Any:
    """Entry point for lmms-eval's model registry (group "lmms_eval.models")."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="eve", simple_class_path="eve_vlm.eval.lmms_adapter.EveLMM")
