"""From a record (question, images) to a chat-formatted Qwen-VL prompt with images resized into the pixel bounds.

`Prompt.text` carries ONE `<|image_pad|>` per image (what chat templates produce and what vLLM expects); the
processor expands each to the image's number of merged patches when the batch is collated for transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vppo_rollout.images import SKIP_REASONS, SkipRow, decode_image

# ALGORITHMS.md §8: reason inside <think> </think>, final answer in \boxed{} (the VPPO / EasyR1 r1v wording).
DEFAULT_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \\boxed{}."
)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# ViRL39K / MMK12 questions mark where each image goes with this placeholder.
IMAGE_PLACEHOLDER = "<image>"


class PromptTooLongError(ValueError):
    """A prompt (text + expanded image tokens) is longer than `max_prompt_length`; recipes skip and count these."""


def prompt_skip_reason(err: ValueError) -> str:
    """The `SKIP_REASONS` entry of a record whose prompt `build_prompt` could not make (it raised `err`): the image's
    own reason (missing, undecodable, too large), prompt_too_long, or bad_prompt (e.g. more <image> placeholders
    than images, an image whose aspect ratio the processor refuses). Training and evaluation count skips by it."""
    if isinstance(err.__cause__, SkipRow):
        return err.__cause__.reason
    if isinstance(err, PromptTooLongError):
        return "prompt_too_long"
    return "bad_prompt"


@dataclass
class Prompt:
    """One rollout prompt.

    text: chat-formatted string, one `<|image_pad|>` per image (unexpanded).
    images: RGB PIL images already resized to the processor's patch grid within [min_pixels, max_pixels].
    question: the raw question (for logging / grading).
    prompt_token_ids: token ids of `text` (unexpanded: one image-pad id per image, the form vLLM takes).
    num_tokens: length the model sees: text tokens + expanded image tokens.
    """

    text: str
    images: list[Image.Image] = field(default_factory=list)
    question: str = ""
    prompt_token_ids: list[int] | None = None
    num_tokens: int | None = None


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's resize rule: both sides multiples of `factor` (patch*merge), area in [min_pixels, max_pixels],
    aspect ratio kept as well as possible. Same arithmetic as transformers' `smart_resize` for Qwen2-VL."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be < 200, got {height}x{width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pixel_bounds(processor) -> tuple[int, int, int]:
    """(factor, min_pixels, max_pixels) of a Qwen-VL processor; factor = patch_size * merge_size (28 or 32)."""
    ip = processor.image_processor
    return ip.patch_size * ip.merge_size, ip.size["shortest_edge"], ip.size["longest_edge"]


def load_image(image: Any, *, name: str = "image") -> Image.Image:
    """Open one image given as PIL image, path, bytes, or a datasets dict {"bytes": ..., "path": ...}: its RGB
    picture by `vppo_rollout.images.decode_image` (transparency on white, 16-bit greyscale scaled, ...).

    Raises ValueError naming `name` and the reason for a missing, unreadable, too large or zero-size image.
    """
    try:
        return decode_image(image, label=name)
    except SkipRow as skip:
        raise ValueError(f"{skip.detail or name} ({skip.reason}: {SKIP_REASONS[skip.reason]})") from skip


def resize_image(image: Image.Image, processor) -> Image.Image:
    """Resize to Qwen's patch grid within the processor's pixel bounds (bicubic, as the processor itself does)."""
    factor, lo, hi = pixel_bounds(processor)
    h, w = smart_resize(image.height, image.width, factor=factor, min_pixels=lo, max_pixels=hi)
    if (h, w) == (image.height, image.width):
        return image
    return image.resize((w, h), resample=Image.Resampling.BICUBIC)


def _user_content(question: str, n_images: int, instruction: str | None) -> list[dict]:
    text = question.strip() if not instruction else f"{question.strip()} {instruction}"
    if IMAGE_PLACEHOLDER not in text:
        return [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != n_images:
        raise ValueError(
            f"question: has {len(pieces) - 1} {IMAGE_PLACEHOLDER!r} placeholders but {n_images} images were given; "
            "give one image per placeholder (or no placeholders: images then precede the text)"
        )
    content: list[dict] = []
    for i, piece in enumerate(pieces):
        if piece.strip():
            content.append({"type": "text", "text": piece})
        if i < n_images:
            content.append({"type": "image"})
    return content


def build_prompt(
    processor,
    question: str,
    images: list | None = None,
    *,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    instruction: str | None = DEFAULT_INSTRUCTION,
    max_images: int | None = None,
    max_prompt_length: int | None = None,
) -> Prompt:
    """Chat-format `question` with its images (ALGORITHMS.md §8).

    The user turn is `question + " " + instruction`; images go where the question has `<image>` placeholders,
    otherwise before the text (Qwen's own convention). Images are decoded, converted to RGB and resized into the
    processor's [min_pixels, max_pixels] (see `load_processor`).

    Raises ValueError for an unreadable/zero-size image (naming `images[i]`), more than `max_images` images,
    and `PromptTooLongError` when the prompt the model sees (with expanded image tokens) exceeds
    `max_prompt_length`.
    """
    if not isinstance(question, str):
        raise ValueError(f"question: expected str, got {type(question).__name__}")
    images = list(images or [])
    if max_images is not None and len(images) > max_images:
        raise ValueError(
            f"images: {len(images)} images exceed the per-prompt limit max_images={max_images} "
            "(vLLM: limit_mm_per_prompt); raise the limit or drop the record"
        )
    pil = [resize_image(load_image(img, name=f"images[{i}]"), processor) for i, img in enumerate(images)]
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": _user_content(question, len(pil), instruction)})
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    n_pad = ids.count(processor.image_token_id)
    if n_pad != len(pil):
        raise ValueError(
            f"the chat template produced {n_pad} image tokens for {len(pil)} images; the processor's chat "
            "template must emit one <|image_pad|> per image part"
        )
    num_tokens = len(ids) + sum(image_token_count(processor, img) - 1 for img in pil)
    if max_prompt_length is not None and num_tokens > max_prompt_length:
        raise PromptTooLongError(
            f"prompt: {num_tokens} tokens (incl. expanded image tokens) > max_prompt_length={max_prompt_length}; "
            "shorten the question, lower max_pixels or raise max_prompt_length"
        )
    return Prompt(text=text, images=pil, question=question, prompt_token_ids=ids, num_tokens=num_tokens)


def image_token_count(processor, image: Image.Image) -> int:
    """Number of `<|image_pad|>` tokens one (resized) image expands to: (H/patch)·(W/patch)/merge²."""
    factor, lo, hi = pixel_bounds(processor)
    h, w = smart_resize(image.height, image.width, factor=factor, min_pixels=lo, max_pixels=hi)
    return (h // factor) * (w // factor)


# What a Qwen-VL chat template writes for one image part (Qwen2.5-VL and Qwen3-VL alike).
IMAGE_PART = "<|vision_start|><|image_pad|><|vision_end|>"


def prompt_without_images(prompt: Prompt, processor) -> Prompt:
    """The same chat with its image parts removed: ToR's "no image" view (ALGORITHMS.md §9.3).

    Every ``<|vision_start|><|image_pad|><|vision_end|>`` is cut from `prompt.text`, which is what the chat template
    renders for the same messages without their image entries; the system prompt, question and instruction are
    unchanged. Raises ValueError if the text does not hold one such part per image.
    """
    if prompt.text.count(IMAGE_PART) != len(prompt.images):
        raise ValueError(
            f"prompt: the text holds {prompt.text.count(IMAGE_PART)} image parts {IMAGE_PART!r} for "
            f"{len(prompt.images)} images; the no-image view needs the Qwen-VL chat template's image parts"
        )
    text = prompt.text.replace(IMAGE_PART, "")
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    return Prompt(text=text, images=[], question=prompt.question, prompt_token_ids=ids, num_tokens=len(ids))
