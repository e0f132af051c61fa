"""CPPO (ALGORITHMS.md §9.11): a contrastive perception loss on the perception tokens.

Two altered views of each prompt's images, drawn once per prompt: an information-preserving one (colour jitter, a
perspective warp or a small rotation) and an information-removing one (50 noise patches or a 60-70 % zoom crop), the
official code's augmentations on the same PIL images. The perception tokens are, per response, the top half of the
tokens whose entropy rises under the information-removing view (by the rise relative to that view's entropy),
kept only in responses with a positive advantage. On them the loss adds
`coef · agg(softplus((k3(π_θ, pos) − k3(π_θ, neg)) / τ))`, the aggregation the loss's own over those tokens.

Both views are scored once before the update, without gradient (§9's rule); the official code runs them as
forwards of the current policy inside the update, with gradient (a difference the seam cannot express: it has no
gradient pass over an altered view).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance

from vppo_core.losses import cppo_contrastive_loss
from vppo_core.masking import cppo_perception_mask
from vppo_recipes.forward import view_divergences_in_root
from vppo_recipes.methods.base import Method, MethodContext, param
from vppo_recipes.methods.records import MicroBatch, Shaping, ViewInputs
from vppo_recipes.methods.views import _recollated
from vppo_recipes.seeding import mix_seed

# Salt of the per-prompt seed of CPPO's augmentations.
AUGMENT_SEED_SALT = 0xC990


def _perspective_coefficients(start: list[list[int]], end: list[list[int]]) -> list[float]:
    """The 8 coefficients PIL's PERSPECTIVE transform takes to map output points `end` back to input points `start`
    (torchvision's `_get_perspective_coeffs`: a least-squares solve of the 8 equations)."""
    a = np.zeros((8, 8))
    for i, ((x, y), (u, v)) in enumerate(zip(end, start)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
    b = np.array(start, dtype=np.float64).reshape(8)
    return np.linalg.lstsq(a, b, rcond=None)[0].tolist()


def preserving_augmentation(image: Image.Image, rng: random.Random) -> Image.Image:
    """One of the official information-preserving transforms, chosen uniformly (vbdi/cppo@cb1da3e,
    `verl/recipe/cppo/cppo_dataset.py`, `sem_preserving_transforms`): ColorJitter(brightness (0.2, 1.3), contrast
    (0.2, 1.8), saturation (0.2, 1.8)) in a random order; RandomPerspective(0.2, p = 0.5) (bilinear, black fill);
    RandomRotation(10°) (nearest, black fill, same size). The size never changes."""
    image = image.convert("RGB")
    w, h = image.size
    choice = rng.randrange(3)
    if choice == 0:
        factors = {0: rng.uniform(0.2, 1.3), 1: rng.uniform(0.2, 1.8), 2: rng.uniform(0.2, 1.8)}
        enhancers = {0: ImageEnhance.Brightness, 1: ImageEnhance.Contrast, 2: ImageEnhance.Color}
        for i in rng.sample(range(3), 3):
            image = enhancers[i](image).enhance(factors[i])
        return image
    if choice == 1:
        if rng.random() >= 0.5:
            return image
        dw, dh = int(0.2 * (w // 2)), int(0.2 * (h // 2))
        end = [
            [rng.randint(0, dw), rng.randint(0, dh)],
            [rng.randint(w - dw - 1, w - 1), rng.randint(0, dh)],
            [rng.randint(w - dw - 1, w - 1), rng.randint(h - dh - 1, h - 1)],
            [rng.randint(0, dw), rng.randint(h - dh - 1, h - 1)],
        ]
        start = [[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]
        coeffs = _perspective_coefficients(start, end)
        return image.transform((w, h), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR, fillcolor=0)
    return image.rotate(rng.uniform(-10.0, 10.0), resample=Image.Resampling.NEAREST, expand=False, fillcolor=0)


def removing_augmentation(image: Image.Image, rng: random.Random) -> Image.Image:
    """One of the official information-removing transforms, chosen uniformly (`sem_changing_transforms` of the same
    file): RandomOcclusion(p = 1, 50 patches of uniform noise, each side 5-15 % of the image's) or RandomZoomCrop
    (a crop of 60-70 % of each side, resized back with bilinear filtering). The size never changes."""
    image = image.convert("RGB")
    w, h = image.size
    noise = np.random.default_rng(rng.getrandbits(63))
    if rng.randrange(2) == 0:
        image = image.copy()
        for _ in range(50):
            ow, oh = int(rng.uniform(0.05, 0.15) * w), int(rng.uniform(0.05, 0.15) * h)
            x, y = rng.randint(0, w - ow), rng.randint(0, h - oh)
            if ow and oh:  # an image under 20 px a side can draw an empty patch
                image.paste(Image.fromarray(np.uint8(noise.random((oh, ow, 3)) * 255)), (x, y))
        return image
    scale = rng.uniform(0.6, 0.7)
    cw, ch = int(w * scale), int(h * scale)
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class AugmentedImages:
    """Every image of a prompt passed through one of CPPO's augmentations (`preserving` or `removing`), drawn once
    per prompt (shared by its responses, as the official dataset draws them per item) from a generator seeded by
    (seed, prompt number, view index); the responses re-collated after the new images (same size, same prompt
    length)."""

    kind: str

    def __post_init__(self):
        if self.kind not in ("preserving", "removing"):
            raise ValueError(f"AugmentedImages kind={self.kind!r}: 'preserving' or 'removing'")

    def images(self, images: list[Image.Image], seed: int) -> list[Image.Image]:
        augment = preserving_augmentation if self.kind == "preserving" else removing_augmentation
        rng = random.Random(seed)
        return [augment(image, rng) for image in images]

    def inputs(self, ctx: MethodContext, mb: MicroBatch, index: int) -> ViewInputs:
        prompts = [
            dataclasses.replace(p, images=self.images(p.images, mix_seed(ctx.seed, uid, AUGMENT_SEED_SALT, index)))
            for p, uid in zip(mb.prompts, mb.uids)
        ]
        return _recollated(ctx, mb, prompts)


@dataclass(frozen=True)
class CPPO(Method):
    name = "cppo"

    cpl_coef: float = param(0.01, low=0.0, doc="loss + coef · agg over the perception tokens of the CPL")
    cpl_tau: float = param(0.1, low=0.0, low_open=True, doc="τ of softplus((k3(pos) − k3(neg)) / τ)")
    cpl_top_fraction: float = param(
        0.5, low=0.0, low_open=True, high=1.0, doc="share of each response's entropy-rising tokens kept"
    )
    cpl_perception_mask: bool = param(True, doc="false: every valid token is a perception token")
    cpl_advantage_gating: bool = param(True, doc="only responses with a positive advantage carry the CPL")

    def views(self):
        # negative first: the recipe's dependency S and its diagnostics read view 0, the image without its information
        return (AugmentedImages("removing"), AugmentedImages("preserving"))

    def scores(self, ctx, mb, clean, lp_old, altered):
        if not self.cpl_perception_mask:
            return {}
        d = ctx.in_root(view_divergences_in_root, clean["hidden"], altered[0]["hidden"], mb.mask)
        return {"entropy": d["entropy"], "entropy_alt": d["entropy_alt"]}

    def _selected(self, s) -> tuple[torch.Tensor, torch.Tensor]:
        """(perception tokens, those gated to positive advantages) of one micro-step, [b, L] bool each."""
        valid = s.batch.mask > 0
        if self.cpl_perception_mask:
            scores = s.no_grad.scores
            perception = cppo_perception_mask(
                scores["entropy"], scores["entropy_alt"], valid, fraction=self.cpl_top_fraction
            )
        else:
            perception = valid
        gated = perception & (s.batch.advantages > 0)[:, None] if self.cpl_advantage_gating else perception
        return perception, gated

    def shape(self, ctx, steps):
        """The policy term unchanged; the CPL's token weights turn the loss's aggregation over the valid tokens
        into the same aggregation over the selected ones: `token-mean` N_valid / N_selected over the global
        mini-batch (one all-reduce), `seq-mean-token-mean` n_i / n_selected,i, `seq-mean-token-sum` 1."""
        chosen = [[self._selected(s) for s in mini] for mini in steps]
        if ctx.aggregation == "token-mean":
            counts = torch.stack(
                [
                    torch.stack([torch.stack([s.batch.mask.sum(), g.sum()]) for s, (_, g) in zip(mini, sel)])
                    .double()
                    .sum(0)
                    for mini, sel in zip(steps, chosen)
                ]
            )
            ctx.all_reduce_(counts)
            scales = torch.where(counts[:, 1] > 0, counts[:, 0] / counts[:, 1], torch.zeros_like(counts[:, 0]))
            weights = [[g.float() * scale.float() for _, g in sel] for sel, scale in zip(chosen, scales)]
        elif ctx.aggregation == "seq-mean-token-mean":
            weights = [
                [g.float() * (s.batch.mask.sum(1) / g.sum(1).clamp(min=1))[:, None] for s, (_, g) in zip(mini, sel)]
                for mini, sel in zip(steps, chosen)
            ]
        else:
            weights = [[g.float() for _, g in sel] for sel in chosen]
        return [
            [
                Shaping(s.batch.advantages, None, {"cpl_weights": w, "perception": p.float(), "selected": g.float()})
                for s, (p, g), w in zip(mini, sel, mini_weights)
            ]
            for mini, sel, mini_weights in zip(steps, chosen, weights)
        ]

    def aux_terms(self, ctx, step, new):
        negative, positive = step.no_grad.lp_views
        cpl = cppo_contrastive_loss(new["lp"], positive, negative, tau=self.cpl_tau)
        return {"cpl": (float(self.cpl_coef), cpl * step.shaped.outputs["cpl_weights"].to(cpl.dtype))}

    def metrics(self, ctx, steps):
        """The share of the valid tokens that are perception tokens, and of those the CPL is applied to."""
        valid = [s.batch.mask > 0 for s in steps]
        perception = ctx.gathered([s.shaped.outputs["perception"][v] for s, v in zip(steps, valid)])
        selected = ctx.gathered([s.shaped.outputs["selected"][v] for s, v in zip(steps, valid)])
        n = perception.numel()
        return {
            "cppo/perception_fraction": float(perception.mean()) if n else float("nan"),
            "cppo/selected_fraction": float(selected.mean()) if n else float("nan"),
        }
