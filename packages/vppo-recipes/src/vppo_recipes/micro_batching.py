"""How a rank's share of a mini-batch is cut into micro-batches: `batch.micro_batch_size` rows each, or by a token
budget (`batch.max_tokens_per_micro_batch`). Pure functions of the rows' lengths (both recipes; tested in
test_micro_batching.py).

A micro-batch is collated with its prompts LEFT-padded to the longest prompt and its responses RIGHT-padded to the
longest response (`vppo_rollout.collate_rollout`), so every forward over it computes

    padded_positions = rows × (longest prompt + longest response)      (at least 1 response position)

positions, of which the rows' own prompt and response tokens are real and the rest padding. With a budget, the rows
are taken longest first and each micro-batch is filled greedily while its padded positions stay within the budget
(and its rows within `micro_batch_size`, the cap): rows of similar length share a micro-batch, so little is padding.
The grouping depends only on the lengths and the rows' order (ties by position), never on timing or the rank.

FSDP2 needs every rank to run the same number of forwards: `split_to_count` raises a rank's micro-batch count to
the largest of any rank by halving its fullest micro-batches; a part of a micro-batch never has more padded
positions than the whole, so the budget still holds and no row is dropped or duplicated.
"""

from __future__ import annotations

from collections.abc import Sequence


def padded_positions(prompt_lengths: Sequence[int], response_lengths: Sequence[int]) -> int:
    """Positions one forward over these rows computes (collate_rollout's layout): rows × (max P + max(max L, 1))."""
    if not prompt_lengths:
        return 0
    return len(prompt_lengths) * (max(prompt_lengths) + max(max(response_lengths), 1))


def fixed_micro_batches(n: int, size: int) -> list[list[int]]:
    """range(n) in consecutive micro-batches of `size` rows (the last may be shorter): `batch.micro_batch_size`."""
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def token_budget_micro_batches(
    prompt_lengths: Sequence[int], response_lengths: Sequence[int], *, max_tokens: int, max_rows: int
) -> list[list[int]]:
    """Row indices grouped into micro-batches of at most `max_tokens` padded positions and `max_rows` rows.

    Rows are taken longest first (prompt + response; ties by index), each joining the open micro-batch while its
    padded positions stay within the budget, else opening the next. Returns the micro-batches longest first, each's
    rows in increasing index (data) order. A row that alone exceeds the budget is an error naming the fix.
    """
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-(prompt_lengths[i] + response_lengths[i]), i))
    groups: list[list[int]] = []
    for i in order:
        alone = padded_positions([prompt_lengths[i]], [response_lengths[i]])
        if alone > max_tokens:
            raise ValueError(
                f"a row of {prompt_lengths[i]} prompt + {response_lengths[i]} response tokens needs {alone} positions "
                f"> batch.max_tokens_per_micro_batch={max_tokens}: raise it to at least data.max_prompt_length + the "
                "longest response (rollout.max_new_tokens / data.max_response_length)"
            )
        if groups:
            last = groups[-1] + [i]
            within = padded_positions([prompt_lengths[j] for j in last], [response_lengths[j] for j in last])
            if len(last) <= max_rows and within <= max_tokens:
                groups[-1] = last
                continue
        groups.append([i])
    return [sorted(g) for g in groups]


def split_to_count(groups: Sequence[Sequence[int]], count: int) -> list[list[int]]:
    """`groups` split into exactly `count` non-empty micro-batches: while short, the micro-batch with the most rows
    (the first such) is cut in two in place (its first ceil(n/2) rows, then the rest). A part has no more padded
    positions than the whole, so a budget that held still holds. Needs len(groups) <= count <= rows."""
    out = [list(g) for g in groups]
    rows = sum(len(g) for g in out)
    if not len(out) <= count <= rows:
        raise ValueError(f"cannot split {len(out)} micro-batches of {rows} rows into {count} non-empty ones")
    while len(out) < count:
        k = max(range(len(out)), key=lambda j: (len(out[j]), -j))
        half = (len(out[k]) + 1) // 2
        out[k : k + 1] = [out[k][:half], out[k][half:]]
    return out


def padding_counts(attention_masks: Sequence) -> tuple[float, float]:
    """(computed positions, padding positions) of one forward over each micro-batch with these [b, T] attention
    masks (1 on a real prompt or response token, 0 on padding); one host transfer."""
    if not attention_masks:
        return 0.0, 0.0
    import torch

    computed = float(sum(m.numel() for m in attention_masks))
    real = float(torch.stack([m.sum() for m in attention_masks]).sum())
    return computed, computed - real
