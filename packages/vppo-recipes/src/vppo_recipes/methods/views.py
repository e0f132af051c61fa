"""The altered views of a prompt that methods score the responses under (ALGORITHMS.md §1 "what image' is", §5,
§9): one object per kind, chosen in a method's `views()`, built per micro-batch with `view.inputs(ctx, mb, index)`.

Every random draw is seeded by the response's identity (per_response: VPPO) or its prompt's (PAPO, DVRP, VEPO), and
by the view's index among the method's views, never by the batching: a view is the same on any number of ranks
and after a resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from vppo_core.attention import text_only_attention
from vppo_core.perturb import IMAGE_PERTURBATIONS, diffusion_noise_level, perturb_pixels
from vppo_recipes.counterfactual import cross_modal_value_mean
from vppo_recipes.methods.base import MethodContext
from vppo_recipes.methods.records import MicroBatch, ViewInputs
from vppo_recipes.seeding import mix_seed

# vppo_rollout (collation, prompts, regions) is imported where a view is built: it imports transformers, which the
# config check (`validate_config` reads the methods' settings) does not need.

# Salt of the per-response (or per-prompt) seed of the pixel views.
PIXEL_SEED_SALT = 0x9E7


def _perturbed_pixels(ctx: MethodContext, mb: MicroBatch, index: int, per_response: bool, **options) -> ViewInputs:
    """mb's inputs with each row's images perturbed by `vppo_core.perturb_pixels(**options)`, each row seeded by
    (seed, its prompt, its response index when per_response, the view's index)."""
    inputs = dict(mb.inputs)
    ip = ctx.processor.image_processor
    thw = inputs["image_grid_thw"]
    patches = thw.prod(-1).tolist()  # pixel_values rows per image, images in row order
    pieces, img, start = [], 0, 0
    for b, n_images in enumerate(mb.images_per_row):
        n_rows = sum(patches[img : img + n_images])
        seed = mix_seed(ctx.seed, mb.uids[b], mb.response_index[b] if per_response else 0, PIXEL_SEED_SALT)
        if index:  # a method's second pixel view (DVRP's noised image) draws apart from its first
            seed = mix_seed(seed, index)
        g = torch.Generator(device=inputs["pixel_values"].device).manual_seed(seed)
        pieces.append(
            perturb_pixels(
                inputs["pixel_values"][start : start + n_rows],
                thw[img : img + n_images],
                **options,
                image_mean=ip.image_mean,
                image_std=ip.image_std,
                rescale_factor=ip.rescale_factor,
                generator=g,
                patch_size=ip.patch_size,
                temporal_patch_size=ip.temporal_patch_size,
                merge_size=ip.merge_size,
            )
        )
        img, start = img + n_images, start + n_rows
    inputs["pixel_values"] = torch.cat(pieces)
    return ViewInputs(inputs, mb.prompt_length, contextlib.nullcontext())


@dataclass(frozen=True)
class PerturbedPixels:
    """A share `prob` of the ViT patches perturbed (`mode`: blacken, noise, blur, grey); a fresh mask per response
    (VPPO) or one per prompt (PAPO, DVRP)."""

    mode: str = "blacken"
    prob: float = 0.5
    per_response: bool = True

    def __post_init__(self):
        if self.mode not in IMAGE_PERTURBATIONS:
            raise ValueError(f"PerturbedPixels mode={self.mode!r}: one of {', '.join(IMAGE_PERTURBATIONS)}")
        if not 0.0 <= self.prob <= 1.0:  # NaN fails too
            raise ValueError(f"PerturbedPixels prob={self.prob!r}: must be in [0, 1]")

    def inputs(self, ctx: MethodContext, mb: MicroBatch, index: int) -> ViewInputs:
        return _perturbed_pixels(ctx, mb, index, self.per_response, mode=self.mode, prob=self.prob)


@dataclass(frozen=True)
class DiffusionNoise:
    """VP-diffusion noise on the pixels at a level annealed from strong to weak over the run (DVRP's schedule,
    `vppo_core.diffusion_noise_level` at the step being taken), one draw per prompt."""

    t_init: float
    gamma: float
    t_max: float
    per_response: bool = False

    def __post_init__(self):
        if not (self.t_init >= 0 and self.gamma >= 0 and 0 < self.t_max <= 1000):  # NaN fails too
            raise ValueError(
                f"DiffusionNoise t_init={self.t_init!r}, gamma={self.gamma!r}, t_max={self.t_max!r}: t_init and gamma "
                "must be >= 0, t_max in (0, 1000]"
            )

    def level(self, step: int, max_steps: int) -> float:
        """The noise level of RL step `step` (0-based) of `max_steps`."""
        return diffusion_noise_level(step + 1, max_steps, t_init=self.t_init, gamma=self.gamma, t_max=self.t_max)

    def inputs(self, ctx: MethodContext, mb: MicroBatch, index: int) -> ViewInputs:
        level = self.level(ctx.step, ctx.max_steps)
        return _perturbed_pixels(ctx, mb, index, self.per_response, mode="vp_diffusion", noise_level=level)


@dataclass(frozen=True)
class GaussianNoise:
    """Gaussian noise of standard deviation `std` on the normalised pixel values (VEPO), one draw per prompt."""

    std: float
    per_response: bool = False

    def __post_init__(self):
        if not self.std >= 0:  # NaN fails too
            raise ValueError(f"GaussianNoise std={self.std!r}: must be >= 0")

    def inputs(self, ctx: MethodContext, mb: MicroBatch, index: int) -> ViewInputs:
        return _perturbed_pixels(ctx, mb, index, self.per_response, mode="gaussian", noise_std=self.std)


@dataclass(frozen=True)
class TextOnly:
    """No token attends to a visual token; tokens and M-RoPE positions unchanged (PGPO)."""

    def inputs(self, ctx: MethodContext, mb: MicroBatch, index: int) -> ViewInputs:
        inputs = dict(mb.inputs)
        eager = getattr(ctx.model.config, "_attn_implementation", "sdpa") == "eager"
        inputs["attention_mask"] = text_only_attention(
            inputs["input_ids"],
            ctx.image_token_id,
            inputs["attention_mask"],
            dtype=ctx.dtype if eager else torch.bool,  # additive mask for eager, boolean for SDPA
        )
        return ViewInputs(inputs, mb.prompt_length, contextlib.nullcontext())


@dataclass(frozen=True)
class CounterfactualAttention:
    """Salient image values replaced by their mean in every decoder layer (CFPO): the same inputs, run inside an
    attention intervention (`vppo_recipes.counterfactual.cross_modal_value_mean`)."""

    std_multiplier: float

    def inputs(self, ctx: MethodContext, mb: MicroBatch, index: int) -> ViewInputs:
        inputs = dict(mb.inputs)
        context = cross_modal_value_mean(
            ctx.model, inputs["input_ids"], attention_mask=inputs["attention_mask"],
            std_multiplier=self.std_multiplier, prompt_length=mb.prompt_length,
        )  # fmt: skip
        return ViewInputs(inputs, mb.prompt_length, context)


def _recollated(ctx: MethodContext, mb: MicroBatch, prompts) -> ViewInputs:
    """mb's responses after other prompts, collated afresh (the prompt length may change)."""
    from vppo_rollout.collate import collate_rollout, model_inputs

    ids = [row[: int(n)].tolist() for row, n in zip(mb.responses, mb.mask.sum(1))]
    batch = collate_rollout(ctx.processor, prompts, ids, config=ctx.model_config)
    inputs = {k: v.to(ctx.device) for k, v in model_inputs(batch).items()}
    return ViewInputs(inputs, int(batch["prompt_length"]), contextlib.nullcontext())


@dataclass(frozen=True)
class NoImage:
    """The prompt without its image parts (ToR)."""

    def inputs(self, ctx: MethodContext, mb: MicroBatch, index: int) -> ViewInputs:
        from vppo_rollout.prompts import prompt_without_images

        return _recollated(ctx, mb, [prompt_without_images(p, ctx.processor) for p in mb.prompts])


@dataclass(frozen=True)
class RegionsFilled:
    """Each response's own evidence boxes filled with their mean colour; a response with none sees the original
    image (CGPO)."""

    def inputs(self, ctx: MethodContext, mb: MicroBatch, index: int) -> ViewInputs:
        from vppo_rollout.regions import filled_region_images

        prompts = [
            dataclasses.replace(p, images=filled_region_images(p.images, text)) for p, text in zip(mb.prompts, mb.texts)
        ]
        return _recollated(ctx, mb, prompts)
