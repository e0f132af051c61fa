"""VGPO (ALGORITHMS.md §9.9): each response token's visual focus (the cosine of its last hidden state to the mean
hidden state of the image tokens), compensated late in the response, re-weights the advantage within the response
(ψ_t) and across the responses to the same prompt (α_i): token advantage A_i·α_i·ψ_t.

The focus needs the last hidden state at the prompt's image tokens and at the response tokens' own positions: the
clean no-grad pass (the one that gives lp_old) returns the whole ``[b, P + L, H]`` last hidden state
(`clean_full_hidden`), kept until the ``[b, L]`` focus is computed from it. No extra forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vppo_core.shaping import vgpo_compensated_scores, vgpo_response_factors, vgpo_token_factors, vgpo_visual_focus
from vppo_recipes.methods.base import Method, param, weight_stats
from vppo_recipes.methods.records import Shaping


@dataclass(frozen=True)
class VGPO(Method):
    name = "vgpo"
    clean_full_hidden = True

    vgpo_compensation_strength: float = param(0.3, low=0.0, doc="β of the compensation 1 + G·β·t/(T − 1); 0: none")
    vgpo_gate_start: float = param(
        0.5, low=0.0, high=1.0, high_open=True,
        doc="where the gate's tail starts, a fraction of the response (the official start ratio; the paper's γ = 1 − it)",
    )  # fmt: skip
    vgpo_gate_top: float = param(0.2, low=0.0, low_open=True, high=1.0, doc="κ: the tail's top fraction gated")
    vgpo_gated: bool = param(True, doc="false: compensate every token, not only the gated ones")
    vgpo_token_level: bool = param(True, doc="ψ_t within each response (with the compensation)")
    vgpo_response_level: bool = param(True, doc="α_i across the responses to the same prompt")
    vgpo_score_offset: str = param(
        "official", choices=("official", "paper"),
        doc="official: ρ = S − min(0, the rollout batch's smallest focus); paper: (S + 1)/2 (Eq. 4)",
    )  # fmt: skip
    vgpo_trajectory_score: str = param(
        "compensated", choices=("compensated", "raw"), doc="ϕ_i = Σ ŵ (official) or Σ w before the min-max (Eq. 9)"
    )

    def scores(self, ctx, mb, clean, lp_old, altered):
        positions = slice(mb.prompt_length, mb.prompt_length + mb.responses.shape[1])  # the tokens' own positions
        visual = mb.inputs["input_ids"] == ctx.image_token_id
        return {"focus": vgpo_visual_focus(clean["full_hidden"], visual, positions)}

    def _offset(self, ctx, flat) -> torch.Tensor | float:
        """m: min(0, the smallest focus of the rollout batch, every rank), kept on the device; −1 for the paper."""
        if self.vgpo_score_offset == "paper":
            return -1.0
        inf = torch.full((1,), math.inf, device=ctx.device)
        local = [torch.where(s.batch.mask > 0, s.no_grad.scores["focus"], inf).amin().reshape(1) for s in flat]
        return ctx.gathered([inf, *local]).min().clamp(max=0.0)

    def _groups(self, ctx, flat) -> torch.Tensor:
        """Each row's group over all ranks: its prompt's uid (ranks own whole groups, and uids are unique in the
        run), so neither the order of the rows (micro-batches by token budget sort them by length) nor the rank
        matters. Host lists only (no device sync)."""
        return torch.tensor([u for s in flat for u in s.batch.uids], dtype=torch.long, device=ctx.device)

    def shape(self, ctx, steps):
        flat = [s for mini in steps for s in mini]
        offset = self._offset(ctx, flat)
        parts = []
        for s in flat:
            focus, mask = s.no_grad.scores["focus"], s.batch.mask
            if self.vgpo_token_level:
                w, gate = vgpo_compensated_scores(
                    focus, mask, offset=offset, strength=self.vgpo_compensation_strength,
                    gate_start=self.vgpo_gate_start, gate_top=self.vgpo_gate_top, gated=self.vgpo_gated,
                )  # fmt: skip
                psi, w_hat = vgpo_token_factors(w, mask)
            else:  # the released code's inter-only path: the min-max of the uncompensated scores
                w, _ = vgpo_compensated_scores(focus, mask, offset=offset, strength=0.0, gated=False)
                gate = torch.zeros_like(mask, dtype=torch.bool)
                psi, w_hat = torch.ones_like(w), vgpo_token_factors(w, mask)[1]
            phi = (w_hat if self.vgpo_trajectory_score == "compensated" else w).sum(dim=1)
            parts.append((psi, gate, phi))
        phi = torch.cat([p[2] for p in parts]) if parts else torch.zeros(0, device=ctx.device)
        if self.vgpo_response_level:
            groups = self._groups(ctx, flat)
            all_phi, start = ctx.gathered_with_offset(phi)
            all_groups = ctx.gathered_with_offset(groups)[0]
            alpha = vgpo_response_factors(all_phi, all_groups)[start : start + phi.numel()]
        else:
            alpha = torch.ones_like(phi)
        out = []
        for s, (psi, gate, _), al in zip(flat, parts, alpha.split([s.batch.mask.shape[0] for s in flat])):
            mask = s.batch.mask
            weights = (al[:, None] * psi * mask).to(s.no_grad.lp_old.dtype)
            out.append(
                Shaping(s.batch.advantages, weights, {"weights": weights, "alpha": al, "psi": psi, "gate": gate})
            )
        it = iter(out)
        return [[next(it) for _ in mini] for mini in steps]

    def metrics(self, ctx, steps):
        valid = [s.batch.mask > 0 for s in steps]
        psi = ctx.gathered([s.shaped.outputs["psi"][v] for s, v in zip(steps, valid)])
        gate = ctx.gathered([s.shaped.outputs["gate"][v].float() for s, v in zip(steps, valid)])
        alpha = ctx.gathered([s.shaped.outputs["alpha"] for s in steps])
        focus = ctx.gathered([s.no_grad.scores["focus"][v] for s, v in zip(steps, valid)])

        def stat(x, fn):
            return float(fn(x)) if x.numel() else math.nan

        return {
            **weight_stats(ctx, self.name, steps, "weights"),
            "vgpo/token_factor_min": stat(psi, torch.min),
            "vgpo/token_factor_max": stat(psi, torch.max),
            "vgpo/response_factor_min": stat(alpha, torch.min),
            "vgpo/response_factor_max": stat(alpha, torch.max),
            "vgpo/gate_fraction": stat(gate, torch.mean),
            "vgpo/focus_mean": stat(focus, torch.mean),
            "vgpo/focus_min": stat(focus, torch.min),
        }
