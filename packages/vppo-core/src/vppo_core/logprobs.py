"""Token log-probabilities without a float32 ``[B, L, V]`` tensor (ALGORITHMS.md §1 and §6 consume them).

Two entry points:

- :func:`token_logprobs` — from logits the model already produced (e.g. bf16 ``[B, L, V]``).
- :func:`logprobs_from_hidden` — from the last hidden states and the LM-head weight; the logits exist only one
  block at a time, in the forward *and* in the backward (recomputed there, block by block over the vocabulary).

Both walk the positions in chunks of ``chunk_size`` positions: a contiguous ``[B, L, ·]`` input is read as
``B·L`` rows; a slice that cannot be viewed so (``logits[:, P-1:-1]`` of a bigger output) is walked as
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


class _HiddenLogprobs(torch.autograd.Function):
    """Forward chunked over positions; backward chunked over the *vocabulary*.

    The backward needs, per position, only the log-sum-exp (and the entropy) saved by the forward. Walking the
    vocabulary then gives each row block of the weight gradient in one matmul over all positions
    (``grad_W[v0:v1] = gz[:, v0:v1]ᵀ · hidden``), written once in the weight's dtype like autograd's, with no
    ``[V, H]`` float32 accumulator; ``grad_hidden`` ([B·L, H], small) is the float32 sum over vocabulary blocks.
    Chunking the backward over positions instead would re-read and re-write the whole ``[V, H]`` gradient once per
    chunk (measured 7x slower than autograd on CPU at V = 151,936, H = 3,584).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size, with_entropy, validate):
        batch, length, _ = hidden.shape
        vocab = weight.shape[0]
        h = as_rows(hidden)
        lab = labels.reshape(h.shape[0], h.shape[1])
        cdt = compute_dtype(hidden.dtype)
        ch = Chunker(h.shape[0], h.shape[1], vocab, chunk_width(chunk_size, h.shape[0], vocab), cdt, hidden.device)
        lp = torch.empty(h.shape[0], h.shape[1], dtype=cdt, device=hidden.device)
        lse = torch.empty_like(lp)
        ent = torch.empty_like(lp) if with_entropy else None
        for sl in ch.slices():
            buf_z, buf_p = ch.views(sl)
            # The LM head in the model's own dtype (the op `model.lm_head` runs), upcast into the float buffer.
            z = tempered(F.linear(h[:, sl], weight), buf_z, temperature)
            lse[:, sl] = torch.logsumexp(z, dim=-1)
            lp[:, sl] = z.gather(-1, lab[:, sl].unsqueeze(-1)).squeeze(-1) - lse[:, sl]
            if with_entropy:  # H = −Σ p log p (not lse − Σ p z: that cancels badly when lse is large)
                logp = torch.sub(z, lse[:, sl].unsqueeze(-1), out=buf_p)
                ent[:, sl] = -torch.exp(logp, out=buf_z).mul_(logp).sum(-1)
            del z
        lp, lse = lp.view(batch, length), lse.view(batch, length)
        bad = ~(torch.isfinite(lp) & torch.isfinite(lse))
        if with_entropy:
            ent = ent.view(batch, length)
            bad |= ~torch.isfinite(ent)
        if validate:
            _raise_non_finite(bad, "hidden @ weight.T (the logits)")
        ctx.save_for_backward(hidden, weight, labels, lse, ent)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        if with_entropy:
            return lp, ent
        return lp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        batch, length, hid = hidden.shape
        vocab, n = weight.shape[0], batch * length
        cdt = compute_dtype(hidden.dtype)
        temperature = ctx.temperature
        h = hidden.reshape(n, hid)  # a copy only for an un-viewable slice: [B·L, H] is small next to [B·L, V]
        lab, lse = labels.reshape(n), lse.reshape(n, 1)
        g_lp = (torch.zeros(n, dtype=cdt, device=h.device) if g_lp is None else g_lp.to(cdt)).reshape(n, 1)
        use_ent = ctx.with_entropy and g_ent is not None
        if use_ent:
            g_ent, ent = g_ent.to(cdt).reshape(n, 1), ent.reshape(n, 1)
        # Same element budget as a forward chunk: (positions per chunk) × V = n × (vocabulary entries per block).
        block = max(1, chunk_width(ctx.chunk_size, 1, vocab) * vocab // max(1, n))
        ch = Chunker(1, vocab, n, block, cdt, h.device)  # buffers [n, block] (walked along the vocabulary)
        grad_h = torch.zeros(n, hid, dtype=cdt, device=h.device) if need_h else None
        grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None
        for sl in ch.slices():
            k = sl.stop - sl.start
            buf_z, buf_p = (buf.view(-1)[: n * k].view(n, k) for buf in ch.buffers)
            w_blk = weight[sl]
            z = tempered(F.linear(h, w_blk), buf_z, temperature)
            logp = z.sub_(lse) if z.data_ptr() == buf_z.data_ptr() else torch.sub(z, lse, out=buf_z)
            p = torch.exp(logp, out=buf_p)
            # d lp / d z = onehot(label) − p;   d H / d z = −p (log p + H);   d z / d logits = 1 / T.
            if use_ent:
                gz = logp.add_(ent).mul_(p).mul_(-g_ent).addcmul_(p, g_lp, value=-1.0)
            else:
                gz = p.mul_(-g_lp)
            rows = ((lab >= sl.start) & (lab < sl.stop)).nonzero().squeeze(1)
            gz.index_put_((rows, lab[rows] - sl.start), g_lp[rows, 0], accumulate=True)
            if temperature != 1.0:
                gz.div_(temperature)
            gz = gz.to(weight.dtype)  # the matmuls run in the LM head's dtype, like autograd's
            if need_w:
                torch.mm(gz.T, h, out=grad_w[sl])
            if need_h:
                if gz.dtype == cdt:
                    grad_h.addmm_(gz, w_blk)
                else:
                    grad_h.add_(gz @ w_blk)
            del gz, z, logp, p
        if need_h:
            grad_h = grad_h.to(hidden.dtype).view(batch, length, hid)
        return grad_h, grad_w, None, None, None, None, None


def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    validate: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label straight from the last hidden states; full logits never exist.

    Per chunk: ``z = F.linear(hidden_chunk, weight).float() / temperature`` (the LM head in the model's dtype, as
    in ``model.lm_head``), then the same log-softmax as :func:`token_logprobs`. The backward recomputes each chunk's
    logits block by block, walking the *vocabulary* (``[B·L, V/blocks]`` blocks of the same size as a forward chunk),
    so training memory is two such float32 blocks plus ``grad_hidden`` and the weight gradient itself; each row
    block of the weight gradient is one matmul over all positions, rounded once to the weight's dtype, as autograd's.

    Args:
        hidden: [B, L, H] float (the positions whose *next* token is ``labels``); may be a non-contiguous slice.
        weight: [V, H] the LM-head (or tied embedding) weight, same dtype/device as ``hidden``. No bias (Qwen has
            none). Under FSDP2 pass the unsharded weight (e.g. inside the lm_head module's forward).
        labels: [B, L] int64 in [0, V).
        temperature: > 0, divides the logits.
        chunk_size: positions per chunk (None: ~64 MiB of float32 logits per chunk). Results do not depend on it.
        return_entropy: also return the analytic entropy ``H = -Σ_v p_v log p_v`` of ``softmax(z)`` (differentiable).
            This is *not* the sampled-token NLL of ALGORITHMS.md §6; it is the "analytic entropy" option.
        validate: check the label range and that the result is finite. ``False`` skips these two data-reading
            checks (device-to-host syncs on a GPU) for a caller that handles non-finite values itself.

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
        hidden, weight, labels.long(), temperature, chunk_size, bool(return_entropy), bool(validate)
    )
