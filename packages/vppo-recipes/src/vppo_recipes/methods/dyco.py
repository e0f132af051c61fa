"""DyCo-RL (ALGORITHMS.md §9.13): each response's advantage scaled by a factor in [0.8, 1.2] from how its tokens'
attention coordinates the two modalities: per token, the last decoder layer's attention share on the image and on
the text, and the Fisher–Rao distance of each modality's attention distribution to the previous token's; tokens
whose image attention moves more are perception tokens, those whose text attention moves more (by τ) reasoning
tokens; a response scores the mean share of the modality its tokens' role calls for, z-scored within its group.

The official code records these rows while sampling (a patched generation loop); the same rows come from one
teacher-forced forward over prompt and response, so DyCo-RL needs no rollout change: the clean no-grad pass (the one
that gives lp_old) runs with the last layer's attention recorded (`clean_pass_context`,
`last_layer_attention_signals`), so no extra forward either.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from vppo_core.attention import dyco_attention_signals
from vppo_core.shaping import dyco_advantage_weights, dyco_response_scores
from vppo_recipes.methods.base import Method, param
from vppo_recipes.methods.records import Shaping
from vppo_recipes.sharding import find_blocks

RECORD_NAME = "vppo_dyco_record"  # the attention implementation the last layer runs under while recording
SIGNALS = ("image_ratio", "text_ratio", "fr_image", "fr_text")
# float32 elements of one [heads, queries, keys] score block of the recording (64 MiB; the softmax holds ~3)
_BLOCK_ELEMENTS = 1 << 24


@dataclass
class _Recording:
    delegate: Any  # the layer's own attention function (its output is what the forward uses)
    input_ids: torch.Tensor  # [B, S]
    keys: torch.Tensor  # [B, S] bool, real tokens
    prompt_length: int
    length: int  # response positions L
    image_token_id: int
    signals: dict[str, torch.Tensor] = field(default_factory=dict)


_ACTIVE: ContextVar[_Recording | None] = ContextVar(RECORD_NAME, default=None)


def _head_mean_rows(q: torch.Tensor, k: torch.Tensor, scaling: float, keys: torch.Tensor, queries: torch.Tensor):
    """Causal softmax attention of the query positions `queries` [n] over the real keys, averaged over heads.
    q [H, S, D], k [H, S, D] (kv heads repeated). Returns [n, S] float32."""
    heads, seq, _ = q.shape
    q, k = q.float(), k.float()
    out = []
    chunk = max(1, _BLOCK_ELEMENTS // (heads * seq))
    pos = torch.arange(seq, device=q.device)
    for start in range(0, queries.numel(), chunk):
        idx = queries[start : start + chunk]
        s = torch.einsum("hqd,hkd->hqk", q[:, idx], k) * scaling
        allowed = keys[None, :] & (pos[None, :] <= idx[:, None])  # [n, S]
        s = s.masked_fill(~allowed[None], float("-inf"))
        out.append(torch.softmax(s, dim=-1).mean(0))
    return torch.cat(out) if out else q.new_zeros(0, seq, dtype=torch.float32)


def _record(rec: _Recording, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
    """The step rows of every batch row and their DyCo signals (vppo_core.dyco_attention_signals), into rec."""
    batch, heads = query.shape[:2]
    P, L = rec.prompt_length, rec.length
    out = {name: torch.zeros(batch, L, device=query.device) for name in (*SIGNALS, "has_image")}
    for b in range(batch):
        q = query[b]
        k = key[b].repeat_interleave(heads // key.shape[1], dim=0)
        keys = rec.keys[b]
        prompt = torch.nonzero(keys[:P]).flatten()
        # step 0 (the official prefill): the mean row of the prompt's queries; step j >= 1: the query at P + j - 1
        first = _head_mean_rows(q, k, scaling, keys, prompt).mean(0, keepdim=True)
        later = _head_mean_rows(q, k, scaling, keys, torch.arange(P, P + L - 1, device=query.device))
        rows = torch.cat([first, later])[None]  # [1, L, S]
        image = torch.nonzero((rec.input_ids[b] == rec.image_token_id) & keys).flatten()
        start, end = (image[0], image[-1]) if image.numel() else (torch.tensor(0), torch.tensor(0))
        key_end = P + torch.arange(L, device=query.device)
        sig = dyco_attention_signals(
            rows, key_end[None], start.reshape(1).to(query.device), end.reshape(1).to(query.device)
        )
        for name in SIGNALS:
            out[name][b] = sig[name][0]
        out["has_image"][b] = float(image.numel() > 0)
    rec.signals = out


def _attention(module, query, key, value, attention_mask, *args, scaling=None, **kwargs):
    """transformers attention-interface function of the recorded layer: its own attention, plus the recording."""
    rec = _ACTIVE.get()
    if rec is None:
        raise RuntimeError(f"attention implementation {RECORD_NAME!r} called outside last_layer_attention_signals()")
    out = rec.delegate(module, query, key, value, attention_mask, *args, scaling=scaling, **kwargs)
    with torch.no_grad():
        _record(rec, query, key, module.scaling if scaling is None else scaling)
    return out


@contextlib.contextmanager
def last_layer_attention_signals(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int, length: int,
    image_token_id: int,
) -> Iterator[dict[str, torch.Tensor]]:  # fmt: skip
    """Record DyCo-RL's attention signals during one full forward of `input_ids` [B, S] (prompt_length P, then
    `length` L response positions) inside the context. Only the last decoder layer's attention module changes: its
    own attention function still computes its output, and its query and key states (after RoPE) also give the
    rows. Yields a dict filled at the end of the forward: {"image_ratio", "text_ratio", "fr_image", "fr_text",
    "has_image"} each [B, L] float32, step j aligned with response token j."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn = find_blocks(model)[1][-1].self_attn
    own = attn.config
    impl = own._attn_implementation
    eager = sys.modules[type(attn).__module__].eager_attention_forward
    delegate = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager) if impl != "eager" else eager
    AttentionInterface.register(RECORD_NAME, _attention)
    if impl in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(RECORD_NAME, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    rec = _Recording(delegate, input_ids, attention_mask.to(torch.bool), prompt_length, length, image_token_id)
    recorded = copy.copy(own)
    recorded._attn_implementation = RECORD_NAME
    token = _ACTIVE.set(rec)
    attn.config = recorded
    out: dict[str, torch.Tensor] = {}
    try:
        yield out
        out.update(rec.signals)
    finally:
        attn.config = own
        _ACTIVE.reset(token)


@dataclass(frozen=True)
class DyCo(Method):
    name = "dyco"

    dyco_alpha: float = param(0.2, low=0.0, doc="w = clamp(1 + α·z, low, high) multiplies the response's advantage")
    dyco_tau: float = param(0.05, low=0.0, doc="margin: a reasoning token has FR_img − FR_txt < −τ")
    dyco_weight_low: float = param(0.8, low=0.0)
    dyco_weight_high: float = param(1.2, low=0.0)
    dyco_min_length: int = param(150, low=0, doc="shorter responses get z = −1 (official: 150 at 7B, 60 at 3B)")

    def config_errors(self, cfg):
        a = cfg["algorithm"]
        if a["dyco_weight_low"] > a["dyco_weight_high"]:
            return ["algorithm.dyco_weight_low must be <= algorithm.dyco_weight_high"]
        return []

    def clean_pass_context(self, ctx, mb):
        L = mb.responses.shape[1]
        return last_layer_attention_signals(
            ctx.model, mb.inputs["input_ids"], mb.inputs["attention_mask"], mb.prompt_length, L, ctx.image_token_id
        )

    def scoring_bytes(self, *, micro, seq, response, hidden, act_bytes):
        # one row at a time: its float32 query and key states (at most [heads, seq, head_dim] each, hidden-sized),
        # the [response, seq] float32 rows with ~10 temporaries of that size, ~3 live score blocks of the softmax
        return 2 * seq * hidden * 4 + 10 * response * seq * 4 + 3 * _BLOCK_ELEMENTS * 4

    def scores(self, ctx, mb, clean, lp_old, altered):
        return {f"dyco_{k}": clean[k] for k in (*SIGNALS, "has_image")}

    def shape(self, ctx, steps):
        flat = [s for mini in steps for s in mini]
        parts = []
        for s in flat:
            sc, mask = s.no_grad.scores, s.batch.mask
            valid = (mask > 0) & (sc["dyco_has_image"] > 0)
            valid[:, 0] = False  # step 0 has no previous row
            got = dyco_response_scores(
                sc["dyco_image_ratio"], sc["dyco_text_ratio"], sc["dyco_fr_image"], sc["dyco_fr_text"], valid,
                tau=self.dyco_tau,
            )  # fmt: skip
            uid = torch.tensor(s.batch.uids, device=mask.device, dtype=torch.float64)
            parts.append(torch.stack([uid, got["score"], mask.sum(1).double()], 1))  # float64: see the score
        local = torch.cat(parts) if parts else torch.zeros(0, 3, dtype=torch.float64, device=ctx.device)
        everything, start = ctx.gathered_with_offset(local.flatten())  # groups may span ranks
        everything = everything.view(-1, 3)
        w = dyco_advantage_weights(
            everything[:, 1], everything[:, 0].long(), everything[:, 2], min_length=self.dyco_min_length,
            alpha=self.dyco_alpha, low=self.dyco_weight_low, high=self.dyco_weight_high,
        )  # fmt: skip
        mine = start // 3
        out, i = [], 0
        for mini in steps:
            row = []
            for s in mini:
                b = s.batch.responses.shape[0]
                weight, z = w["weight"][mine + i : mine + i + b], w["z"][mine + i : mine + i + b]
                score = everything[mine + i : mine + i + b, 1].float()
                adv = s.batch.advantages * weight.to(s.batch.advantages.dtype)
                row.append(Shaping(adv, None, {"weight": weight, "z": z, "score": score}))
                i += b
            out.append(row)
        return out

    def metrics(self, ctx, steps):
        parts = []
        for s in steps:
            o = s.shaped.outputs
            parts.append(torch.stack([o["weight"], o["z"], o["score"]], 1).flatten())
        v = ctx.gathered(parts).view(-1, 3)
        nan = float("nan")
        return {
            "dyco/weight_mean": float(v[:, 0].mean()) if v.numel() else nan,
            "dyco/weight_min": float(v[:, 0].min()) if v.numel() else nan,
            "dyco/weight_max": float(v[:, 0].max()) if v.numel() else nan,
            "dyco/z_mean": float(v[:, 1].mean()) if v.numel() else nan,
            "dyco/score_mean": float(v[:, 2].mean()) if v.numel() else nan,
        }
