"""CPPO (ALGORITHMS.md §9.11) side by side with the transcription of its official code (`cppo_reference.py`), on
≥ 200 seeded random inputs each, plus hand-worked cases from the paper's equations.

Deliberate differences (each a row of the README's table), and what the tests show about them:

* padding: the official mask does not read the response mask; it relies on the remove-padding forward's entropies
  being exactly 0 on padding (so Δ = 0 there). vppo takes the mask. Equal once the padding's entropies are 0; with
  any values on padding, vppo never selects it.
* gradient: the official views are forwards of the current policy with gradient; vppo's are scored before the update
  without gradient. The value and the gradient with respect to the clean log-probs are the same; vppo gives the
  views' log-probs no gradient.
* aggregation: the official term is `agg_loss(cpl, mask)` per micro-batch; vppo's is the loss's aggregation with
  the same global counts as the policy term, through token weights (`methods/cppo.py`). On one micro-batch, with
  every row non-empty, equal to the official value (the official token-mean adds 1e-8 to the count).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import cppo_reference as ref

from vppo_core import cppo_contrastive_loss, cppo_perception_mask, policy_loss

N_CASES = 250


def _entropies(g: torch.Generator, B: int, L: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random clean / altered entropies with ties, exact zeros of Δ and padding (zeros on padding, as the official
    remove-padding forward has)."""
    levels = torch.randint(1, 6, (1,), generator=g).item()  # few levels: many ties
    H = torch.randint(0, levels + 1, (B, L), generator=g).float() * 0.5
    H_alt = torch.randint(0, levels + 1, (B, L), generator=g).float() * 0.5
    if torch.rand((), generator=g) < 0.5:  # continuous values instead
        H = torch.rand(B, L, generator=g) * 4
        H_alt = H + torch.randn(B, L, generator=g)
        H_alt = H_alt.clamp(min=0)
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None] < lengths[:, None]
    H, H_alt = H * mask, H_alt * mask
    return H, H_alt, mask


def test_the_perception_mask_equals_the_official_code_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    selected = 0
    for case in range(N_CASES):
        B, L = torch.randint(1, 6, (2,), generator=g).tolist()
        L = L * 3
        H, H_alt, mask = _entropies(g, B, L)
        fraction = [0.5, 0.3, 1.0, 0.25, 0.7][case % 5]
        want = ref.vision_mask(H, H_alt, fraction).bool()
        got = cppo_perception_mask(H, H_alt, mask, fraction=fraction)
        assert torch.equal(got, want), case
        selected += int(got.sum())
        # with arbitrary values on padding the official mask may pick padding; vppo never does, and is unchanged
        noisy = torch.where(mask, H_alt, torch.rand(B, L, generator=g) * 9)
        assert torch.equal(cppo_perception_mask(H, noisy, mask, fraction=fraction), got), case
    assert selected > 100  # the cases are not all empty


def test_the_contrastive_loss_equals_the_official_code_value_and_clean_gradient():
    g = torch.Generator().manual_seed(1)
    for case in range(N_CASES):
        B, L = torch.randint(1, 5, (2,), generator=g).tolist()
        spread = [0.5, 3.0, 30.0][case % 3]  # the last reaches the ±20 and 10 clamps
        lp = (-torch.rand(B, L, generator=g) * spread).requires_grad_()
        pos = -torch.rand(B, L, generator=g) * spread
        neg = -torch.rand(B, L, generator=g) * spread
        tau = [0.1, 0.5, 1.0][case % 3]
        got = cppo_contrastive_loss(lp, pos, neg, tau=tau)
        (g_got,) = torch.autograd.grad(got.sum(), lp)
        lp2, pos2, neg2 = (
            lp.detach().clone().requires_grad_(),
            pos.clone().requires_grad_(),
            neg.clone().requires_grad_(),
        )
        _, want = ref.cpl_loss(lp2, pos2, neg2, torch.ones(B, L), cpl_tau=tau, loss_agg_mode="token-mean")
        g_want, g_pos, g_neg = torch.autograd.grad(want.sum(), (lp2, pos2, neg2))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-6)
        # the official views carry gradient (they are forwards of the current policy); vppo's are constants
        assert spread == 30.0 or g_pos.abs().sum() > 0 or g_neg.abs().sum() > 0
        assert not cppo_contrastive_loss(lp.detach(), pos2, neg2, tau=tau).requires_grad


