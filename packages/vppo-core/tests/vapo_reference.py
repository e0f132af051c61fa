"""Transcription of the arithmetic of VAPO's official code, for the side-by-side tests of `vppo_core`'s VAPO functions
(ALGORITHMS.md §9.12).

Repository ``xytian1008/VAPO``, commit ``67687cf33edd758db4b02e4659f9f6d30240b194`` (its only commit, 2026-04-18),
read from a local snapshot. Our own transcription, not a copy: the DataProto plumbing, the vLLM calls and the
tokenizer round trips are left out; what is kept is the arithmetic, in the code's order, with numpy as the code uses
it. Each function names the file and lines it transcribes.

=====================================================  ==========================================================
file                                                   what
=====================================================  ==========================================================
verl/workers/rollout/vllm_rollout_spmd.py:83-125       ``_extract_think_part``, ``_find_cutoff_positions``,
                                                       ``_sample_k_positions``
verl/workers/rollout/vllm_rollout_spmd.py:307-419      ``generate_anchors``: positions, anchored sequences, the
                                                       yes / no split, the comparison with the labels
verl/workers/fsdp_workers.py:574-596                   ``generate_anchors``: temperature 0, one token, the
                                                       ``allowed_token_ids`` (5 yes ids, then 5 no ids)
examples/reward_function/vapo.py:34-74                 ``anchor_reward`` (Eq. 4), ``compute_score``
=====================================================  ==========================================================

The greedy token under ``allowed_token_ids`` is vLLM's rule, not VAPO's code: every other logit is set to −inf and
temperature 0 takes the argmax (numpy's / torch's first maximum, i.e. the smallest token id on a tie);
`greedy_allowed_token` writes that out on full-vocabulary logits.
"""

from __future__ import annotations

import numpy as np

# vllm_rollout_spmd.py:75-80
NUM_CLAIMS = 20
ANCHOR_TOKEN_LIMIT = 6000
ANCHOR_TAIL_BUFFER = 128
# vllm_rollout_spmd.py:326-327
SEPARATORS = {",", ".", "\n", "!", "?", ";", ":"}
MIN_SEP_DIST = 2
# fsdp_workers.py:587 (Qwen2.5 ids of yes / Yes / True / true / 1, then 0 / no / No / False / false)
ALLOWED_TOKEN_IDS = [9693, 9454, 2514, 1866, 16, 15, 2152, 2753, 3849, 4049]


def extract_think_part(response: str) -> str:
    """vllm_rollout_spmd.py:83-91 ``_extract_think_part``."""
    think_end = response.find("</think>")
    if think_end != -1:
        return response[:think_end]
    boxed_start = response.find("\\boxed")
    if boxed_start != -1:
        return response[:boxed_start]
    return response


def find_cutoff_positions(think_part: str, max_pos: int, separators: set[str], min_sep_dist: int) -> np.ndarray:
    """vllm_rollout_spmd.py:94-107 ``_find_cutoff_positions``."""
    filtered, last_pos = [], -min_sep_dist - 1
    for pos, char in enumerate(think_part):
        if pos >= max_pos:
            break
        if char in separators and pos - last_pos >= min_sep_dist:
            filtered.append(pos)
            last_pos = pos
    return np.array(filtered, dtype=np.int32)


def sample_k_positions(positions: np.ndarray, k: int, rng, fallback_pos: int) -> np.ndarray:
    """vllm_rollout_spmd.py:110-125 ``_sample_k_positions`` (``rng``: anything with numpy's ``choice``)."""
    n_pos = len(positions)
    if n_pos == 0:
        return np.full(k, fallback_pos, dtype=np.int32)
    if k <= n_pos:
        return np.sort(rng.choice(positions, size=k, replace=False))
    return np.sort(np.concatenate([positions, np.full(k - n_pos, positions[-1], dtype=np.int32)]))


