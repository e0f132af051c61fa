"""Tests of vppo_core.logprobs: exact values, chunk invariance, gradients, memory-bounded backward, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from vppo_core.dependency import exact_token_dependency_from_hidden
from vppo_core.logprobs import logprobs_from_hidden, token_logprobs


def _ref_logprobs(logits, labels, temperature=1.0):
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.log_softmax(logits.to(dt) / temperature, -1).gather(-1, labels[..., None])[..., 0]


def _ref_hidden(hidden, weight, labels, temperature=1.0):
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax((hidden @ weight.T).to(dt) / temperature, -1)
    return logp.gather(-1, labels[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op returns (forward and, on CPU, the backward run in this thread)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_token_logprobs_hand_worked_two_token_vocabulary():
    # logits (0, log 3): p = (1/4, 3/4). At temperature 2 the logits halve: p ∝ (1, √3).
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    labels = torch.tensor([[0, 1]])
    lp = token_logprobs(logits, labels)
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.25), math.log(0.75)]]))
    lp_t = token_logprobs(logits, labels, temperature=2.0)
    z = 1.0 + math.sqrt(3.0)
    torch.testing.assert_close(lp_t, torch.tensor([[math.log(1.0 / z), math.log(math.sqrt(3.0) / z)]]))
    assert lp.dtype == torch.float32


def test_token_logprobs_bf16_input_matches_float32_log_softmax_of_upcast():
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 5, 37)).to(torch.bfloat16)
    labels = torch.randint(0, 37, (2, 5))
    lp = token_logprobs(logits, labels, chunk_size=3)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, _ref_logprobs(logits, labels), atol=1e-6, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4),
    length=st.integers(1, 9),
    vocab=st.integers(2, 40),
    chunk_size=st.integers(1, 50),
    temperature=st.floats(0.3, 3.0),
    seed=st.integers(0, 2**16),
)
def test_token_logprobs_any_chunk_size_equals_unchunked_reference(batch, length, vocab, chunk_size, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(batch, length, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    ref = _ref_logprobs(logits, labels, temperature)
    chunked = token_logprobs(logits, labels, temperature=temperature, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, ref, atol=1e-6, rtol=1e-6)  # float32 rounding of |lp| up to ~40
    # Chunk boundaries must not change the arithmetic; checked in float64 so that a different vectorised
    # reduction order for a different chunk shape (a float32 ulp of |lp| ~ 10 is ~1e-6) cannot mask or fake a bug.
    logits64 = logits.double()
    chunked64 = token_logprobs(logits64, labels, temperature=temperature, chunk_size=chunk_size)
    whole64 = token_logprobs(logits64, labels, temperature=temperature, chunk_size=batch * length)
    torch.testing.assert_close(chunked64, whole64, atol=1e-12, rtol=0)


def test_token_logprobs_reads_a_non_contiguous_slice_without_copying_it_whole():
    torch.manual_seed(0)
    full = torch.randn(3, 20, 64)
    logits = full[:, 7:-1]  # the response slice of a [B, P+L, V] output: not viewable as [B·L, V]
    labels = torch.randint(0, 64, (3, 12))
    with _LargestAllocation() as rec:
        lp = token_logprobs(logits, labels, chunk_size=6)  # 2 positions per row per chunk
    torch.testing.assert_close(lp, _ref_logprobs(logits, labels), atol=1e-6, rtol=0)
    assert rec.largest <= 3 * 2 * 64 * 4, rec.largest


def test_token_logprobs_gradient_equals_plain_autograd_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6))
    g = torch.randn(2, 6, dtype=torch.float64)
    (ours,) = torch.autograd.grad((token_logprobs(logits, labels, temperature=0.7, chunk_size=4) * g).sum(), logits)
    (ref,) = torch.autograd.grad((_ref_logprobs(logits, labels, 0.7) * g).sum(), logits)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    small = logits.detach()[:, :3, :5].clone().requires_grad_()
    small_labels = labels[:, :3] % 5
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, small_labels, temperature=1.3, chunk_size=4), (small,))


def test_token_logprobs_bf16_gradient_has_input_dtype_and_matches_float32_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 9).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 9, (2, 4))
    token_logprobs(logits, labels, chunk_size=3).sum().backward()
    ref_in = logits.detach().float().requires_grad_()
    _ref_logprobs(ref_in, labels).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.float(), ref_in.grad, atol=1e-2, rtol=1e-2)


def test_logprobs_from_hidden_matches_reference_values_entropy_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 30, (3, 5))
    g_lp, g_ent = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    lp, ent = logprobs_from_hidden(hidden, weight, labels, temperature=0.8, chunk_size=4, return_entropy=True)
    rlp, rent = _ref_hidden(hidden, weight, labels, 0.8)
    torch.testing.assert_close(lp, rlp, atol=1e-12, rtol=0)
    torch.testing.assert_close(ent, rent, atol=1e-12, rtol=0)
    ours = torch.autograd.grad((lp * g_lp + ent * g_ent).sum(), (hidden, weight))
    ref = torch.autograd.grad((rlp * g_lp + rent * g_ent).sum(), (hidden, weight))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=0)


def test_logprobs_from_hidden_passes_gradcheck_with_and_without_entropy():
    torch.manual_seed(1)
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 3))
    assert torch.autograd.gradcheck(
        lambda h, w: logprobs_from_hidden(h, w, labels, chunk_size=2, temperature=1.4), (hidden, weight)
    )
    assert torch.autograd.gradcheck(
        lambda h, w: logprobs_from_hidden(h, w, labels, chunk_size=3, return_entropy=True), (hidden, weight)
    )


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 8),
    vocab=st.integers(2, 30),
    chunk_size=st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
def test_logprobs_from_hidden_any_chunk_size_equals_unchunked(batch, length, vocab, chunk_size, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, 6, generator=g)
    weight = torch.randn(vocab, 6, generator=g)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    # float32: a [1, H] @ [H, V] and an [8, H] @ [H, V] matmul may use different kernels, so the same logit can
    # differ by an ulp; |lp| ~ 10 makes that ~2e-6 (CI found chunk_size=1, seed=0). Bound it relatively.
    lp, ent = logprobs_from_hidden(hidden, weight, labels, chunk_size=chunk_size, return_entropy=True)
    lp1, ent1 = logprobs_from_hidden(hidden, weight, labels, chunk_size=batch * length, return_entropy=True)
    torch.testing.assert_close(lp, lp1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, ent1, atol=1e-6, rtol=1e-6)
    # float64: chunking itself must be exact up to that same reordering, now ~1e-15.
    h64, w64 = hidden.double(), weight.double()
    lp, ent = logprobs_from_hidden(h64, w64, labels, chunk_size=chunk_size, return_entropy=True)
    lp1, ent1 = logprobs_from_hidden(h64, w64, labels, chunk_size=batch * length, return_entropy=True)
    torch.testing.assert_close(lp, lp1, atol=1e-12, rtol=0)
    torch.testing.assert_close(ent, ent1, atol=1e-12, rtol=0)


def test_logprobs_from_hidden_forward_and_backward_never_allocate_full_logits():
    torch.manual_seed(0)
    batch, length, hid, vocab = 2, 32, 8, 1000
    hidden = torch.randn(batch, length, hid, requires_grad=True)
    weight = torch.randn(vocab, hid, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length))
    with _LargestAllocation() as rec:
        lp, ent = logprobs_from_hidden(hidden, weight, labels, chunk_size=8, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
    full_logits = batch * length * vocab * 4
    chunk_logits = 8 * vocab * 4
    assert hidden.grad is not None and weight.grad is not None
    # The largest tensors are one chunk of logits and the [V, H] weight gradient, never [B·L, V].
    assert rec.largest <= max(chunk_logits, vocab * hid * 4), (rec.largest, full_logits)
    assert rec.largest < full_logits / 4
    # The recorder does see backward ops: the plain reference's backward allocates a full [B·L, V] gradient.
    with _LargestAllocation() as rec_ref:
        lp_ref, _ = _ref_hidden(hidden.detach(), weight.detach().requires_grad_(), labels)
        lp_ref.sum().backward()
    assert rec_ref.largest >= full_logits


class _MatmulOperands(TorchDispatchMode):
    """Records every matrix-multiply op and its operands' (shape, stride)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if "mm" in name or "matmul" in name or "linear" in name:
            self.calls.append((name, [a for a in args if isinstance(a, torch.Tensor) and a.ndim >= 2]))
        return func(*args, **(kwargs or {}))


