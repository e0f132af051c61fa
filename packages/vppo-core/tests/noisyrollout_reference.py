"""Transcription of NoisyRollout's noise arithmetic, for the side-by-side test ``test_noisyrollout_reference.py``.

Our own code, not a copy: what the public code computes, in its operation order and dtypes. Read through the
public-code index (``read_file``):

- Official code ``NUS-TRAIL/NoisyRollout``, ``verl/utils/image_aug.py`` at commit
  ``09347ddd88135b83a336a204ecf6353121bbee79``: ``ImageAugmenter.augment`` (``decay_mode == "sigmoid"``),
  ``apply_gaussian_noise``, ``_add_gaussian_noise``. Called from ``verl/trainer/ray_trainer.py``
  (``RayPPOTrainer.fit``, commit ``0f914f2f874f2096e38c89db46d08687ddf5b580``) as
  ``augment_batch(batch, config.worker.actor, self.global_step, self.training_steps)``, once per prompt per step,
  before generation; the noised and the clean prompts are interleaved and each sampled ``rollout.n`` times.
- The fork ``zsxm1998/awesome-perception-aware-rlvr``, ``verl/utils/perturbations/pixel.py`` at commit
  ``5d666a136cba650c7869eadef519938182da8b2f``: ``compute_noise_schedule`` with ``noise_t_mid`` (the schedule
  only; its noise draws come from numpy).

``torchvision``'s ``ToTensor`` and ``ToPILImage`` are written as the tensor operations they perform on an RGB uint8
image: ``permute(2, 0, 1).float().div(255)`` and ``mul(255).byte()`` (truncation), then back to ``[H, W, C]``.
"""

from __future__ import annotations

import math

import torch


def official_noise_step(step: int, total_steps: int, *, gaussian_noise_step: float, decay_coef: float,
                        decay_sig_mid_step: float) -> int:  # fmt: skip
    """image_aug.py@09347dd, ``augment`` (sigmoid decay) then ``apply_gaussian_noise``'s ``int(noise_step·decay)``."""
    norm_step = step / total_steps
    x = decay_coef * (norm_step - decay_sig_mid_step / total_steps)
    decay = 1.0 - (1 / (1 + math.exp(-x)))
    return int(gaussian_noise_step * decay)


def official_noised_image(image_hwc_uint8: torch.Tensor, noise_step: int, noise: torch.Tensor) -> torch.Tensor:
    """image_aug.py@09347dd, ``apply_gaussian_noise`` / ``_add_gaussian_noise``, with ``torch.randn_like(x_0)``
    given as ``noise`` ([C, H, W] float32)."""
    image_tensor = image_hwc_uint8.permute(2, 0, 1).contiguous().float().div(255)  # ToTensor
    num_steps = 1000
    betas = torch.linspace(-6, 6, num_steps)
    betas = torch.sigmoid(betas) * (0.5e-2 - 1e-5) + 1e-5
    alphas = 1 - betas
    alphas_prod = torch.cumprod(alphas, dim=0)
    alphas_bar_sqrt = torch.sqrt(alphas_prod)
    one_minus_alphas_bar_sqrt = torch.sqrt(1 - alphas_prod)
    noisy_tensor = alphas_bar_sqrt[noise_step] * image_tensor + one_minus_alphas_bar_sqrt[noise_step] * noise
    noisy_tensor = torch.clamp(noisy_tensor, 0.0, 1.0)
    return noisy_tensor.mul(255).byte().permute(1, 2, 0)  # ToPILImage, as an [H, W, C] array


def fork_noise_t(global_step: int, total_training_steps: int, *, noise_t_init: float, noise_gamma: float,
                 noise_t_max: float, noise_t_mid: float) -> int:  # fmt: skip
    """pixel.py@5d666a1, ``compute_noise_schedule`` with ``noise_t_mid``, then ``int(noise_t)`` as
    ``vp_diffusion_noise_fraction`` and the rollout transform's logged ``noise_t`` take it."""
    if total_training_steps <= 0:
        progress = 0.0
    else:
        progress = min(max(float(global_step), 0.0), float(total_training_steps)) / float(max(total_training_steps, 1))
    noise_t = noise_t_init * (1.0 - 1.0 / (1.0 + math.exp(-noise_gamma * (progress - noise_t_mid))))
    noise_t = min(max(float(noise_t), 0.0), float(noise_t_max))
    return min(max(int(noise_t), 0), 999)
