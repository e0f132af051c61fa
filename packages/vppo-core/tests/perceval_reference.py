"""Transcription of the token-penalty arithmetic of Perceval's official code, ``RUCAIBox/Perceval``.

For side-by-side tests of vppo-core's `flagged_token_spans`, `perceval_penalty_mask`, `perceval_token_advantages`
and `perceval_token_weights` (ALGORITHMS.md §9.14). What the official code computes, in its operation order and
dtypes; our own code, not a copy: the DataProto plumbing, the HTTP calls to the PRM, logging, printing, the thread
pool and the retry loops are left out, and the tokenizer is replaced by its ``offset_mapping`` (the one thing the
position finder reads from it).

Read from the local snapshot of the repository at commit ``4ef2db64336e87e44c63f13447297ab26d03acac`` (2026-06-10,
"fix:readme"), with ``git show HEAD:<path>``:

- ``verl/trainer/ppo/core_algos.py``, ``compute_TRM_outcome_advantage`` (registered as the ``trm`` advantage
  estimator, lines 1097-1181): the GRPO advantage, then ``scores − |scores|·penalty_percentage`` where the penalty
  mask is set.
- ``verl/trainer/ppo/ray_trainer.py``, ``create_penalty_mask_vectorized`` (lines 207-244) and its call in
  ``compute_advantage`` (``AdvantageEstimator.TRM``, lines 306-324).
- ``verl/workers/reward_manager/trm.py``, ``pad_nested_list`` (the ragged per-response span lists padded with -100).
- ``verl/utils/reward_score/hallu_token_reward_vstar.py``, ``SerialTokenPositionFinder._find_single_substring``,
  ``find_substring_positions``, ``process_verify`` (the ``-1`` regions dropped) and
  ``extract_judgement_from_response``.
"""

from __future__ import annotations

import ast
from collections import defaultdict

import numpy as np
import torch


def official_extract_judgement(response_text: str):
    """hallu_token_reward_vstar.py ``extract_judgement_from_response``: the list in the first <answer>…</answer>.
    Falls off its end (returns None) when the content is neither "The response is correct" nor list-shaped."""
    start_tag, end_tag = "<answer>", "</answer>"
    start_idx = response_text.find(start_tag)
    if start_idx == -1:
        return []
    start_idx += len(start_tag)
    end_idx = response_text.find(end_tag, start_idx)
    if end_idx == -1:
        return []
    answer_content = response_text[start_idx:end_idx].strip()
    if "The response is correct" in answer_content:
        return []
    if answer_content.startswith("[") and answer_content.endswith("]"):
        try:
            result = ast.literal_eval(answer_content)
            return result if isinstance(result, list) else []
        except (ValueError, SyntaxError):
            return []
    return None


def official_find_single_substring(full_text: str, substring, offsets) -> tuple[int, int, str]:
    """hallu_token_reward_vstar.py ``SerialTokenPositionFinder._find_single_substring``: (token_start, token_end,
    status); any exception (e.g. a non-str item) gives status "error" and (-1, -1)."""
    try:
        char_start = full_text.find(substring)
        if char_start == -1:
            return -1, -1, "not_found"
        char_end = char_start + len(substring)
        token_start = None
        token_end = None
        for i, (start, end) in enumerate(offsets):
            if token_start is None and start <= char_start < end:
                token_start = i
            if start < char_end <= end:
                token_end = i + 1
                break
            elif start == char_end:
                token_end = i
                break
        if token_start is None:
            for i, (start, _end) in enumerate(offsets):
                if start >= char_start:
                    token_start = i
                    break
            else:
                token_start = len(offsets)
        if token_end is None:
            for i, (start, _end) in enumerate(offsets):
                if start >= char_end:
                    token_end = i
                    break
            else:
                token_end = len(offsets)
        if token_start is not None and token_end is not None and token_start <= token_end:
            return token_start, token_end, "success"
        return -1, -1, "error"
    except Exception:
        return -1, -1, "error"