def assert_plain_2d_matmuls(calls):
    """Every matmul is a 2-D mm/addmm whose operands are contiguous or the transpose of a contiguous block.

    Issue 15: ``F.linear`` on a 3-D slice became a bmm against an expanded, transposed weight, which in bf16 on CPU
    ran 10-20x slower than the plain 2-D product (the issue measured 35x over a whole no-grad pass). Timing-free: the op and the
    operand layouts say which kernel runs.
    """
    assert calls, "no matmul recorded"
    for name, operands in calls:
        assert name in ("mm", "addmm", "addmm_"), (name, [(tuple(t.shape), t.stride()) for t in operands])
        for t in operands:
            assert t.ndim == 2 and (t.is_contiguous() or t.t().is_contiguous()), (name, tuple(t.shape), t.stride())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sliced", [False, True])
def test_logprobs_from_hidden_runs_only_plain_2d_matmuls_with_and_without_grad(dtype, sliced):
    torch.manual_seed(0)
    full = torch.randn(3, 9, 16).to(dtype)
    hidden = full[:, 1:-1] if sliced else full[:, :7].contiguous()  # a model output's response slice, or not
    weight = torch.randn(50, 16).to(dtype)
    labels = torch.randint(0, 50, (3, 7))
    with torch.no_grad(), _MatmulOperands() as rec:  # lp_old, the perturbed and the reference passes
        logprobs_from_hidden(hidden, weight, labels, chunk_size=4, return_entropy=True)
    assert_plain_2d_matmuls(rec.calls)
    hidden, weight = hidden.detach().requires_grad_(), weight.requires_grad_()
    with _MatmulOperands() as rec:
        lp, ent = logprobs_from_hidden(hidden, weight, labels, chunk_size=4, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
    assert_plain_2d_matmuls(rec.calls)
    assert len(rec.calls) >= 4  # forward, and the backward's recompute, grad_W and grad_hidden products


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_exact_dependency_from_hidden_runs_only_plain_2d_matmuls(dtype):
    # The other hidden-state kernel (the perturbed pass's exact S) had the same strided 3-D chunks.
    torch.manual_seed(0)
    full, full_alt = torch.randn(3, 9, 16).to(dtype), torch.randn(3, 9, 16).to(dtype)
    weight = torch.randn(50, 16).to(dtype)
    hidden, hidden_alt = full[:, 1:-1], full_alt[:, 1:-1]
    with _MatmulOperands() as rec:
        s = exact_token_dependency_from_hidden(hidden, hidden_alt, weight, torch.ones(3, 7), chunk_size=4)
    assert_plain_2d_matmuls(rec.calls)
    la = torch.log_softmax((hidden @ weight.T).double(), -1)
    lb = torch.log_softmax((hidden_alt @ weight.T).double(), -1)
    torch.testing.assert_close(s, (la.exp() * (la - lb)).sum(-1).float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_keep_logits_gives_identical_values_and_gradients_with_one_lm_head_product_less(dtype):
    torch.manual_seed(0)
    hidden0, weight0 = torch.randn(2, 9, 16).to(dtype), torch.randn(50, 16).to(dtype)
    labels = torch.randint(0, 50, (2, 9))
    g_lp, g_ent = torch.randn(2, 9), torch.randn(2, 9)
    results = {}
    for keep in (False, True):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        with _MatmulOperands() as rec:
            lp, ent = logprobs_from_hidden(
                hidden, weight, labels, temperature=0.7, chunk_size=3, return_entropy=True, keep_logits=keep
            )
            ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        assert_plain_2d_matmuls(rec.calls)
        results[keep] = (lp, ent, hidden.grad, weight.grad, len(rec.calls))
    blocks = math.ceil(50 / (3 * 50 // 18))  # vocab_block: chunk_size·V entries over B·L = 18 rows
    assert results[False][4] == 4 * blocks and results[True][4] == 3 * blocks
    for a, b in zip(results[False][:4], results[True][:4]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # the kept logits are the recomputed ones, bit for bit
    with torch.no_grad():  # without grad nothing is kept, and the values are the same
        lp_ng = logprobs_from_hidden(hidden0, weight0, labels, temperature=0.7, chunk_size=3, keep_logits=True)
    torch.testing.assert_close(lp_ng, results[True][0], atol=0, rtol=0)


def test_logprobs_from_hidden_frozen_weight_gets_no_gradient_and_hidden_does():
    hidden = torch.randn(1, 3, 4, requires_grad=True)
    weight = torch.randn(5, 4)
    logprobs_from_hidden(hidden, weight, torch.tensor([[0, 1, 4]])).sum().backward()
    assert hidden.grad is not None and weight.grad is None


def test_logprobs_from_hidden_returns_fresh_tensors_not_views():
    """Under FSDP2 the recipes return these from a root forward, which hooks them for backward and warns for any
    view ("returned a view tensor"): they must not be views."""
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    lp, ent = logprobs_from_hidden(hidden, torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long), return_entropy=True)
    assert lp._base is None and ent._base is None
    assert logprobs_from_hidden(hidden, torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long))._base is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"logits": torch.zeros(2, 3)}, "logits must be a floating tensor"),
        ({"labels": torch.zeros(2, 4, dtype=torch.long)}, "labels has shape"),
        ({"labels": torch.full((2, 3), -100)}, "labels must be token ids"),
        ({"labels": torch.full((2, 3), 5)}, "labels must be token ids"),
        ({"labels": torch.zeros(2, 3)}, "labels must be an int64"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_token_logprobs_bad_input_raises_value_error_naming_argument(kwargs, match):
    args = {"logits": torch.zeros(2, 3, 5), "labels": torch.zeros(2, 3, dtype=torch.long)} | kwargs
    logits, labels = args.pop("logits"), args.pop("labels")
    with pytest.raises(ValueError, match=match):
        token_logprobs(logits, labels, **args)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_token_logprobs_nan_or_inf_logit_raises_value_error(bad_value):
    logits = torch.zeros(2, 3, 5)
    logits[1, 2, 4] = bad_value
    with pytest.raises(ValueError, match=r"logits contains NaN.*\[1, 2\]"):
        token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), chunk_size=2)


