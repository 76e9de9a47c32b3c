"""Turn a validated chat request into model inputs, enforcing the server's limits.

Every problem becomes a `RequestError` naming the offending field, which the app returns as a 4xx
JSON error; nothing here touches the model.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from ..constants import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from ..generate.sampling import GenerationConfig
from ..processing.images import ImageError, load_image
from .batcher import GenRequest
from .schemas import ChatCompletionRequest, ImagePart, TextPart

logger = logging.getLogger(__name__)


@dataclass
class ServerLimits:
    """What one request may ask for (defaults suit a single-GPU demo server)."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 4
    max_prompt_tokens: int = 8192
    max_output_tokens: int = 1024
    default_max_tokens: int = 256
    allow_remote_images: bool = False  # http(s) URLs are fetched by the server (an SSRF risk)
    allow_file_images: bool = False  # file: URLs read the server's disk; never on with remote clients
    remote_timeout_s: float = 10.0


class RequestError(Exception):
    """A client mistake: HTTP `status`, a message, and the request field it concerns."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


def decode_data_url(url: str, param: str, limits: ServerLimits) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise RequestError("data URL must look like 'data:image/<type>;base64,<payload>'", param)
    if ";base64" not in header:
        raise RequestError("data URL must be base64-encoded ('data:image/<type>;base64,...')", param)
    if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
        raise RequestError(f"image is larger than {limits.max_image_bytes} bytes", param, 413)
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"invalid base64 in data URL: {exc}", param) from exc
    if not data:
        raise RequestError("data URL holds no data", param)
    return data


def fetch_image_bytes(url: str, param: str, limits: ServerLimits) -> bytes:
    """The bytes behind an image URL, if the server's flags allow that kind of URL."""
    if url.startswith("data:"):
        return decode_data_url(url, param, limits)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        if not limits.allow_remote_images:
            raise RequestError(
                "remote image URLs are disabled on this server (start it with --allow-remote-images); "
                "send the image inline as a data: URL",
                param,
            )
        return _download(url, param, limits)
    if scheme == "file":
        if not limits.allow_file_images:
            raise RequestError("file: image URLs are disabled on this server; send a data: URL", param)
        path = unquote(urlparse(url).path)
        try:
            with open(path, "rb") as fh:
                data = fh.read(limits.max_image_bytes + 1)
        except OSError as exc:
            raise RequestError(f"cannot read {path}: {exc.strerror}", param) from exc
        if len(data) > limits.max_image_bytes:
            raise RequestError(f"image is larger than {limits.max_image_bytes} bytes", param, 413)
        return data
    raise RequestError(f"unsupported image URL scheme {scheme or url[:16]!r} (use a data: URL)", param)


def _download(url: str, param: str, limits: ServerLimits) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=limits.remote_timeout_s, follow_redirects=False) as resp:
            if resp.status_code != 200:
                raise RequestError(f"fetching the image returned HTTP {resp.status_code}", param)
            data = bytearray()
            for chunk in resp.iter_bytes():
                data.extend(chunk)
                if len(data) > limits.max_image_bytes:
                    raise RequestError(f"image is larger than {limits.max_image_bytes} bytes", param, 413)
            return bytes(data)
    except httpx.HTTPError as exc:
        raise RequestError(f"cannot fetch the image: {exc}", param) from exc


def _check_image(data: bytes, param: str, limits: ServerLimits) -> None:
    """Name an image problem in the client's terms (PIL's own wording leaks internals)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RequestError(f"not a decodable image ({len(data)} bytes)", param) from exc
    if width * height > limits.max_image_pixels:
        raise RequestError(
            f"image is {width}x{height} = {width * height} pixels, which exceeds --max-image-pixels "
            f"{limits.max_image_pixels}",
            param,
        )


def _sampling(req: ChatCompletionRequest, limits: ServerLimits) -> GenerationConfig:
    """The request's generation settings; temperature absent or 0 means greedy."""
    max_new = (
        req.output_limit
        if req.output_limit is not None
        else min(limits.default_max_tokens, limits.max_output_tokens)
    )
    if max_new > limits.max_output_tokens:
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        raise RequestError(
            f"{field}={max_new} exceeds this server's limit of {limits.max_output_tokens} (--max-output-tokens)",
            field,
        )
    temperature = req.temperature or 0.0
    return GenerationConfig(
        max_new_tokens=max_new,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=req.top_p,
        top_k=req.top_k,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        stop_strings=req.stop_list,
    )


def build_request(req: ChatCompletionRequest, processor: Any, limits: ServerLimits) -> GenRequest:
    """Load and check images, render the conversation, count tokens; raises `RequestError`."""
    config = _sampling(req, limits)
    messages: list[dict[str, str]] = []
    sources: list[tuple[str, str]] = []  # (url, param) in placeholder order
    for i, msg in enumerate(req.messages):
        content = msg.content
        if isinstance(content, str) or content is None:
            text = content or ""
            if IMAGE_PLACEHOLDER in text:
                raise RequestError(
                    f"text may not contain {IMAGE_PLACEHOLDER}; send images as image_url parts",
                    f"messages[{i}].content",
                )
            messages.append({"role": msg.role, "content": text})
            continue
        texts, n_images = [], 0
        for j, part in enumerate(content):
            if isinstance(part, TextPart):
                if IMAGE_PLACEHOLDER in part.text:
                    raise RequestError(
                        f"text may not contain {IMAGE_PLACEHOLDER}; send images as image_url parts",
                        f"messages[{i}].content[{j}].text",
                    )
                texts.append(part.text)
            elif isinstance(part, ImagePart):
                if msg.role != "user":
                    raise RequestError("only user messages may contain images", f"messages[{i}].content[{j}]")
                sources.append((part.image_url.url, f"messages[{i}].content[{j}].image_url"))
                n_images += 1
        messages.append(
            {"role": msg.role, "content": IMAGE_PLACEHOLDER * n_images + "\n".join(t for t in texts if t)}
        )
    if len(sources) > limits.max_images:
        raise RequestError(
            f"{len(sources)} images sent; this server accepts at most {limits.max_images} (--max-images)",
            "messages",
        )
    if not messages or messages[-1]["role"] != "user":
        raise RequestError("the last message must come from the user", "messages")

    pixels = []
    for url, param in sources:
        data = fetch_image_bytes(url, param, limits)
        if len(data) > limits.max_image_bytes:
            raise RequestError(f"image is larger than {limits.max_image_bytes} bytes", param, 413)
        _check_image(data, param, limits)
        try:
            image = load_image(data, max_pixels=limits.max_image_pixels)
            pixels.append(processor.image_processor([image])[0])
        except ImageError as exc:
            raise RequestError(f"not a decodable image ({len(data)} bytes)", param) from exc
    try:
        ids = processor.encode_prompt(messages, num_images=len(pixels))
    except ValueError as exc:  # ConversationError: roles out of order, misplaced system message...
        raise RequestError(str(exc), "messages") from exc
    prompt_tokens = len(ids) - len(pixels) + sum(int(processor.num_image_tokens(p)) for p in pixels)
    if prompt_tokens > limits.max_prompt_tokens:
        raise RequestError(
            f"prompt is {prompt_tokens} tokens (images included); this server accepts at most "
            f"{limits.max_prompt_tokens} (--max-prompt-tokens)",
            "messages",
        )
    assert sum(1 for t in ids if t == IMAGE_TOKEN_INDEX) == len(pixels)
    return GenRequest(
        input_ids=ids, images=pixels, config=config, prompt_tokens=prompt_tokens, ignore_eos=req.ignore_eos
    )
