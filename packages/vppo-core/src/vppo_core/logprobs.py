"""Token log-probabilities without a float32 ``[B, L, V]`` tensor (ALGORITHMS.md §1 and §6 consume them).

Two entry points:

- :func:`token_logprobs` — from logits the model already produced (e.g. bf16 ``[B, L, V]``).
- :func:`logprobs_from_hidden` — from the last hidden states and the LM-head weight; the logits exist only one
  block at a time, in the forward *and* in the backward (recomputed there). It walks the *vocabulary*, every
  position at once, so each matmul is as fast as the full LM head.

:func:`token_logprobs` walks the positions in chunks of ``chunk_size`` positions: a contiguous ``[B, L, ·]`` input is
read as ``B·L`` rows; a slice that cannot be viewed so (``logits[:, P-1:-1]`` of a bigger output) is walked as
``[B, chunk_size // B, ·]`` slices and never copied whole. Each chunk goes through two reusable float buffers
(fresh ones per chunk would page-fault on CPU; measured about 2x slower). Both are custom autograd functions whose
backward recomputes the softmax block by block, so its extra memory is also a couple of blocks (plus,
unavoidably, the gradient of the input itself).

Numerics: the log-softmax is computed in float32 (float64 when the input is float64) whatever the input dtype,
exactly like ``torch.log_softmax(logits.float() / temperature, -1).gather(-1, labels)``.
"""

from __future__ import annotations

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
    vocab_block,
)

__all__ = ["logprobs_from_hidden", "token_logprobs"]


def _check_labels(labels: torch.Tensor, shape: tuple[int, int], vocab: int, values: bool = True) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError("labels must be an int64 (or int32) tensor of token ids [B, L]")
    if tuple(labels.shape) != shape:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {shape} (the first two dims of the input)")
    if values and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= vocab):
        raise ValueError(
            f"labels must be token ids in [0, {vocab}); got values in [{int(labels.min())}, {int(labels.max())}]. "
            "Replace padding labels (e.g. -100) by any valid id such as the pad token id and mask them instead."
        )


def _raise_non_finite(bad: torch.Tensor, name: str) -> None:
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(
            f"{name} contains NaN or +inf (or -inf at a label / in a whole row) at position {idx} (and "
            f"{int(bad.sum()) - 1} more); the log-probs would not be finite. Check the model outputs for overflow."
        )


