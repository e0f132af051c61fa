"""`check_sample_arguments`: the argument checks both engines' `sample` share, tested here without a model or vLLM
(the vLLM engine's own tests need the vllm venv, `nox -s tests_vllm`)."""

from __future__ import annotations

import pytest

from vppo_rollout.sampling import SamplingConfig, check_sample_arguments

PROMPTS = ("p0", "p1")  # the checks only count prompts; engines check their type where they encode them


def test_returns_prompts_as_a_list_n_and_the_checkpoint_eos_by_default():
    prompts, n, stop = check_sample_arguments(iter(PROMPTS), 3, SamplingConfig(), (7, 8))
    assert prompts == list(PROMPTS) and n == 3 and stop == [7, 8]


def test_the_config_stop_ids_win_over_the_checkpoint_eos_even_when_it_has_none():
    assert check_sample_arguments(PROMPTS, 1, SamplingConfig(stop_token_ids=(5,)), ())[2] == [5]


@pytest.mark.parametrize(
    ("prompts", "n", "sampling", "eos", "match"),
    [
        (PROMPTS, 0, SamplingConfig(), [1], "n: expected the group size"),
        (PROMPTS, True, SamplingConfig(), [1], "n: expected the group size"),
        (PROMPTS, 1.5, SamplingConfig(), [1], "n: expected the group size"),
        (PROMPTS, 2, {"temperature": 1.0}, [1], "sampling: expected a SamplingConfig, got dict"),
        ([], 2, SamplingConfig(), [1], "prompts: empty list"),
        (PROMPTS, 2, SamplingConfig(), [], r"stop_token_ids: the checkpoint defines no EOS token; pass SamplingConfig"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(prompts, n, sampling, eos, match):
    with pytest.raises(ValueError, match=match):
        check_sample_arguments(prompts, n, sampling, eos)
