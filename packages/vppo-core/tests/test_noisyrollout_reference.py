"""NoisyRollout's noise (ALGORITHMS.md §9.10) side by side with a transcription of the public code
(`noisyrollout_reference.py`), on >= 200 random inputs each, plus hand-worked cases of the paper's Eq. 3."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

from vppo_core import noisyrollout_noise_step, vp_diffusion_image

sys.path.insert(0, str(Path(__file__).parent))
from noisyrollout_reference import fork_noise_t, official_noise_step, official_noised_image


def test_the_annealed_step_equals_the_official_code_and_the_fork_at_every_step():
    rng = random.Random(0)
    for _ in range(300):
        total = rng.randint(1, 400)
        t_init = rng.choice([500, 450, rng.uniform(0, 999)])
        gamma = rng.choice([30, 60, rng.uniform(0, 200)])
        mid_step = rng.choice([40, rng.uniform(0, total)])
        for step in range(1, total + 1):
            ours = noisyrollout_noise_step(step, total, t_init=t_init, gamma=gamma, mid_fraction=mid_step / total)
            try:
                official = official_noise_step(
                    step, total, gaussian_noise_step=t_init, decay_coef=gamma, decay_sig_mid_step=mid_step
                )
            except OverflowError:  # exp(−x) overflows far before the midpoint; vppo's decay is 1 there
                official = int(t_init)
            if official == int(t_init) and gamma * (step / total - mid_step / total) < -700:
                continue  # the fork overflows there too
            fork = fork_noise_t(step, total, noise_t_init=t_init, noise_gamma=gamma, noise_t_max=1000,
                                noise_t_mid=mid_step / total)  # fmt: skip
            assert ours == official == fork, (step, total, t_init, gamma, mid_step)


def test_hand_worked_steps_of_the_published_runs():
    # Geometry3K 7B: α₀ 500, λ 30, γ 40 of 60 steps. At step 40 the sigmoid is at 1/2: int(250.0) = 250.
    assert noisyrollout_noise_step(40, 60, t_init=500, gamma=30, mid_fraction=40 / 60) == 250
    # step 1: x = 30·(1/60 − 2/3) = −19.5, decay = 1 − 1/(1 + e^19.5) = 1 − 3.4e-9: int(499.9999983) = 499
    assert noisyrollout_noise_step(1, 60, t_init=500, gamma=30, mid_fraction=40 / 60) == 499
    # step 60: x = 30/3 = 10, decay = 1/(1 + e^10) = 4.54e-5: int(0.0227) = 0
    assert noisyrollout_noise_step(60, 60, t_init=500, gamma=30, mid_fraction=40 / 60) == 0
    # step 45: x = 30·(45 − 40)/60 = 2.5, decay = 1/(1 + e^2.5) = 0.075858: int(37.93) = 37
    assert noisyrollout_noise_step(45, 60, t_init=500, gamma=30, mid_fraction=40 / 60) == 37
    # K12 7B: α₀ 450, λ 60, γ 40 of 120: at step 50, x = 60·10/120 = 5, decay = 1/(1 + e^5) = 0.0066929: int(3.01) = 3
    assert noisyrollout_noise_step(50, 120, t_init=450, gamma=60, mid_fraction=40 / 120) == 3
    # far before the midpoint exp(−x) would overflow: the decay is 1
    assert noisyrollout_noise_step(1, 10, t_init=500, gamma=1e6, mid_fraction=1.0) == 500


def test_the_noised_image_equals_the_official_code_on_the_same_draws():
    rng = random.Random(1)
    for case in range(200):
        h, w = rng.randint(1, 40), rng.randint(1, 40)
        g = torch.Generator().manual_seed(case)
        image = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
        t = rng.choice([0, 1, 37, 250, 499, 999, rng.randint(0, 999)])
        seed = rng.randint(0, 2**31 - 1)
        ours = vp_diffusion_image(image, t, generator=torch.Generator().manual_seed(seed))
        noise = torch.randn((3, h, w), generator=torch.Generator().manual_seed(seed))  # randn_like(ToTensor(image))
        assert ours.dtype == torch.uint8 and ours.shape == image.shape
        assert torch.equal(ours, official_noised_image(image, t, noise)), (case, t)


def test_hand_worked_pixels():
    # β_0 = sigmoid(−6)·(5e-3 − 1e-5) + 1e-5 = 0.0024726·0.00499 + 1e-5 = 2.2338e-5, so at t = 0
    # sqrt(ᾱ_0) = 0.99998883 and sqrt(1 − ᾱ_0) = 0.0047263. A pixel of 128 with ε ≈ 0 (−0.01 < ε < 0) becomes
    # 255·(0.99998883·128/255 + 0.0047263·ε) in (127.986, 127.9986), truncated to 127: the official ToPILImage
    # lowers a clean pixel by one level even at the weakest noise.
    image = torch.full((64, 64, 3), 128, dtype=torch.uint8)
    out = vp_diffusion_image(image, 0, generator=torch.Generator().manual_seed(0))
    eps = torch.randn((3, 64, 64), generator=torch.Generator().manual_seed(0)).permute(1, 2, 0)
    small = (eps > -0.01) & (eps < 0)
    assert int(small.sum()) > 0 and bool((out[small] == 127).all())
    # with ε ≈ +1 (0.99 < ε < 1.01): 127.9986 + 255·0.0047263·1 = 129.204 ± 0.012: 129
    near_one = (eps - 1).abs() < 0.01
    assert int(near_one.sum()) > 0 and bool((out[near_one] == 129).all())
    # clipping: at t = 999 black stays black wherever ε ≤ 0
    black = vp_diffusion_image(torch.zeros(8, 8, 3, dtype=torch.uint8), 999, generator=torch.Generator().manual_seed(3))
    eps = torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(3)).permute(1, 2, 0)
    assert bool((black[eps <= 0] == 0).all()) and bool((black[eps > 0] > 0).any())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"t_init": -1.0}, "t_init"),
        ({"t_init": 1000.0}, "t_init"),
        ({"gamma": float("nan")}, "gamma"),
        ({"mid_fraction": -0.1}, "mid_fraction"),
    ],
)
def test_the_schedule_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        noisyrollout_noise_step(1, 10, **kwargs)


def test_the_image_function_refuses_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        vp_diffusion_image(torch.zeros(2, 2, 3), 1)
    with pytest.raises(ValueError, match="t must"):
        vp_diffusion_image(torch.zeros(2, 2, 3, dtype=torch.uint8), 1000)