def _grad_from_log_softmax(ls, p_buf, labels, g_lp, temperature):
    """d(loss)/d(logits) of one chunk: ``(onehot(label) − p) · g / T``, written into ``p_buf``.

    ls: [b, k, V] log p of the chunk; labels, g_lp: [b, k].
    """
    grad = torch.exp(ls, out=p_buf).mul_(-g_lp.unsqueeze(-1))
    grad.scatter_add_(-1, labels.unsqueeze(-1), g_lp.unsqueeze(-1))
    if temperature != 1.0:
        grad.div_(temperature)
    return grad


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, chunk_size):
        batch, length, vocab = logits.shape
        x = as_rows(logits)
        lab = labels.reshape(x.shape[0], x.shape[1])
        cdt = compute_dtype(logits.dtype)
        ch = Chunker(x.shape[0], x.shape[1], vocab, chunk_width(chunk_size, x.shape[0], vocab), cdt, logits.device)
        lp = torch.empty(x.shape[0], x.shape[1], dtype=cdt, device=logits.device)
        for sl in ch.slices():
            buf_z, buf_ls = ch.views(sl)
            ls = log_softmax_into(tempered(x[:, sl], buf_z, temperature), buf_ls)
            lp[:, sl] = ls.gather(-1, lab[:, sl].unsqueeze(-1)).squeeze(-1)
        lp = lp.view(batch, length)
        # A NaN or +inf anywhere in a row, or -inf at the label, makes that row's log-prob non-finite.
        _raise_non_finite(~torch.isfinite(lp), "logits")
        ctx.save_for_backward(logits, labels)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return lp

    @staticmethod
    def backward(ctx, g_lp):
        logits, labels = ctx.saved_tensors
        vocab = logits.shape[-1]
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        x, gx = as_rows(logits), as_rows(grad)
        if gx.shape[:2] != x.shape[:2]:  # logits is an un-viewable slice: walk both as [B, L, V]
            x, gx = logits, grad
        lab = labels.reshape(x.shape[0], x.shape[1])
        cdt = compute_dtype(logits.dtype)
        g_lp = g_lp.to(cdt).reshape(x.shape[0], x.shape[1])
        ch = Chunker(x.shape[0], x.shape[1], vocab, chunk_width(ctx.chunk_size, x.shape[0], vocab), cdt, x.device)
        for sl in ch.slices():
            buf_z, buf_ls = ch.views(sl)
            ls = log_softmax_into(tempered(x[:, sl], buf_z, ctx.temperature), buf_ls)
            gx[:, sl] = _grad_from_log_softmax(ls, buf_z, lab[:, sl], g_lp[:, sl], ctx.temperature)
        return grad, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``, chunked over positions.

    Args:
        logits: [B, L, V] any float dtype (bf16 from the model is fine); may be a non-contiguous slice such as
            ``out.logits[:, P - 1 : -1]`` — it is never copied whole.
        labels: [B, L] int64 token ids in [0, V) (padding positions need a valid id; mask them downstream).
        temperature: > 0; divides the logits (the sampler's temperature, or 1.0 as in ALGORITHMS.md §6).
        chunk_size: positions per chunk (None: ~64 MiB of float32 logits per chunk). Results do not depend on it.

    Returns:
        lp: [B, L] float32 (float64 for float64 logits), differentiable w.r.t. ``logits``. The backward recomputes
        each chunk's softmax and writes ``d lp / d logits`` chunk by chunk (extra memory: one chunk).

    Raises:
        ValueError: wrong shapes/dtypes, labels out of range, temperature <= 0, or non-finite logits (NaN, +inf,
        -inf at a label's logit or over a whole row). A -inf logit elsewhere is a zero-probability entry and is allowed.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating tensor [B, L, V], got {getattr(logits, 'shape', type(logits))}; "
            "for a single sequence use logits[None]"
        )
    _check_labels(labels, tuple(logits.shape[:2]), logits.shape[2])
    temperature = check_temperature(temperature)
    chunk_width(chunk_size, 1, logits.shape[2])  # validate chunk_size before any work
    return _TokenLogprobs.apply(logits, labels.long(), temperature, chunk_size)


def _rows_2d(hidden: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, H] as a contiguous [B·L, H] (a view when it can be; else a copy, small next to [B·L, V]).

    Every matmul of the hidden-state path takes this 2-D contiguous operand. A strided 3-D slice fed to
    ``F.linear`` on CPU in bf16 (e.g. ``hidden.view(1, B·L, H)[:, rows]`` with a weight that needs no grad) runs
    10-20x slower than the same rows as a contiguous 2-D tensor (the defect of issue 15; measured by
    ``bench_race.py --ablations``).
    """
    return hidden.reshape(-1, hidden.shape[-1]).contiguous()


class _HiddenLogprobs(torch.autograd.Function):
    """Forward and backward both walk the *vocabulary*, every position at once.

    Forward: per block ``[B·L, block]`` of logits, the block's log-sum-exp (max-shifted) and the label logits that
    fall in it; the log-sum-exps of the blocks are combined at the end. Each matmul is ``[B·L, H] × [H, block]``:
    all positions as the long dimension keeps it as fast as the full LM head (a 110-position chunk over the whole
    vocabulary is 1.6x slower in float32, measured), and the block of logits is small.

    Backward: per position only the log-sum-exp (and the entropy) saved by the forward are needed. Each vocabulary
    block's logits are recomputed, and the block gives its rows of the weight gradient in one matmul over all
    positions (``grad_W[v0:v1] = gz[:, v0:v1]ᵀ · hidden``), written once in the weight's dtype like autograd's, with
    no ``[V, H]`` float32 accumulator; ``grad_hidden`` ([B·L, H], small) is the float32 sum over blocks. Chunking
    the backward over positions instead would re-read and re-write the whole ``[V, H]`` gradient once per chunk
    (measured 7x slower than autograd on CPU at V = 151,936, H = 3,584).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size, with_entropy, validate, keep_logits):
        batch, length, _ = hidden.shape
        vocab, n = weight.shape[0], batch * length
        cdt = compute_dtype(hidden.dtype)
        h, lab = _rows_2d(hidden), labels.reshape(n)
        block = vocab_block(chunk_size, n, vocab)
        starts = range(0, vocab, block)
        buffers = [torch.empty(n * min(block, vocab), dtype=cdt, device=h.device) for _ in range(2)]
        lse_blocks = torch.empty(len(starts), n, dtype=cdt, device=h.device)
        # Per block: Σ_{v in block} p_v^b (z_v − lse_b) <= 0 with p^b the block's own softmax.
        plogp_blocks = torch.empty(len(starts), n, dtype=cdt, device=h.device) if with_entropy else None
        label_logit = torch.empty(n, dtype=cdt, device=h.device)
        lowest = torch.finfo(cdt).min
        # keep_logits: the blocks of logits (model dtype) go to the backward, which then skips its recompute.
        kept = [] if keep_logits and any(ctx.needs_input_grad[:2]) else None
        for i, v0 in enumerate(starts):
            v1 = min(vocab, v0 + block)
            buf_z, buf_d = (buf[: n * (v1 - v0)].view(n, v1 - v0) for buf in buffers)
            # The LM head in the model's own dtype (the op `model.lm_head` runs), upcast into the float buffer.
            logits = F.linear(h, weight[v0:v1])
            if kept is not None:
                kept.append(logits)
            z = tempered(logits, buf_z, temperature)
            rows = ((lab >= v0) & (lab < v1)).nonzero().squeeze(1)
            label_logit[rows] = z[rows, lab[rows] - v0]
            # A block that is -inf in a row (zero probability) has max -inf; shifting by `lowest` keeps it -inf, not NaN.
            m = z.amax(-1, keepdim=True).clamp_(min=lowest)
            d = torch.sub(z, m, out=buf_d)
            e = torch.exp(d, out=buf_z)
            s = e.sum(-1)
            log_s = torch.log(s)
            lse_blocks[i] = m.squeeze(1) + log_s
            if with_entropy:  # Σ p^b (z − m) − log s: two terms <= 0, no cancellation
                plogp = e.mul_(d).sum(-1).div_(s).sub_(log_s)
                plogp_blocks[i] = torch.where(s > 0, plogp, torch.zeros((), dtype=cdt, device=h.device))
            del z, d, e, logits
        lse = torch.logsumexp(lse_blocks, dim=0)
        # Outputs are fresh tensors, not views: FSDP2 hooks a forward's outputs for backward and warns that a view's
        # hook would be lost to an in-place op ("returned a view tensor") when this runs in an FSDP2 root forward.
        lp = label_logit.view(batch, length) - lse.view(batch, length)
        bad = ~(torch.isfinite(lp) & torch.isfinite(lse.view(batch, length)))
        ent = None
        if with_entropy:
            # H = −Σ_b w_b (Σ p^b (z − lse_b) + lse_b − lse), w_b = exp(lse_b − lse): every term <= 0 again.
            rel = lse_blocks - lse
            w = torch.exp(rel)
            terms = torch.where(w > 0, w * (plogp_blocks + rel), torch.zeros((), dtype=cdt, device=h.device))
            ent = torch.neg(terms.sum(0).view(batch, length))
            bad |= ~torch.isfinite(ent)
        if validate:
            _raise_non_finite(bad, "hidden @ weight.T (the logits)")
        ctx.save_for_backward(hidden, weight, labels, lse.view(batch, length), ent, *(kept or ()))
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        if with_entropy:
            return lp, ent
        return lp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, labels, lse, ent, *kept = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        batch, length, hid = hidden.shape
        vocab, n = weight.shape[0], batch * length
        cdt = compute_dtype(hidden.dtype)
        temperature = ctx.temperature
        h = _rows_2d(hidden)
        lab, lse = labels.reshape(n), lse.reshape(n, 1)
        g_lp = (torch.zeros(n, dtype=cdt, device=h.device) if g_lp is None else g_lp.to(cdt)).reshape(n, 1)
        use_ent = ctx.with_entropy and g_ent is not None
        if use_ent:
            g_ent, ent = g_ent.to(cdt).reshape(n, 1), ent.reshape(n, 1)
        block = vocab_block(ctx.chunk_size, n, vocab)  # the forward's blocks
        buffers = [torch.empty(n * min(block, vocab), dtype=cdt, device=h.device) for _ in range(2)]
        grad_h = torch.zeros(n, hid, dtype=cdt, device=h.device) if need_h else None
        grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None
        for i, v0 in enumerate(range(0, vocab, block)):
            v1 = min(vocab, v0 + block)
            buf_z, buf_p = (buf[: n * (v1 - v0)].view(n, v1 - v0) for buf in buffers)
            w_blk = weight[v0:v1]
            z = tempered(kept[i] if kept else F.linear(h, w_blk), buf_z, temperature)
            logp = z.sub_(lse) if z.data_ptr() == buf_z.data_ptr() else torch.sub(z, lse, out=buf_z)
            p = torch.exp(logp, out=buf_p)
            # d lp / d z = onehot(label) − p;   d H / d z = −p (log p + H);   d z / d logits = 1 / T.
            if use_ent:
                gz = logp.add_(ent).mul_(p).mul_(-g_ent).addcmul_(p, g_lp, value=-1.0)
            else:
                gz = p.mul_(-g_lp)
            rows = ((lab >= v0) & (lab < v1)).nonzero().squeeze(1)
            gz.index_put_((rows, lab[rows] - v0), g_lp[rows, 0], accumulate=True)
            if temperature != 1.0:
                gz.div_(temperature)
            gz = gz.to(weight.dtype)  # the matmuls run in the LM head's dtype, like autograd's
            if need_w:
                torch.mm(gz.T, h, out=grad_w[v0:v1])
            if need_h:
                if gz.dtype == cdt:
                    grad_h.addmm_(gz, w_blk)
                else:
                    grad_h.add_(gz @ w_blk)
            del gz, z, logp, p
        if need_h:
            grad_h = grad_h.to(hidden.dtype).view(batch, length, hid)
        return grad_h, grad_w, None, None, None, None, None, None


