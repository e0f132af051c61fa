"""Load a Qwen2.5-VL / Qwen3-VL policy and its processor from a local Hugging Face folder (or the local hub cache).

Works the same for the tiny checkpoints of `vppo_rollout.tiny` and for downloaded 7B/32B folders.

Why an image-only processor: transformers 5.x builds `Qwen2_5_VLProcessor` / `Qwen3VLProcessor` with a video
processor, and that class needs torchvision (no CPU torchvision wheel exists on PyPI, see ENVIRONMENT.md). RL on
images never needs videos, so where torchvision is missing we load the same processor class with `video_processor`
removed from its constructor: tokenizer, image processor, chat template and the image-token expansion are the
unchanged upstream code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import transformers
from transformers import Qwen2_5_VLProcessor

try:  # Qwen3-VL arrived in transformers 4.57; keep Qwen2.5-VL usable on older versions.
    from transformers import Qwen3VLProcessor
except ImportError:  # pragma: no cover - depends on the installed transformers
    Qwen3VLProcessor = None

SUPPORTED_ARCHS = ("qwen2_5_vl", "qwen3_vl")
# What `processor_class` a real checkpoint's processor_config.json names, per arch.
PROCESSOR_CLASS_NAMES = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}


def _image_only(processor_cls: type) -> type:
    """Subclass of `processor_cls` whose constructor has no `video_processor` argument.

    ProcessorMixin discovers its sub-processors from the __init__ signature, so dropping the argument is what
    makes it skip (and not import) the torchvision-only video processor.
    """

    class ImageOnly(processor_cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            kwargs.pop("video_processor", None)
            super().__init__(
                image_processor=image_processor,
                tokenizer=tokenizer,
                video_processor=None,
                chat_template=chat_template,
                **kwargs,
            )

    ImageOnly.__name__ = ImageOnly.__qualname__ = "ImageOnly" + processor_cls.__name__
    ImageOnly.__module__ = __name__
    return ImageOnly


ImageOnlyQwen2_5_VLProcessor = _image_only(Qwen2_5_VLProcessor)
ImageOnlyQwen3VLProcessor = _image_only(Qwen3VLProcessor) if Qwen3VLProcessor is not None else None
IMAGE_ONLY_PROCESSORS = {"qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor, "qwen3_vl": ImageOnlyQwen3VLProcessor}


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ) not in ("0", "", "false", "False")


def _resolve(path: str | os.PathLike, what: str) -> str:
    """Return `path` as a string; raise a clear error for a missing local path or an uncached hub id offline."""
    p = Path(path).expanduser()
    if p.is_dir():
        return str(p)
    s = str(path)
    if not _HUB_ID.fullmatch(s):
        raise FileNotFoundError(
            f"{what}: {s!r} is not an existing folder. Pass the folder of a Hugging Face checkpoint."
        )
    if _is_offline():
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(s, local_files_only=True)
        except Exception as e:
            raise OSError(
                f"{what}: {s!r} is not a local folder and looks like a hub id, but the machine is offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE "
                f"set) and it is not in the local cache. Download it on a connected machine "
                f"(`hf download {s} --local-dir DIR`) and pass the folder instead."
            ) from e
    return s


def checkpoint_arch(path: str | os.PathLike) -> str:
    """The `model_type` of a checkpoint folder ("qwen2_5_vl" | "qwen3_vl"); ValueError for anything else."""
    folder = Path(_resolve(path, "checkpoint_arch(path)"))
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"path: {str(folder)!r} has no config.json; is it a Hugging Face model folder?")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type not in SUPPORTED_ARCHS:
        raise ValueError(
            f"path: {str(folder)!r} holds a {model_type!r} model; vppo supports model_type in {SUPPORTED_ARCHS} "
            "(Qwen2.5-VL, Qwen3-VL)."
        )
    return model_type


def load_policy(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> transformers.PreTrainedModel:
    """Load `Qwen2_5_VLForConditionalGeneration` / `Qwen3VLForConditionalGeneration` from a local folder.

    Args:
        path: a local HF folder (config.json + safetensors) or a hub id already in the local cache.
        dtype: parameter dtype (torch.float32 | torch.bfloat16 | torch.float16).
        device: where the parameters go ("cpu", "cuda", "cuda:1", ...).
        trust_remote_code: passed to transformers (not needed for the supported archs).
        attn_implementation: "sdpa" | "eager" | "flash_attention_2" | None (transformers' default).
    Returns the model in eval mode (the trainer calls `.train()`).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    resolved = _resolve(path, "load_policy(path)")
    checkpoint_arch(resolved)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = transformers.AutoModelForImageTextToText.from_pretrained(resolved, **kwargs)
    return model.to(device).eval()


def set_pixel_bounds(processor, *, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
    """Set the image processor's resize bounds in place (transformers 5 keeps them in `size`)."""
    ip = processor.image_processor
    lo = min_pixels if min_pixels is not None else ip.size["shortest_edge"]
    hi = max_pixels if max_pixels is not None else ip.size["longest_edge"]
    for name, value in (("min_pixels", lo), ("max_pixels", hi)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive int (pixels, e.g. 3136 = 56*56), got {value!r}")
    if lo > hi:
        raise ValueError(f"min_pixels ({lo}) must be <= max_pixels ({hi})")
    size = {"shortest_edge": lo, "longest_edge": hi}
    ip.size = type(ip.size)(**size) if not isinstance(ip.size, dict) else size  # transformers 5: a SizeDict
    # transformers 4.x image processors read these attributes instead of `size`; 5.x has none and would warn
    # (a min_pixels attribute is passed on as a deprecated call argument), so only update ones that exist.
    for attr, value in (("min_pixels", lo), ("max_pixels", hi)):
        if getattr(ip, attr, None) is not None:
            setattr(ip, attr, value)


# What a Qwen-VL processor is built from: any one file of each group.
_PROCESSOR_FILE_GROUPS = {
    "the tokenizer": ("tokenizer.json", "vocab.json"),
    "the image processor settings": ("preprocessor_config.json", "processor_config.json"),
}


def _check_processor_files(folder: Path) -> None:
    """Raise FileNotFoundError naming what a model folder lacks to build its processor, and how to add it.

    Without this, transformers fails deep inside with "Can't load image processor ... make sure you don't have a
    local directory with the same name", which names neither the missing file nor the fix.
    """
    if not folder.is_dir():
        return  # a hub id: transformers downloads (or reports) it
    missing = [
        f"{what} ({' or '.join(names)})"
        for what, names in _PROCESSOR_FILE_GROUPS.items()
        if not any((folder / name).is_file() for name in names)
    ]
    if missing:
        raise FileNotFoundError(
            f"{folder} has the model but not its processor: missing {'; '.join(missing)}. Copy the tokenizer and "
            "processor files (tokenizer.json, tokenizer_config.json, preprocessor_config.json or "
            "processor_config.json, chat_template.jinja) from the model it was trained from, e.g. "
            "`huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --include 'tokenizer*' 'preprocessor_config.json' "
            f"'chat_template*' --local-dir {folder}`, or save them with processor.save_pretrained({str(folder)!r})"
        )


def load_processor(
    path: str | os.PathLike,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    trust_remote_code: bool = False,
):
    """Load the Qwen-VL processor of a checkpoint folder, with torchvision when present and without it otherwise.

    With torchvision, `AutoProcessor` is used as-is, and a folder it cannot load is an error naming the folder (vLLM
    loads it the same way). Without torchvision the arch's image-only processor class (see module docstring) loads
    the same files. `min_pixels`/`max_pixels`
    override the image processor's resize bounds (ALGORITHMS.md §7 uses [200704, 1003520] for 7B).
    """
    resolved = _resolve(path, "load_processor(path)")
    arch = checkpoint_arch(resolved)
    _check_processor_files(Path(resolved))
    processor = None
    if transformers.utils.is_torchvision_available():
        # Never fall back silently here: the folder must load the way vLLM (which always has torchvision) loads it.
        try:
            processor = transformers.AutoProcessor.from_pretrained(resolved, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise OSError(
                f"load_processor: transformers.AutoProcessor cannot load {resolved!r} ({type(e).__name__}: {e}). "
                "With torchvision installed it builds the Qwen-VL video processor too, from preprocessor_config.json "
                "or a 'video_processor' section of processor_config.json; a folder written by "
                "vppo_rollout.build_tiny_checkpoint before that section existed needs rebuilding. If torchvision "
                "itself is broken (ENVIRONMENT.md), uninstall it."
            ) from e
        if not isinstance(processor, transformers.ProcessorMixin):
            raise OSError(
                f"load_processor: transformers.AutoProcessor gave a {type(processor).__name__} for {resolved!r}, not "
                "a Qwen-VL processor; the folder lacks processor_config.json / preprocessor_config.json"
            )
    else:
        cls = IMAGE_ONLY_PROCESSORS[arch]
        if cls is None:  # pragma: no cover - depends on the installed transformers
            raise ImportError(f"transformers {transformers.__version__} has no Qwen3VLProcessor; upgrade to >= 4.57")
        processor = cls.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    if min_pixels is not None or max_pixels is not None:
        set_pixel_bounds(processor, min_pixels=min_pixels, max_pixels=max_pixels)
    return processor
