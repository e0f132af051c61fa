"""Token visual dependency S[B, L] and trajectory dependency S̄[B] (ALGORITHMS.md §1).

``S_t`` measures how much the image changes the policy's next-token distribution at response token t:

- :func:`token_dependency` — the sampled-token "k3" estimator both papers train with (needs two log-prob vectors);
- :func:`exact_token_dependency` / :func:`exact_token_dependency_from_hidden` — the paper definition
  ``KL(π(·|image) ‖ π(·|image'))`` over the whole vocabulary, chunked over positions so neither pass's float32
  ``[B, L, V]`` log-softmax is ever held;
- :func:`trajectory_dependency` — the masked mean of S per response.

S is a weight for the loss (TAS, TGF, PGPO), never a loss itself: every function here returns a tensor without
gradient (computed under ``torch.no_grad``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vppo_core.chunking import (
    Chunker,
    as_rows,
    check_temperature,
    chunk_width,
    compute_dtype,
    log_softmax_into,
    tempered,
)
from vppo_core.shaping import minmax_by_response
from vppo_core.validation import check_finite_where, check_mask

__all__ = [
    "abs_log_ratio",
    "exact_token_dependency",
    "exact_token_dependency_from_hidden",
    "token_dependency",
    "top_p_entropy_from_hidden",
    "trajectory_dependency",
    "vepo_token_scores",
    "view_divergences_from_hidden",
]

_LOG_2 = math.log(2.0)
_LOG_HALF = -_LOG_2
# view_divergences_from_hidden: below this JSD the log-ratio form is the accurate one (see there).
_JSD_RATIO_FORM_BELOW = 1e-4
# Clamps of the sampled-token estimator (ALGORITHMS.md §1, as in the VPPO reference code).
LOG_RATIO_CLAMP = 20.0
DEPENDENCY_MAX = 10.0


def _check_logprob_pair(lp: torch.Tensor, lp_alt: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """Check two [B, L] log-prob tensors of the same tokens and their mask; return (valid [B, L] bool, the float
    dtype to compute in)."""
    for name, t in (("lp", lp), ("lp_alt", lp_alt)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor [B, L], got {getattr(t, 'shape', type(t))}")
    if lp_alt.shape != lp.shape:
        raise ValueError(f"lp_alt has shape {tuple(lp_alt.shape)}, expected lp's shape {tuple(lp.shape)}")
    valid = check_mask(mask, tuple(lp.shape))
    check_finite_where(lp, valid, "lp")
    check_finite_where(lp_alt, valid, "lp_alt")
    return valid, compute_dtype(torch.promote_types(lp.dtype, lp_alt.dtype))


@torch.no_grad()
def token_dependency(lp: torch.Tensor, lp_alt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sampled-token estimator of KL(π(·|image) ‖ π(·|image')) (ALGORITHMS.md §1, "k3").

    ``d = clamp(lp_alt - lp, -20, 20)``, ``S = clamp(exp(d) - d - 1, 0, 10)``; 0 where ``mask`` is 0.

    Args:
        lp: [B, L] float, log-prob of each sampled token with the original image.
        lp_alt: [B, L] float, log-prob of the *same* token with the altered image (or the text-only pass).
        mask: [B, L] bool or 0/1, 1 on real response tokens. Masked positions may hold any value, even NaN.

    Returns:
        S: [B, L] in lp's dtype (at least float32), >= 0, no gradient.
    """
    valid, dtype = _check_logprob_pair(lp, lp_alt, mask)
    d = (lp_alt.to(dtype) - lp.to(dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    s = (torch.exp(d) - d - 1.0).clamp(0.0, DEPENDENCY_MAX)
    return torch.where(valid, s, torch.zeros((), dtype=dtype, device=s.device))


@torch.no_grad()
def trajectory_dependency(S: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """S̄_i = Σ_t S[i, t]·mask[i, t] / max(1, Σ_t mask[i, t]) (ALGORITHMS.md §1).

    Args:
        S: [B, L] float token dependency; masked positions are ignored (may hold anything).
        mask: [B, L] bool or 0/1.

    Returns:
        [B] float; 0 for an empty response (all-zero mask row).
    """
    if not isinstance(S, torch.Tensor) or S.ndim != 2 or not S.is_floating_point():
        raise ValueError(f"S must be a floating tensor [B, L], got {getattr(S, 'shape', type(S))}")
    valid = check_mask(mask, tuple(S.shape))
    check_finite_where(S, valid, "S")
    total = torch.where(valid, S, torch.zeros((), dtype=S.dtype, device=S.device)).sum(-1)
    return total / valid.sum(-1).clamp_min(1).to(S.dtype)


def _exact_kl(logits_of, rows_shape, out_shape, vocab, mask, chunk_size, device, dtype, name) -> torch.Tensor:
    """Σ_v p_v (log p_v − log q_v) chunk by chunk, in three reusable float [b, k, V] buffers.

    logits_of(side, sl, buf): the tempered float logits of positions ``sl`` for side 0 (original image) or 1
    (altered image), as a [b, k, V] tensor (written into ``buf`` when a conversion is needed).
    """
    valid = check_mask(mask, out_shape)
    b, n = rows_shape
    ch = Chunker(b, n, vocab, chunk_width(chunk_size, b, vocab), dtype, device, n_buffers=3)
    out = torch.empty(b, n, dtype=dtype, device=device)
    for sl in ch.slices():
        buf_z, buf_la, buf_lb = ch.views(sl)
        la = log_softmax_into(logits_of(0, sl, buf_z), buf_la)
        lb = log_softmax_into(logits_of(1, sl, buf_z), buf_lb)
        torch.sub(la, lb, out=lb)  # log p − log q
        # No nan_to_num: a NaN/±inf logit leaves a NaN/inf in its row, which the check below reports.
        out[:, sl] = torch.exp(la, out=buf_z).mul_(lb).sum(-1)
    out = out.view(out_shape)
    check_finite_where(out, valid, f"the KL from {name} (they contain NaN/inf)")
    # KL >= 0 mathematically; float rounding can leave -1e-7 when the two distributions are nearly equal.
    return torch.where(valid, out.clamp_min_(0.0), torch.zeros((), dtype=dtype, device=device))


@torch.no_grad()
def exact_token_dependency(
    logits: torch.Tensor,
    logits_alt: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Full-vocabulary ``S_t = KL(π(·|image) ‖ π(·|image'))`` (ALGORITHMS.md §1, paper definition), chunked.

    ``S = Σ_v p_v (log p_v − log q_v)`` with ``p = softmax(logits / T)``, ``q = softmax(logits_alt / T)``, computed
    in float32 one chunk of positions at a time (peak extra memory: a few float32 ``[chunk, V]`` blocks).

    Args:
        logits: [B, L, V] float, the pass with the original image (may be a non-contiguous slice).
        logits_alt: [B, L, V] float, the pass with the altered image, same positions.
        mask: [B, L] bool or 0/1; S is 0 where it is 0 (and those positions are not checked).
        temperature: > 0, divides both logits.
        chunk_size: positions per chunk (None: ~64 MiB of float32 per block). Results do not depend on it.

    Returns:
        S: [B, L] float32 (float64 for float64 logits), >= 0, exactly 0 for identical inputs, no gradient.

    Raises:
        ValueError: shape mismatches, temperature <= 0, or a NaN/±inf logit at a valid position (a -inf logit
        makes the KL undefined or infinite).
    """
    for name, t in (("logits", logits), ("logits_alt", logits_alt)):
        if not isinstance(t, torch.Tensor) or t.ndim != 3 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor [B, L, V], got {getattr(t, 'shape', type(t))}")
    if logits_alt.shape != logits.shape:
        raise ValueError(f"logits_alt has shape {tuple(logits_alt.shape)}, expected logits' {tuple(logits.shape)}")
    temperature = check_temperature(temperature)
    dtype = compute_dtype(logits.dtype)
    xa, xb = as_rows(logits), as_rows(logits_alt)
    if xa.shape != xb.shape:  # one of them is an un-viewable slice: walk both as [B, L, V]
        xa, xb = logits, logits_alt
    batch, length, vocab = logits.shape
    return _exact_kl(
        lambda side, sl, buf: tempered((xa, xb)[side][:, sl], buf, temperature),
        tuple(xa.shape[:2]),
        (batch, length),
        vocab,
        mask,
        chunk_size,
        logits.device,
        dtype,
        "logits/logits_alt",
    )


def _check_hidden_and_weight(hidden: torch.Tensor, weight: torch.Tensor, *others: tuple[str, torch.Tensor]) -> None:
    """Check hidden [B, L, H] float, each named other view (e.g. ``("hidden_alt", t)``) against it (same shape and
    dtype), and the LM-head weight [V, H] (same H and dtype); raise ValueError naming the argument."""
    for name, t in (("hidden", hidden), *others):
        if not isinstance(t, torch.Tensor) or t.ndim != 3 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor [B, L, H], got {getattr(t, 'shape', type(t))}")
        if t.shape != hidden.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected hidden's {tuple(hidden.shape)}")
        if t.dtype != hidden.dtype:
            raise ValueError(f"{name} is {t.dtype}, expected hidden's {hidden.dtype} (the views share one dtype)")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"weight must be the LM-head weight [V, H] with H = {hidden.shape[2]}, "
            f"got {getattr(weight, 'shape', type(weight))}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one dtype")


@torch.no_grad()
def exact_token_dependency_from_hidden(
    hidden: torch.Tensor,
    hidden_alt: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`exact_token_dependency` from the last hidden states of both passes and the LM-head weight.

    Each chunk's logits are ``F.linear(hidden_chunk, weight)`` in the model's dtype, upcast to float32 — full
    logits of either pass never exist.

    Args:
        hidden: [B, L, H] float, original image; hidden_alt: [B, L, H], altered image, same positions.
        weight: [V, H] LM-head weight (same dtype/device as hidden). mask: [B, L] bool or 0/1.

    Returns:
        S: [B, L] float32 (float64 for float64 inputs), >= 0, no gradient.
    """
    _check_hidden_and_weight(hidden, weight, ("hidden_alt", hidden_alt))
    temperature = check_temperature(temperature)
    dtype = compute_dtype(hidden.dtype)
    # Contiguous [B·L, H] rows: each chunk is then a contiguous 2-D operand of the matmul. A strided 3-D slice
    # runs 10-20x slower in bf16 on CPU (issue 15; bench_race.py --ablations); the copy, if any, is [B·L, H], small next to a chunk.
    batch, length, hid = hidden.shape
    ha, hb = (t.reshape(batch * length, hid).contiguous() for t in (hidden, hidden_alt))
    return _exact_kl(
        # The LM head in the model's dtype (the op `model.lm_head` runs), upcast into the float buffer.
        lambda side, sl, buf: tempered(F.linear((ha, hb)[side][sl], weight)[None], buf, temperature),
        (1, batch * length),
        (batch, length),
        weight.shape[0],
        mask,
        chunk_size,
        hidden.device,
        dtype,
        "hidden/hidden_alt",
    )


# --------------------------------------------------------------------------------------------------------------------
# The scores of the methods that followed VPPO (ALGORITHMS.md §9): ToR, VEPO
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def abs_log_ratio(lp: torch.Tensor, lp_alt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ToR's perception score (§9.3): ``|lp − lp_alt|`` per valid token (float32 or wider), 0 on padding.

    Args:
        lp: [B, L] float, log-prob of each sampled token with the image; lp_alt: [B, L] without it.
        mask: [B, L] bool or 0/1.
    """
    valid, dtype = _check_logprob_pair(lp, lp_alt, mask)
    s = (lp.to(dtype) - lp_alt.to(dtype)).abs()
    return torch.where(valid, s, torch.zeros((), dtype=dtype, device=s.device))


def _row_log_softmax(hidden_rows: torch.Tensor, weight: torch.Tensor, temperature: float, dtype) -> torch.Tensor:
    """log softmax(F.linear(rows, W) / T) in float ``dtype``: the LM head in the model's dtype, as `model.lm_head`."""
    return torch.log_softmax(F.linear(hidden_rows, weight).to(dtype) / temperature, dim=-1)


@torch.no_grad()
def view_divergences_from_hidden(
    hidden: torch.Tensor,
    hidden_alt: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Full-vocabulary Jensen–Shannon divergence and both entropies of two views, per response token (§9.6, VEPO).

    With ``p = softmax(W h / T)``, ``q = softmax(W h_alt / T)`` and ``m = (p + q) / 2``:
    ``jsd = ½ Σ_v p (log p − log m) + ½ Σ_v q (log q − log m)`` (no epsilon; computed through the log-ratio
    ``log q − log p`` of the two views, so that nearly equal views keep their ~1e-11 differences in float32),
    ``entropy = −Σ_v p log p``, ``entropy_alt = −Σ_v q log q``; float32, chunks of contiguous rows.

    Args:
        hidden, hidden_alt: [B, L, H] float, the two views' last hidden states at the same positions.
        weight: [V, H] LM-head weight (same dtype).  mask: [B, L] bool or 0/1.
        temperature: > 0.  chunk_size: the memory bound in positions, as for `exact_token_dependency` (about
            three float32 ``[chunk_size, V]`` blocks at a time; None: ~64 MiB each).

    Returns:
        ``{"jsd", "entropy", "entropy_alt", "entropy_gap"}``, each [B, L] float32 (float64 for float64 inputs), 0 on
        padding, no gradient; ``entropy_gap = entropy_alt − entropy``, computed like the JSD so that it keeps its
        precision when the views barely differ (the difference of the two rounded entropies would not). ``0 ≤ jsd ≤ log 2`` (up to float32 rounding, ~1e-7, for disjoint views).
    """
    _check_hidden_and_weight(hidden, weight, ("hidden_alt", hidden_alt))
    temperature = check_temperature(temperature)
    batch, length, hid = hidden.shape
    valid = check_mask(mask, (batch, length))
    dtype = compute_dtype(hidden.dtype)
    ha, hb = (t.reshape(batch * length, hid).contiguous() for t in (hidden, hidden_alt))
    keys = ("jsd", "entropy", "entropy_alt", "entropy_gap")
    out = {k: torch.zeros(batch * length, dtype=dtype, device=hidden.device) for k in keys}
    # About a dozen [width, V] float tensors are alive at once in a chunk: a quarter of `chunk_size` positions per
    # chunk keeps the peak near exact_token_dependency's three buffers of `chunk_size` positions.
    width = max(1, chunk_width(chunk_size, 1, weight.shape[0]) // 4)
    for start in range(0, batch * length, width):
        sl = slice(start, start + width)
        za = F.linear(ha[sl], weight).to(dtype) / temperature
        zb = F.linear(hb[sl], weight).to(dtype) / temperature
        la, lb = torch.log_softmax(za, dim=-1), torch.log_softmax(zb, dim=-1)
        pa, q = la.exp(), lb.exp()
        # Two forms of the same JSD. Direct: Σ over p·(log p − log m) with log m a log-sum-exp; accurate to ~1e-8
        # absolute (the rounding of the two log-softmaxes), so it buries views that barely differ (JSD ~ 1e-11, as
        # a small model's under VEPO's noise) in noise. Through δ = log q − log p without subtracting two rounded
        # log-softmaxes: δ = Δz − c, Δz = z_alt − z, c = log Σ p·e^Δz = log1p(Σ p·expm1(Δz)) (the row's top Δz
        # taken out first, so nothing overflows), then with f(δ) = log((1 + e^δ)/2):
        # JSD = ½ Σ p·(−f(δ)) + ½ Σ q·(δ − f(δ)), relative precision ~1e-3 at JSD ~ 1e-11; but δ carries the
        # rounding of |Δz| itself, ~1e-5 at logits of ~1,000. Each where it is accurate: the δ form below 1e-4.
        lm = torch.logaddexp(la, lb) + _LOG_HALF
        direct = 0.5 * (pa * (la - lm)).sum(-1) + 0.5 * (q * (lb - lm)).sum(-1)
        dz = zb - za
        shifted = dz - dz.amax(dim=-1, keepdim=True)
        mass = (pa * torch.expm1(shifted)).sum(-1, keepdim=True)
        c = torch.where(mass > -0.5, torch.log1p(mass.clamp(min=-0.5)), torch.logsumexp(la + shifted, -1, keepdim=True))
        delta = shifted - c
        f = torch.where(delta < 20, torch.log1p(torch.expm1(delta.clamp(max=20)) / 2), F.softplus(delta) - _LOG_2)
        by_ratio = 0.5 * (pa * -f).sum(-1) + 0.5 * (q * (delta - f)).sum(-1)
        close = direct < _JSD_RATIO_FORM_BELOW
        out["jsd"][sl] = torch.where(close, by_ratio, direct)
        out["entropy"][sl] = h = -(pa * la).sum(-1)
        out["entropy_alt"][sl] = h_alt = -(q * lb).sum(-1)
        # H_alt − H has the same problem and the same cure: with q = p·e^δ it is −Σ p·expm1(δ)·log p − Σ q·δ
        # (p·expm1(δ) = q − p, exactly where δ is small; q − p itself where expm1 could overflow against p = 0)
        q_minus_p = torch.where(delta < 20, pa * torch.expm1(delta.clamp(max=20)), q - pa)
        gap_by_ratio = -(q_minus_p * la).sum(-1) - (q * delta).sum(-1)
        out["entropy_gap"][sl] = torch.where(close, gap_by_ratio, h_alt - h)
    result = {}
    for key, value in out.items():
        value = value.view(batch, length)
        check_finite_where(value, valid, f"the {key} from hidden/hidden_alt (they contain NaN/inf)")
        value = value if key == "entropy_gap" else value.clamp_min(0.0)
        result[key] = torch.where(valid, value, torch.zeros((), dtype=dtype, device=value.device))
    return result


@torch.no_grad()
def top_p_entropy_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    *,
    top_p: float = 0.95,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Entropy of the top-p (nucleus) renormalised next-token distribution, per response token (§9.3, ToR).

    ``p = softmax(W h / T)`` sorted in descending order; a token is kept iff the mass before it is below ``top_p``
    (vLLM's rule: the most likely token is always kept); ``k = p·keep / Σ p·keep``; ``H = −Σ k log k``.
    ``top_p = 1`` is the full entropy.

    Args:
        hidden: [B, L, H] float.  weight: [V, H] LM-head weight (same dtype).  mask: [B, L] bool or 0/1.
        top_p: in (0, 1].  temperature: > 0.  chunk_size: the memory bound in positions, as for
            `exact_token_dependency` (about three float32 ``[chunk_size, V]`` blocks; None: ~64 MiB each).

    Returns:
        [B, L] float32 (float64 for float64 inputs), ≥ 0, 0 on padding, no gradient.
    """
    _check_hidden_and_weight(hidden, weight)
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    temperature = check_temperature(temperature)
    batch, length, hid = hidden.shape
    valid = check_mask(mask, (batch, length))
    dtype = compute_dtype(hidden.dtype)
    rows = hidden.reshape(batch * length, hid).contiguous()
    out = torch.zeros(batch * length, dtype=dtype, device=hidden.device)
    # A sort (values and int64 indices) and a few more [width, V] tensors per chunk: half of `chunk_size`
    # positions keeps the peak near exact_token_dependency's three buffers of `chunk_size` positions.
    width = max(1, chunk_width(chunk_size, 1, weight.shape[0]) // 2)
    for start in range(0, batch * length, width):
        sl = slice(start, start + width)
        # Max-shifted logits: H = lse − Σ p·z is accurate to ~1e-7 in float32 at V = 152k, where −Σ p·log p
        # off a float32 log-softmax is off by ~4e-5.
        z = F.linear(rows[sl], weight).to(dtype) / temperature
        z = z - z.amax(dim=-1, keepdim=True)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        p = (z - lse).exp()
        if top_p >= 1.0:  # the full entropy (a float32 cumsum can pass 1 early and would drop the tail)
            out[sl] = (lse - (p * z).sum(-1, keepdim=True))[:, 0]
            continue
        p_sorted, order = p.sort(dim=-1, descending=True)
        keep = p_sorted.cumsum(-1) - p_sorted < top_p
        z_sorted = z.gather(-1, order)
        kept = torch.where(keep, p_sorted, torch.zeros_like(p_sorted))
        mass = kept.sum(-1, keepdim=True)
        # k = p / mass on the nucleus: H = log(mass) + lse − Σ k·z
        k = kept / mass
        out[sl] = (
            torch.log(mass) + lse - (k * torch.where(keep, z_sorted, torch.zeros_like(z_sorted))).sum(-1, keepdim=True)
        )[:, 0]
    out = out.view(batch, length)
    check_finite_where(out, valid, "the top-p entropy from hidden (it contains NaN/inf)")
    return torch.where(valid, out.clamp_min(0.0), torch.zeros((), dtype=dtype, device=out.device))


@torch.no_grad()
def vepo_token_scores(
    jsd: torch.Tensor, entropy: torch.Tensor, entropy_gap: torch.Tensor, mask: torch.Tensor, *, jsd_weight: float = 0.7
) -> torch.Tensor:
    """VEPO's vision-anchored token score (§9.6): ``s = [1 − (1 − ĵ)^α (1 − ĝ)^(1−α)] · Ĥ``.

    ``ĵ, ĝ, Ĥ`` are the per-response min-max normalised JSD, entropy gap ``|H_alt − H|`` and entropy of the
    original view (`shaping.minmax_by_response`: 0 for a row whose values are all equal).

    Args:
        jsd, entropy, entropy_gap: [B, L] float (`view_divergences_from_hidden`; the gap ``H_alt − H``, either
            sign).  mask: [B, L] bool or 0/1.
        jsd_weight: α in [0, 1] (script: 0.7).

    Returns:
        [B, L] float32 in [0, 1], 0 on padding, no gradient. Select with `top_fraction_mask(s, mask, fraction=0.2)`.
    """
    for name, t in (("jsd", jsd), ("entropy", entropy), ("entropy_gap", entropy_gap)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point() or t.shape != jsd.shape:
            raise ValueError(f"{name} must be a floating tensor [B, L] of jsd's shape, got {getattr(t, 'shape', t)}")
    if isinstance(jsd_weight, bool) or not isinstance(jsd_weight, (int, float)) or not 0.0 <= jsd_weight <= 1.0:
        raise ValueError(f"jsd_weight must be in [0, 1], got {jsd_weight!r}")
    valid = check_mask(mask, tuple(jsd.shape))
    for name, t in (("jsd", jsd), ("entropy", entropy), ("entropy_gap", entropy_gap)):
        check_finite_where(t, valid, name)
    j = minmax_by_response(jsd, valid)
    gap = minmax_by_response(entropy_gap.float().abs(), valid)
    h = minmax_by_response(entropy, valid)
    score = (1.0 - (1.0 - j) ** jsd_weight * (1.0 - gap) ** (1.0 - jsd_weight)) * h
    return torch.where(valid, score, torch.zeros_like(score))
