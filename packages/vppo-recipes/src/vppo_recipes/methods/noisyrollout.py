"""NoisyRollout (ALGORITHMS.md §9.10): the last share of every group is sampled on a noised copy of the prompt's
images (a step of a variance-preserving diffusion, annealed from strong to weak over the run); all G responses form
one GRPO group and every pass after sampling (lp_old, the update) sees the clean images. Plus the published
entropy bonus."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vppo_core.perturb import noisyrollout_noise_step, vp_diffusion_image
from vppo_recipes.methods.base import Method, param
from vppo_recipes.seeding import mix_seed

# Seeds the noise of image k of prompt uid: mix_seed(seed, uid, NOISE_SALT, k); uid numbers the run's usable
# examples, so the draw depends neither on the step's ranks nor on the batching (and a prompt drawn again in a
# later epoch gets a new uid, so new noise).
NOISE_SALT = 0x9015E


@dataclass(frozen=True)
class NoisyRollout(Method):
    name = "noisyrollout"
    update_entropy = True

    noisy_fraction: float = param(
        0.5, low=0.0, low_open=True, high=1.0, doc="share of each group sampled on the noised images (its last ones)"
    )
    noise_t_init: float = param(500.0, low=0.0, high=999.0, doc="α₀: the diffusion step at the start")
    noise_gamma: float = param(30.0, low=0.0, doc="λ: the sharpness of the sigmoid anneal")
    noise_mid_fraction: float = param(
        2.0 / 3.0, low=0.0, high=1.0, doc="γ / t_max: where the anneal is half way, a fraction of training.max_steps"
    )
    noisyrollout_entropy_bonus: float = param(0.001, low=0.0, doc="loss − c·mean analytic entropy (with gradient)")

    def noisy_count(self, group_size: int) -> int:
        return round(group_size * self.noisy_fraction)

    def noise_step(self, step: int, max_steps: int) -> int:
        """The diffusion step of RL step `step` (0-based, as MethodContext.step): Eq. 3 at step + 1 of max_steps."""
        return noisyrollout_noise_step(
            step + 1, max(max_steps, 1), t_init=self.noise_t_init, gamma=self.noise_gamma,
            mid_fraction=self.noise_mid_fraction,
        )  # fmt: skip

    def config_errors(self, cfg):
        g = int(cfg["rollout"]["group_size"])
        k = g * self.noisy_fraction
        if abs(k - round(k)) > 1e-9 or round(k) < 1:
            return [
                f"algorithm.noisy_fraction={self.noisy_fraction} of rollout.group_size={g} is {k:g} responses: "
                "choose them so that the noised share is a whole number >= 1 (the published runs: half of an even G)"
            ]
        return []

    def rollout_images(self, ctx, uid, images, group_size):
        if not images:  # nothing to noise: every response on the prompt
            return None
        t = self.noise_step(ctx.step, ctx.max_steps)
        noised = []
        for k, image in enumerate(images):
            gen = torch.Generator().manual_seed(mix_seed(ctx.seed, uid, NOISE_SALT, k))
            pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
            noised.append(Image.fromarray(vp_diffusion_image(pixels, t, generator=gen).numpy()))
        n = self.noisy_count(group_size)
        return [None] * (group_size - n) + [noised] * n  # one noised copy per prompt, shared by its noised slots

    def aux_terms(self, ctx, step, new):
        return {"entropy_bonus": (-float(self.noisyrollout_entropy_bonus), new["entropy"])}

    def metrics(self, ctx, steps):
        t = self.noise_step(ctx.step, ctx.max_steps)
        betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
        alpha_bar = float(torch.cumprod(1 - betas, dim=0)[t])
        return {f"{self.name}/noise_step": float(t), f"{self.name}/noise_std": math.sqrt(1.0 - alpha_bar)}
