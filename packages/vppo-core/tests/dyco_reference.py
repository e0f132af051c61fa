"""A transcription of DyCo-RL's public arithmetic, for the side-by-side test (test_dyco_reference.py). Not used by
vppo-core.

Source: github.com/Sammy20207109/DyCo-RL at commit c73247fb8de2593c940975524a2409528937f8fe, under
src/open-r1-multimodal/src/open_r1/:
- qwen2_5vl_monkey_patch.py, `qwen2_5vl_model_forward`: the last decoder layer's attention weights reduced to
  img_ratio / text_ratio and the normalised img_attn / text_attn (the `if idx == len(self.layers) - 1 and
  qs_token_idx != 0` block);
- generation_utils.py, `GenerationMixin._batched_M_FR` (the M / FR distances) and `GenerationMixin._sample` (the
  per-step collection after each decoding step, "[DyCo-RL] Collect attention signals per decode step", and the
  scoring at the end, "Eq 6-9: FR classification + alignment score");
- trainer/grpo_trainer.py, `compute_loss`: "[DyCo-RL] Advantage reweight using sample_score".
The logging (prints) and the SAPO length penalty are left out; everything else is as written there, in torch.
"""

from __future__ import annotations

import torch


def batched_m_fr(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_batched_M_FR`: a, b [B, N] -> (M [B], FR [B])."""
    a_f = a.float().clamp(min=1e-12)
    b_f = b.float().clamp(min=1e-12)
    M_dist = (b_f - a_f).norm(dim=1)
    p = a_f / a_f.sum(dim=1, keepdim=True).clamp(min=1e-12)
    q = b_f / b_f.sum(dim=1, keepdim=True).clamp(min=1e-12)
    bc = (p * q).sqrt().sum(dim=1).clamp(0.0, 1.0)
    FR_dist = 2.0 * torch.arccos(bc)
    FR_dist = torch.where(torch.isfinite(FR_dist), FR_dist, torch.zeros_like(FR_dist))
    return M_dist, FR_dist


def last_layer_reduction(attn_weights: torch.Tensor, img_token_idx: int, qs_token_idx: int):
    """`qwen2_5vl_model_forward`'s last-layer block: attn_weights [B, H, q, K] (layer_outputs[1]) ->
    (img_ratio [B], text_ratio [B], img_attn [B, qs − img], text_attn [B, K − qs])."""
    attn = attn_weights
    attn = attn.mean(dim=(1, 2))  # [batch, seq_len]
    attn = attn.clamp(min=0)
    attn = attn / (attn.sum(dim=1, keepdim=True) + 1e-8)

    img_mask = torch.zeros_like(attn)
    text_mask = torch.zeros_like(attn)
    img_mask[:, img_token_idx:qs_token_idx] = 1
    text_mask[:, qs_token_idx:] = 1

    img_ratio = (attn * img_mask).sum(dim=1)
    text_ratio = (attn * text_mask).sum(dim=1)

    img_attn = attn[:, img_token_idx:qs_token_idx]
    text_attn = attn[:, qs_token_idx:]
    img_attn = img_attn / (img_attn.sum(dim=1, keepdim=True) + 1e-8)
    text_attn = text_attn / (text_attn.sum(dim=1, keepdim=True) + 1e-8)
    return img_ratio, text_ratio, img_attn, text_attn


def sample_scores(
    step_attention: list[torch.Tensor], img_token_idx: int, qs_token_idx: int, zscore: bool = True
) -> torch.Tensor:
    """`_sample`'s collection over the decoding steps and its score at the end. step_attention: one
    attn_weights [B, H, q, K_t] per forward of the decoding loop (the prefill first, K_t = P + t). Returns
    sample_score [B] (zscore -> tanh over the batch of the generate call; zscore=False, a flag of this
    transcription: the per-response score before that step)."""
    img_ratio_list, text_ratio_list, FR_img_list, FR_txt_list = [], [], [], []
    prev_img_attn = prev_text_attn = None
    for attn_weights in step_attention:
        _img_ratio, _text_ratio, cur_img_attn, cur_text_attn = last_layer_reduction(
            attn_weights, img_token_idx, qs_token_idx
        )
        img_ratio_list.append(_img_ratio)
        text_ratio_list.append(_text_ratio)
        if prev_img_attn is not None and cur_img_attn is not None:
            L_txt = min(prev_text_attn.shape[1], cur_text_attn.shape[1])
            _, fr_i = batched_m_fr(prev_img_attn, cur_img_attn)
            _, fr_t = batched_m_fr(prev_text_attn[:, :L_txt], cur_text_attn[:, :L_txt])
            FR_img_list.append(fr_i)
            FR_txt_list.append(fr_t)
        prev_img_attn = cur_img_attn.detach() if cur_img_attn is not None else None
        prev_text_attn = cur_text_attn.detach() if cur_text_attn is not None else None

    batch = step_attention[0].shape[0]
    sample_score = torch.zeros(batch, dtype=torch.float32)
    if len(FR_img_list) > 0:
        FR_img_t = torch.stack(FR_img_list, dim=1)
        FR_txt_t = torch.stack(FR_txt_list, dim=1)
        ir_stack = torch.stack(img_ratio_list, dim=1).float()
        tr_stack = torch.stack(text_ratio_list, dim=1).float()
        T_dist = FR_img_t.shape[1]
        ir_al = ir_stack[:, 1 : T_dist + 1] if ir_stack.shape[1] > T_dist else ir_stack[:, :T_dist]
        tr_al = tr_stack[:, 1 : T_dist + 1] if tr_stack.shape[1] > T_dist else tr_stack[:, :T_dist]
        if ir_al.shape[1] < T_dist:
            pad = T_dist - ir_al.shape[1]
            ir_al = torch.nn.functional.pad(ir_al, (0, pad), value=ir_al[:, -1:].mean())
            tr_al = torch.nn.functional.pad(tr_al, (0, pad), value=tr_al[:, -1:].mean())

        ratio_sum = (ir_al + tr_al).clamp(min=1e-8)
        ir_rel = ir_al / ratio_sum
        tr_rel = tr_al / ratio_sum

        FR_img_n = FR_img_t
        FR_txt_n = FR_txt_t

        tau = 0.05
        fr_diff = FR_img_n - FR_txt_n
        D_vis = fr_diff > 0
        D_txt = fr_diff < -tau

        s_t = ir_rel * D_vis.float() + tr_rel * D_txt.float()

        B = s_t.shape[0]
        for bi in range(B):
            active = D_vis[bi] | D_txt[bi]
            if active.sum() > 0:
                sample_score[bi] = torch.sigmoid(s_t[bi][active].mean())
            else:
                sample_score[bi] = 0.5

        if not zscore:
            return sample_score
        if sample_score.std() > 1e-8:
            sample_score = torch.tanh((sample_score - sample_score.mean()) / sample_score.std())
        else:
            sample_score = torch.zeros_like(sample_score)
    return sample_score


def reweighted_advantages(
    advantages: torch.Tensor, sample_score: torch.Tensor, completion_mask: torch.Tensor, num_params: float
) -> torch.Tensor:
    """`compute_loss`'s reweight: advantages [B], sample_score [B], completion_mask [B, C]."""
    sample_score = sample_score.to(advantages.dtype)
    comp_lengths = completion_mask.sum(dim=1).float()
    min_comp_len = 150 if num_params > 5e9 else 60
    short_mask = comp_lengths < min_comp_len
    sample_score = torch.where(short_mask, torch.full_like(sample_score, -1.0), sample_score)
    dyco_alpha = 0.2
    sample_weight = (1.0 + dyco_alpha * sample_score).clamp(0.8, 1.2)
    return advantages * sample_weight