def anchor_positions(response: str, token_count: int, k: int, rng) -> np.ndarray:
    """vllm_rollout_spmd.py:334-349, steps 1 and 2 for one response (``token_count``: its row's
    ``attention_mask`` sum, prompt + response)."""
    think_part = extract_think_part(response)
    max_pos = len(think_part) - ANCHOR_TAIL_BUFFER if token_count > ANCHOR_TOKEN_LIMIT else len(think_part)
    positions = find_cutoff_positions(think_part, max_pos, SEPARATORS, MIN_SEP_DIST)
    return sample_k_positions(positions, k, rng, fallback_pos=len(response) - 1)


def anchored_sequences(decoded_prompt: str, response: str, anchors, claims: list[str], chosen_indices) -> list[str]:
    """vllm_rollout_spmd.py:354-362, step 3 for one response: one text per anchor."""
    out = []
    for anchor_idx, anchor_pos in enumerate(anchors):
        claim_text = claims[chosen_indices[anchor_idx]]
        anchor_question = f"\n<anchor>{claim_text} Is this claim correct? Answer (Yes/No): "
        out.append(decoded_prompt + response[: anchor_pos + 1] + anchor_question)
    return out


def greedy_allowed_token(logits: np.ndarray, allowed_token_ids: list[int]) -> int:
    """vLLM, temperature 0 with ``allowed_token_ids``: the other logits −inf, then the argmax over the vocabulary."""
    masked = np.full_like(logits, -np.inf)
    masked[allowed_token_ids] = logits[allowed_token_ids]
    return int(np.argmax(masked))


def predicted_labels(token_ids: list[int], allowed_token_ids: list[int]) -> list[int]:
    """vllm_rollout_spmd.py:388-401, step 5: the first half of the allowed ids are yes (1), the second half no (0)."""
    half = len(allowed_token_ids) // 2
    yes_token_ids = set(allowed_token_ids[:half])
    no_token_ids = set(allowed_token_ids[half:])
    out = []
    for token_id in token_ids:
        if token_id in yes_token_ids:
            out.append(1)
        elif token_id in no_token_ids:
            out.append(0)
        else:
            raise ValueError(f"Token id {token_id} is not in allowed_token_ids.")
    return out


def anchor_correct(pred_labels: np.ndarray, labels: list[list[str]], k: int) -> np.ndarray:
    """vllm_rollout_spmd.py:403-414, step 6: ``labels[i][j]`` is example i's ``label_{j+1}`` ("CORRECT" / "WRONG").
    The code compares anchor j with ``label_{j+1}``, whichever claim anchor j asked about (``chosen_indices``)."""
    n = len(labels)
    gt_labels = np.array([[1 if labels[i][j] == "CORRECT" else 0 for j in range(k)] for i in range(n)], dtype=int)
    return np.array(pred_labels, dtype=int).reshape(n, k) == gt_labels


def anchor_reward(response: str, anchor_correct: np.ndarray, anchor_position: np.ndarray, beta: float = 1.5) -> float:
    """examples/reward_function/vapo.py:34-46 ``anchor_reward`` (Eq. 4 and the chance rescaling)."""
    if anchor_correct.size == 0:
        return 0.0
    length_ratios = anchor_position / len(response)
    weights = np.exp(beta * length_ratios)
    weighted_score = np.sum(anchor_correct * weights) / np.sum(weights)
    return float(max((weighted_score - 0.5) / 0.5, 0.0))


def overall(
    accuracy_score: float, format_score: float, anchor_score: float | None, format_weight: float = 0.1,
    anchor_weight: float = 0.1,
) -> float:  # fmt: skip
    """examples/reward_function/vapo.py:49-68 ``compute_score``'s ``overall``, from its accuracy and format scores
    (mathruler's ``grade_answer`` and the format regex, which vppo_eval.reward grades: §8); ``anchor_score`` None:
    the branch without ``anchor_correct`` (what the published run takes, its anchor call being commented out)."""
    if anchor_score is not None:
        conditioned_anchor_score = anchor_score if accuracy_score == 1.0 else 0.0
        return (
            (1 - format_weight - anchor_weight) * accuracy_score
            + format_weight * format_score
            + anchor_weight * conditioned_anchor_score
        )
    return (1 - format_weight) * accuracy_score + format_weight * format_score