def _term_weights(selected: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """vppo's token weights of the CPL term for one micro-batch that is the whole mini-batch (methods/cppo.py):
    the loss's aggregation over all valid tokens becomes the aggregation over the selected ones."""
    sel = selected.float()
    if aggregation == "token-mean":
        n = sel.sum()
        return sel * (mask.sum() / n if n > 0 else 0.0)
    if aggregation == "seq-mean-token-mean":
        return sel * (mask.sum(1, keepdim=True) / sel.sum(1, keepdim=True).clamp(min=1))
    return sel


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_the_aggregated_term_equals_the_official_one_on_one_micro_batch(aggregation):
    g = torch.Generator().manual_seed(2)
    for case in range(N_CASES):
        B, L = torch.randint(1, 6, (2,), generator=g).tolist()
        L = L * 2
        H, H_alt, _ = _entropies(g, B, L)
        lengths = torch.randint(1, L + 1, (B,), generator=g)  # every row non-empty (see the docstring)
        mask = torch.arange(L)[None] < lengths[:, None]
        H, H_alt = H * mask, H_alt * mask
        adv = torch.randn(B, generator=g)
        lp = -torch.rand(B, L, generator=g) * 3
        pos, neg = -torch.rand(B, L, generator=g) * 3, -torch.rand(B, L, generator=g) * 3
        official_mask = ref.advantage_gate(ref.vision_mask(H, H_alt, 0.5), adv[:, None].expand(B, L))
        want, _ = ref.cpl_loss(lp, pos, neg, official_mask, cpl_tau=0.1, loss_agg_mode=aggregation)
        selected = cppo_perception_mask(H, H_alt, mask, fraction=0.5) & (adv > 0)[:, None]
        term = cppo_contrastive_loss(lp, pos, neg, tau=0.1) * _term_weights(selected, mask, aggregation)
        # A = 0 and lp_new = lp_old: the policy term is 0, the loss is coef · agg(term)
        got, _ = policy_loss(lp, lp, torch.zeros(B), mask, aggregation=aggregation, aux_terms={"cpl": (1.0, term)})
        assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-6), case


def test_hand_worked_perception_mask():
    # H = 1 everywhere; H_alt = 2, 1.5, 0.5, 3: Δ = 1, 0.5, -0.5, 2; r = 1/2, 1/3, 0, 2/3; n⁺ = 3
    H = torch.ones(1, 5)
    H_alt = torch.tensor([[2.0, 1.5, 0.5, 3.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # fraction 0.5: k = max(1, floor(1.5)) = 1 -> only the largest r (token 3); the padding (Δ = 8) never
    assert cppo_perception_mask(H, H_alt, mask, fraction=0.5).tolist() == [[False, False, False, True, False]]
    # fraction 1: k = 3 -> every token with Δ > 0
    assert cppo_perception_mask(H, H_alt, mask, fraction=1.0).tolist() == [[True, True, False, True, False]]
    # fraction 0.7: k = floor(2.1) = 2 -> r ≥ 1/2: tokens 0 and 3
    assert cppo_perception_mask(H, H_alt, mask, fraction=0.7).tolist() == [[True, False, False, True, False]]
    # ties at the threshold are all kept: r = 1/2, 1/2, 1/2 with k = 1
    tied = cppo_perception_mask(torch.ones(1, 3), torch.full((1, 3), 2.0), torch.ones(1, 3), fraction=0.5)
    assert tied.tolist() == [[True, True, True]]
    # no token gains entropy: nothing
    assert not cppo_perception_mask(torch.ones(1, 3), torch.ones(1, 3), torch.ones(1, 3)).any()


def test_hand_worked_contrastive_loss():
    # p = 1/2 under the policy and the positive view, 1/4 under the negative view:
    # k3(pos) = 0; x = log(1/4) − log(1/2) = −log 2, k3(neg) = 1/2 + log 2 − 1; L = softplus(−k3(neg)/τ)
    lp, pos, neg = (torch.tensor([[math.log(p)]]) for p in (0.5, 0.5, 0.25))
    k_neg = 0.5 + math.log(2) - 1
    for tau in (0.1, 1.0):
        want = math.log1p(math.exp(-k_neg / tau))
        assert float(cppo_contrastive_loss(lp, pos, neg, tau=tau)) == pytest.approx(want, rel=1e-6)
    # the views swapped: softplus(+k/τ) = k/τ + softplus(−k/τ)
    swapped = float(cppo_contrastive_loss(lp, neg, pos, tau=0.1))
    assert swapped == pytest.approx(k_neg / 0.1 + math.log1p(math.exp(-k_neg / 0.1)), rel=1e-6)
    # equal views: softplus(0) = log 2, and the gradient is 0
    lp = torch.tensor([[-1.0]], requires_grad=True)
    out = cppo_contrastive_loss(lp, torch.tensor([[-2.0]]), torch.tensor([[-2.0]]), tau=0.1)
    out.sum().backward()
    assert float(out) == pytest.approx(math.log(2)) and float(lp.grad) == 0.0


def test_bad_arguments_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="fraction"):
        cppo_perception_mask(x, x, torch.ones(2, 3), fraction=0.0)
    with pytest.raises(ValueError, match="entropy_alt"):
        cppo_perception_mask(x, torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="tau"):
        cppo_contrastive_loss(x, x, x, tau=0.0)
    with pytest.raises(ValueError, match="lp_neg"):
        cppo_contrastive_loss(x, x, torch.zeros(3, 3))