def official_positions(full_text: str, judgement, offsets) -> list[list[int]]:
    """``find_substring_positions`` then ``process_verify``'s filter: the [start, end] of every substring whose
    region holds no -1 (not found and error both give -1)."""
    if not judgement:
        return []
    regions = []
    for substring in judgement:
        start, end, _ = official_find_single_substring(full_text, substring, offsets)
        region = [start, end]
        if -1 in region:
            continue
        regions.append(region)
    return regions


def official_pad_nested_list(data, padding_value=0):
    """trm.py ``pad_nested_list``: a ragged nested list padded to its bounding shape (as rewritten here: the same
    result for the depth-3 lists of [start, end] pairs the reward manager pads)."""
    shape: list[int] = []

    def get_target_shape(lst, level=0):
        if not isinstance(lst, list):
            return
        while level >= len(shape):
            shape.append(0)
        shape[level] = max(shape[level], len(lst))
        for item in lst:
            get_target_shape(item, level + 1)

    get_target_shape(data)

    def create_padding_element(sub_shape, value):
        if not sub_shape:
            return value
        return [create_padding_element(sub_shape[1:], value)] * sub_shape[0]

    def pad_to_shape(lst, sub_shape):
        if not isinstance(lst, list):
            return create_padding_element(sub_shape, lst)
        if not sub_shape:
            return lst
        padded = [pad_to_shape(item, sub_shape[1:]) for item in lst]
        missing = sub_shape[0] - len(padded)
        if missing > 0:
            padded.extend([create_padding_element(sub_shape[1:], padding_value)] * missing)
        return padded

    return pad_to_shape(data, shape)


def official_penalty_mask(ranges_list, response_mask: torch.Tensor) -> torch.Tensor:
    """ray_trainer.py ``create_penalty_mask_vectorized``: zeros like the response mask, 1 on every
    ``start ≤ t ≤ min(end − 1, L − 1)`` of each region without a -100, regions starting at or after L skipped."""
    new_mask = torch.zeros_like(response_mask)
    row_indices, col_indices = [], []
    response_length = new_mask.shape[1]
    for i, batch_item in enumerate(ranges_list):
        for region in batch_item:
            if -100 in region:
                continue
            start, end = region[0], region[1]
            if start >= response_length:
                continue
            effective_end = min(end - 1, response_length - 1)
            num_elements = effective_end - start + 1
            if num_elements > 0:
                row_indices.extend([i] * num_elements)
                col_indices.extend(range(start, effective_end + 1))
    if row_indices:
        rows = torch.tensor(row_indices, dtype=torch.long, device=new_mask.device)
        cols = torch.tensor(col_indices, dtype=torch.long, device=new_mask.device)
        new_mask[rows, cols] = 1
    return new_mask


def official_trm_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    penalty_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """core_algos.py ``compute_TRM_outcome_advantage``: GRPO per uid (a singleton group: mean 0, std 1; the std
    unbiased), times the response mask, then ``scores − |scores|·penalty_percentage`` where the mask is set."""
    scores = token_level_rewards.sum(dim=-1)
    id2score = defaultdict(list)
    id2mean, id2std = {}, {}
    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx] = torch.tensor(0.0)
                id2std[idx] = torch.tensor(1.0)
            elif len(id2score[idx]) > 1:
                id2mean[idx] = torch.mean(torch.tensor(id2score[idx]))
                id2std[idx] = torch.std(torch.tensor([id2score[idx]]))
            else:
                raise ValueError(f"no score in prompt index: {idx}")
        for i in range(bsz):
            if norm_adv_by_std_in_grpo:
                scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
            else:
                scores[i] = scores[i] - id2mean[index[i]]
        scores = scores.unsqueeze(-1) * response_mask
        penalty_percentage = (config or {}).get("penalty_percentage", 0.1)
        penalty_values = torch.abs(scores) * penalty_percentage
        scores = torch.where(penalty_mask.bool(), scores - penalty_values, scores)
    return scores, scores