def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    validate: bool = True,
    keep_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label straight from the last hidden states; full logits never exist by default.

    The forward walks the *vocabulary* in blocks, every position at once: per block ``z = F.linear(hidden,
    weight[v0:v1]).float() / temperature`` (the LM head in the model's dtype, as in ``model.lm_head``), the block's
    log-sum-exp and the label logits in it; the blocks' log-sum-exps are combined at the end. The result is the
    log-softmax of :func:`token_logprobs` up to float32 summation order. The backward walks the same blocks and
    recomputes their logits, so training memory is two float32 blocks plus ``grad_hidden`` and the weight gradient
    itself; each row block of the weight gradient is one matmul over all positions, rounded once to the weight's
    dtype, as autograd's. Every matmul takes contiguous 2-D operands.

    Args:
        hidden: [B, L, H] float (the positions whose *next* token is ``labels``); may be a non-contiguous slice
            (then copied once as [B·L, H]).
        weight: [V, H] the LM-head (or tied embedding) weight, same dtype/device as ``hidden``. No bias (Qwen has
            none). Under FSDP2 pass the unsharded weight (e.g. inside the lm_head module's forward).
        labels: [B, L] int64 in [0, V).
        temperature: > 0, divides the logits.
        chunk_size: the memory bound of a block, in positions: a ``[B·L, block]`` block holds as many logits as
            ``chunk_size`` whole positions (``chunk_size · V``). None: 16 MiB float32 blocks. Results do not depend
            on it beyond float32 summation order.
        return_entropy: also return the analytic entropy ``H = -Σ_v p_v log p_v`` of ``softmax(z)`` (differentiable).
            This is *not* the sampled-token NLL of ALGORITHMS.md §6; it is the "analytic entropy" option.
        validate: check the label range and that the result is finite. ``False`` skips these two data-reading
            checks (device-to-host syncs on a GPU) for a caller that handles non-finite values itself.
        keep_logits: when a gradient is needed, keep every block's logits (model dtype: ``B·L·V`` values, the
            size of the model's own logits) for the backward instead of recomputing them: one LM-head product
            less (two in the backward, as autograd's), for that memory. Off by default; without grad it keeps
            nothing.

    Returns:
        lp: [B, L] float32 (float64 for float64 inputs); with ``return_entropy``: ``(lp, entropy)``, both [B, L].

    Raises:
        ValueError: shape/dtype mismatches (naming the argument), labels out of range, temperature <= 0,
        non-finite logits.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating tensor [B, L, H], got {getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"weight must be the LM-head weight [V, H] with H = hidden.shape[-1] = {hidden.shape[2]}, "
            f"got {getattr(weight, 'shape', type(weight))}"
        )
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"weight ({weight.dtype}, {weight.device}) must have hidden's dtype and device "
            f"({hidden.dtype}, {hidden.device}); cast one of them"
        )
    _check_labels(labels, tuple(hidden.shape[:2]), weight.shape[0], values=validate)
    temperature = check_temperature(temperature)
    chunk_width(chunk_size, 1, weight.shape[0])  # validate chunk_size before any work
    return _HiddenLogprobs.apply(
        hidden, weight, labels.long(), temperature, chunk_size, bool(return_entropy), bool(validate), bool(keep_logits)
    )