def test_token_logprobs_minus_inf_allowed_off_label_rejected_on_label():
    logits = torch.zeros(1, 1, 4)
    logits[0, 0, 3] = float("-inf")  # a masked-out vocabulary entry: probability 0, fine
    torch.testing.assert_close(token_logprobs(logits, torch.tensor([[0]])), torch.tensor([[math.log(1 / 3)]]))
    with pytest.raises(ValueError, match="logits contains NaN"):
        token_logprobs(logits, torch.tensor([[3]]))


def test_logprobs_from_hidden_bad_input_raises_value_error_naming_argument():
    hidden, weight, labels = torch.zeros(1, 2, 4), torch.zeros(6, 4), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="weight must be the LM-head weight"):
        logprobs_from_hidden(hidden, torch.zeros(6, 5), labels)
    with pytest.raises(ValueError, match=r"weight .* must have hidden's dtype"):
        logprobs_from_hidden(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="hidden must be a floating tensor"):
        logprobs_from_hidden(torch.zeros(2, 4), weight, labels)
    with pytest.raises(ValueError, match="labels must be token ids"):
        logprobs_from_hidden(hidden, weight, torch.full((1, 2), 6))
    with pytest.raises(ValueError, match="the logits"):
        logprobs_from_hidden(torch.full((1, 2, 4), float("inf")), weight + 1, labels)


