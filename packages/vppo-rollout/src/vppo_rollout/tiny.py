"""Tiny, randomly initialised but *real* Qwen2.5-VL / Qwen3-VL checkpoints, built fully offline.

`build_tiny_checkpoint(out_dir, arch)` writes a folder laid out like a downloaded checkpoint (config.json,
model.safetensors, generation_config.json, tokenizer files, processor_config.json, chat template) that
`load_policy` / `load_processor` (and plain transformers) load. The model classes are the upstream transformers
ones, only the sizes shrink; the tokenizer is a byte-level BPE trained here on a small corpus that covers
everything the synthetic visual task and the SFT warm start need to say, e.g.
"<think>three red shapes</think> The answer is \\boxed{3}".

Everything is a deterministic function of (arch, seed, size overrides): same inputs, same bytes.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2TokenizerFast

from vppo_rollout.loading import IMAGE_ONLY_PROCESSORS, PROCESSOR_CLASS_NAMES, SUPPORTED_ARCHS
from vppo_rollout.sampling import KEPT_ADDED_TOKENS

# Qwen's special tokens (same strings as the real vocabularies; ids differ).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Reasoning tags are ordinary added tokens (not special), as in Qwen3's vocabulary: one id each, kept by decode.
THINK_TOKENS = list(KEPT_ADDED_TOKENS)

# Qwen2-VL chat template (the real one, minus videos / tool calls): a string content or a list of parts,
# one `<|vision_start|><|image_pad|><|vision_end|>` per image part; the processor expands `<|image_pad|>`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey"]
SHAPES = ["circle", "square", "triangle", "circles", "squares", "triangles", "shape", "shapes"]
POSITIONS = ["left", "right", "top", "bottom", "middle", "center", "above", "below", "next to"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def tokenizer_corpus() -> list[str]:
    """Deterministic training text for the tiny BPE: chat roles, the §8 instruction, task vocabulary, answers."""
    lines = [
        "system user assistant You are a helpful assistant.",
        "You FIRST think about the reasoning process as an internal monologue and then provide the final answer.",
        "The reasoning process MUST BE enclosed within <think> </think> tags. "
        "The final answer MUST BE put in \\boxed{}.",
        "What is in this image? Describe it in one sentence. Answer the question.",
        "How many shapes are there? Which colour is the shape on the left? Is it a circle, a square or a triangle?",
        "count the objects in the picture and give the number of each colour",
        "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 yes no A B C D E",
        "+ - * / = ( ) [ ] { } < > . , : ; ? ! ' \" % ^ _ | \\ $ # @ & ~",
    ]
    for i, c in enumerate(COLOURS):
        for j, s in enumerate(SHAPES):
            n = (i + j) % 10
            p = POSITIONS[(i * 3 + j) % len(POSITIONS)]
            lines.append(f"There are {NUMBER_WORDS[n]} {c} {s} at the {p}.")
            lines.append(f"How many {c} {s} are in the image? <think>I see {NUMBER_WORDS[n]} {c} {s}.</think>")
            lines.append(f"<think>{NUMBER_WORDS[n]} {c} {s}</think> The answer is \\boxed{{{n}}}")
            lines.append(f"What colour is the {s} on the {p}? The answer is \\boxed{{{c}}}")
    for a in range(13):
        for b in range(0, 13, 3):
            lines.append(f"{a} + {b} = {a + b}, {a} * {b} = {a * b}, \\boxed{{{a + b}}} \\boxed{{{a * b}}}")
            lines.append(f"<think>{a} plus {b} is {a + b}</think> \\boxed{{{a + b}}}")
    return lines * 4


def build_tokenizer(*, vocab_size: int = 1024, think_special: bool = False) -> Qwen2TokenizerFast:
    """Byte-level BPE (Qwen's pre-tokenizer family) with the Qwen special tokens and the chat template.

    Byte-level means any text round-trips, so graders never see `<unk>`; the trainer stops at `vocab_size`.
    think_special: mark `<think>` / `</think>` special (False: as Qwen3's and Qwen3-VL's tokenizer_config.json
    have them); True builds the variant the engines' decoding must also handle (`vppo_rollout.sampling`).
    """
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=think_special, normalized=False) for t in THINK_TOKENS])
    return Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )


# Default sizes; every key can be overridden through `build_tiny_checkpoint(**size_overrides)`.
DEFAULT_SIZES = {
    "tokenizer_vocab_size": 1024,  # BPE target (the corpus may yield fewer merges)
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vision_depth": 2,
    "vision_hidden_size": 32,
    "vision_intermediate_size": 64,
    "vision_num_heads": 2,
    "max_position_embeddings": 4096,
    # Image bounds in pixels; defaults give 2x2..4x4 merged image tokens (56x56 -> 4 tokens for Qwen2.5-VL).
    "min_pixels": None,  # None: 4 merged patches (28*28*4 Qwen2.5-VL, 32*32*4 Qwen3-VL)
    "max_pixels": None,  # None: 16 merged patches
}

# Overrides for a tiny model that vLLM's CPU backend serves: its attention needs a head dim >= 32 (the defaults give
# 16). The tests of the real engine, the recipe on vLLM and the vLLM benchmark build their checkpoints with these.
VLLM_CPU_SIZES = {
    "hidden_size": 128,
    "num_attention_heads": 4,
    "vision_hidden_size": 64,
    "vision_intermediate_size": 128,
}
MIN_VLLM_CPU_HEAD_DIM = 32


def _check_sizes(arch: str, overrides: dict) -> dict:
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"arch: expected one of {SUPPORTED_ARCHS}, got {arch!r}")
    unknown = [k for k in overrides if k not in DEFAULT_SIZES]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(DEFAULT_SIZES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else f" Valid keys: {sorted(DEFAULT_SIZES)}."
        raise ValueError(f"build_tiny_checkpoint: unknown size override {k!r}.{hint}")
    sizes = {**DEFAULT_SIZES, **overrides}
    factor = (14 if arch == "qwen2_5_vl" else 16) * 2
    sizes["min_pixels"] = sizes["min_pixels"] or factor * factor * 4
    sizes["max_pixels"] = sizes["max_pixels"] or factor * factor * 16
    head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    if sizes["hidden_size"] % sizes["num_attention_heads"] or head_dim % 2:
        raise ValueError(
            f"hidden_size ({sizes['hidden_size']}) must be num_attention_heads ({sizes['num_attention_heads']}) "
            "times an even head_dim"
        )
    if sizes["num_attention_heads"] % sizes["num_key_value_heads"]:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    return sizes


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (temporal, height, width) like Qwen's [16, 24, 24] for 128."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _image_processor(arch: str, sizes: dict):
    """The image processor class transformers itself picks for Qwen-VL (PIL backend when torchvision is missing)."""
    from transformers import Qwen2VLImageProcessor

    kw = {"temporal_patch_size": 2, "merge_size": 2}
    kw["size"] = {"shortest_edge": sizes["min_pixels"], "longest_edge": sizes["max_pixels"]}
    if arch == "qwen2_5_vl":
        # Real Qwen2.5-VL uses CLIP mean/std and 14 px patches.
        kw.update(
            patch_size=14,
            image_mean=[0.48145466, 0.4578275, 0.40821073],
            image_std=[0.26862954, 0.26130258, 0.27577711],
        )
    else:
        kw.update(patch_size=16, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Qwen2VLImageProcessor(**kw)


def _model_config(arch: str, tok, sizes: dict):
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    # Like real Qwen checkpoints, the embedding is larger than the tokenizer (151936 vs 151665): the tail rows
    # exist, are never produced by the tokenizer, and decode to "". Code that assumes V == len(tokenizer) breaks
    # here the same way it would on the real model.
    vocab_size = (len(tok) + 63) // 64 * 64
    text = {
        "vocab_size": vocab_size,
        "hidden_size": sizes["hidden_size"],
        "intermediate_size": sizes["intermediate_size"],
        "num_hidden_layers": sizes["num_hidden_layers"],
        "num_attention_heads": sizes["num_attention_heads"],
        "num_key_value_heads": sizes["num_key_value_heads"],
        "max_position_embeddings": sizes["max_position_embeddings"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": sizes["vision_depth"],
        "hidden_size": sizes["vision_hidden_size"],
        "intermediate_size": sizes["vision_intermediate_size"],
        "num_heads": sizes["vision_num_heads"],
        "out_hidden_size": sizes["hidden_size"],
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    special = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }
    if arch == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(head_dim)}
        # window attention in every block but the last, as in the real model (full attention at 7, 15, 23, 31)
        vision.update(
            patch_size=14,
            window_size=56,
            fullatt_block_indexes=[sizes["vision_depth"] - 1],
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
    from transformers import Qwen3VLConfig

    text["head_dim"] = head_dim
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 5e6,
        "mrope_section": _mrope_section(head_dim),
        "mrope_interleaved": True,
    }
    vision.update(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text, vision_config=vision, **special)


def _model_class(arch: str):
    if arch == "qwen2_5_vl":
        return Qwen2_5_VLForConditionalGeneration
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration


def build_tiny_checkpoint(
    out_dir: str | os.PathLike, arch: str = "qwen2_5_vl", *, seed: int = 0, **size_overrides
) -> Path:
    """Build and save a tiny random Qwen2.5-VL / Qwen3-VL checkpoint; returns the folder.

    Args:
        out_dir: folder to write (created; existing files of the same names are overwritten).
        arch: "qwen2_5_vl" | "qwen3_vl".
        seed: weight-init seed; the whole folder is a deterministic function of (arch, seed, sizes).
        **size_overrides: any key of `DEFAULT_SIZES` (e.g. num_hidden_layers=4, hidden_size=128).
    """
    sizes = _check_sizes(arch, size_overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size=sizes["tokenizer_vocab_size"])
    processor = IMAGE_ONLY_PROCESSORS[arch](
        image_processor=_image_processor(arch, sizes), tokenizer=tok, chat_template=CHAT_TEMPLATE
    )
    config = _model_config(arch, tok, sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(arch)(config)
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _write_real_processor_class(out, arch)
    return out


# The video processor class upstream `AutoProcessor` builds for each arch (it needs torchvision).
VIDEO_PROCESSOR_CLASS_NAMES = {"qwen2_5_vl": "Qwen2VLVideoProcessor", "qwen3_vl": "Qwen3VLVideoProcessor"}


def _video_processor_entry(arch: str, image_processor: dict) -> dict:
    """The `video_processor` section of processor_config.json: the image processor's patching and normalisation.

    Where torchvision is installed (always beside vLLM), `AutoProcessor` builds the arch's video processor too and
    fails on a folder that describes none (a downloaded checkpoint has its preprocessor_config.json for that).
    Videos are never used; the entry only makes the folder complete. The class fills in its own defaults.
    """
    keys = ("image_mean", "image_std", "merge_size", "patch_size", "temporal_patch_size")
    return {"video_processor_type": VIDEO_PROCESSOR_CLASS_NAMES[arch], **{k: image_processor[k] for k in keys}}


def _write_real_processor_class(folder: Path, arch: str) -> None:
    """Name the upstream processor class in processor_config.json, as a downloaded checkpoint does, and describe
    the video processor that upstream class builds.

    The image-only subclass is our loading detail; writing its name, or leaving the video processor out, would make
    the folder unloadable by AutoProcessor on a machine that has torchvision.
    """
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = folder / name
        if not f.is_file():
            continue
        cfg = json.loads(f.read_text())
        if "processor_class" in cfg:
            cfg["processor_class"] = PROCESSOR_CLASS_NAMES[arch]
        if isinstance(cfg.get("image_processor"), dict):
            cfg["video_processor"] = _video_processor_entry(arch, cfg["image_processor"])
        f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tcfg = folder / "tokenizer_config.json"
    if tcfg.is_file():
        cfg = json.loads(tcfg.read_text())
        if "processor_class" in cfg:
            cfg["processor_class"] = PROCESSOR_CLASS_NAMES[arch]
            tcfg.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