def test_logprobs_from_hidden_bf16_gradients_are_as_accurate_as_bf16_autograd():
    torch.manual_seed(0)
    hidden = torch.randn(2, 40, 16).bfloat16().requires_grad_()
    weight = (0.3 * torch.randn(300, 16)).bfloat16().requires_grad_()
    labels = torch.randint(0, 300, (2, 40))
    lp, ent = logprobs_from_hidden(hidden, weight, labels, chunk_size=7, return_entropy=True)
    (lp.sum() + 0.5 * ent.sum()).backward()
    grads = {}
    for dtype in (torch.bfloat16, torch.float32):  # plain autograd in bf16 (what a model does) and in float32
        h, w = hidden.detach().to(dtype).requires_grad_(), weight.detach().to(dtype).requires_grad_()
        logp = torch.log_softmax(torch.nn.functional.linear(h, w).float(), -1)
        (logp.gather(-1, labels[..., None]).sum() - 0.5 * (logp.exp() * logp).sum()).backward()
        grads[dtype] = (h.grad.float(), w.grad.float())
    assert weight.grad.dtype == torch.bfloat16 and hidden.grad.dtype == torch.bfloat16
    for ours, bf16, exact in zip(
        (hidden.grad.float(), weight.grad.float()), grads[torch.bfloat16], grads[torch.float32]
    ):
        # Within one bf16 rounding of autograd's bf16 gradient, and no less accurate than it.
        assert (ours - bf16).abs().max() <= 2**-7 * bf16.abs().max()
        assert (ours - exact).abs().max() <= 1.5 * (bf16 - exact).abs().max() + 1e-6
