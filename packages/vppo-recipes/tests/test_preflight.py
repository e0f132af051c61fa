"""`vppo-recipes preflight` (issue 29): the planner-vs-measured comparison against a plain computation, the reduced
models it builds, the kernel check's verdict, and the whole command on CPU at tiny sizes (the GPU path's code)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from vppo_recipes import preflight
from vppo_recipes.plan import load_arch_config

GIB = 1024**3


# ---------------------------------------------------------------------------------------------- compare_to_plan


def _line_through(x1, y1, x2, y2, x):
    """y at x on the straight line through (x1, y1), (x2, y2)."""
    return y1 + (y2 - y1) * (x - x1) / (x2 - x1)


def test_compare_to_plan_is_the_planners_growth_scaled_by_the_measured_one():
    # measured grows 6 GiB per depth step, planned 5: ratio 1.2
    c = preflight.compare_to_plan((1, 2), (10 * GIB, 16 * GIB), (9 * GIB, 14 * GIB), 28, 140 * GIB)
    assert c.measured_per_depth == 6 * GIB and c.planned_per_depth == 5 * GIB
    assert c.ratio == pytest.approx(1.2)
    # the planner's growth from depth 2 to full (126 GiB) scaled by 1.2, on top of the measured 16 GiB
    assert c.extrapolated_full == pytest.approx(16 * GIB + 1.2 * 126 * GIB)


def test_when_the_plan_is_linear_in_depth_the_extrapolation_is_the_measured_line():
    """A planner linear in depth (p = a + b d): the extrapolation is the straight line through the two measured
    points, evaluated at the full depth -- whatever offset or slope error the planner has."""
    a, b, full = 3.0 * GIB, 0.7 * GIB, 28
    plan = lambda d: a + b * d  # noqa: E731
    for measured in [(3.5 * GIB, 4.4 * GIB), (2.0 * GIB, 2.3 * GIB), (plan(4), plan(6))]:
        depths = (4, 6)
        c = preflight.compare_to_plan(depths, measured, (plan(4), plan(6)), full, plan(full))
        assert c.extrapolated_full == pytest.approx(
            _line_through(*depths[:1], measured[0], depths[1], measured[1], full)
        )
    # measured == planned: ratio 1 and the plan's own figure
    assert c.ratio == pytest.approx(1.0) and c.extrapolated_full == pytest.approx(plan(full))


def test_compare_to_plan_refuses_what_it_cannot_compare():
    with pytest.raises(ValueError, match="depths must increase"):
        preflight.compare_to_plan((2, 2), (1, 2), (1, 2), 28, 10)
    with pytest.raises(ValueError, match="does not grow with depth"):
        preflight.compare_to_plan((1, 2), (1, 2), (5, 5), 28, 10)


# ---------------------------------------------------------------------------------------------- reduced models


@pytest.mark.parametrize("model", ["Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen3-VL-8B-Instruct"])
def test_the_reduced_model_keeps_every_width_and_cuts_the_depth(model):
    arch = "qwen2_5_vl" if "2.5" in model else "qwen3_vl"
    full = load_arch_config(model, arch)
    small = preflight.reduced_depth_config(full, 2)
    assert small.text_config.num_hidden_layers == 2 and small.vision_config.depth == 2
    for key in ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_key_value_heads"):
        assert getattr(small.text_config, key) == getattr(full.text_config, key)
    for key in ("hidden_size", "intermediate_size", "num_heads", "out_hidden_size"):
        assert getattr(small.vision_config, key) == getattr(full.vision_config, key)
    for key in ("fullatt_block_indexes", "deepstack_visual_indexes"):
        assert all(0 <= i < 2 for i in getattr(small.vision_config, key, None) or [])
    assert full.text_config.num_hidden_layers > 2  # the stored config itself is untouched
    # it builds (meta: no memory) with 2 decoder layers of the full width
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    cls = Qwen2_5_VLForConditionalGeneration if arch == "qwen2_5_vl" else Qwen3VLForConditionalGeneration
    with torch.device("meta"):
        m = cls(small)
    layers = m.model.language_model.layers
    assert len(layers) == 2 and layers[0].mlp.up_proj.weight.shape[0] == full.text_config.intermediate_size


def test_synthetic_images_fill_max_pixels_in_whole_merged_patches():
    assert preflight.synthetic_image_size("qwen2_5_vl", 1003520) == 952  # 17 x 56; 952^2 <= 1003520 < 1008^2
    assert 952**2 <= 1003520 < 1008**2
    assert preflight.synthetic_image_size("qwen3_vl", 1003520) % 64 == 0
    assert preflight.synthetic_image_size("qwen2_5_vl", None) == 56


# ---------------------------------------------------------------------------------------------- the kernel check


def test_kernel_part_matches_float64_and_names_its_ratios():
    k = preflight.kernel_part(
        hidden_size=32, vocab=300, positions=40, dtype="float32", chunk_size=16, temperature=1.0, device="cpu",
        repeats=1,
    )  # fmt: skip
    assert k["error"]["kernel"] < 1e-5 and k["error"]["naive"] < 1e-5 and k["error"]["positions"] == 40
    for key in ("forward", "forward_backward"):
        assert k[key]["time_ratio"] > 0 and math.isfinite(k[key]["memory_ratio"])
    assert preflight.kernel_verdict(k["error"]) is None


def test_kernel_verdict_fails_a_kernel_worse_than_the_naive_path():
    assert preflight.kernel_verdict({"kernel": 1e-3, "naive": 1e-4}) is not None
    assert preflight.kernel_verdict({"kernel": float("nan"), "naive": 1e-4}) is not None
    assert preflight.kernel_verdict({"kernel": 2e-4, "naive": 1e-4}) is None


def test_naive_and_float64_paths_are_log_softmax_of_the_logits():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(5, 8, generator=g), torch.randn(11, 8, generator=g)
    labels = torch.tensor([0, 3, 10, 7, 1])
    logits = (h.double() @ w.double().T) / 0.7
    expected = logits - torch.logsumexp(logits, -1, keepdim=True)
    expected = expected[torch.arange(5), labels]
    torch.testing.assert_close(preflight.float64_logprobs(h, w, labels, 0.7), expected)
    torch.testing.assert_close(preflight.naive_logprobs(h, w, labels, 0.7).double(), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from vppo_rollout.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("preflight") / "tiny", "qwen2_5_vl", seed=0)


# The shipped tiny_vppo config on the tiny checkpoint, with shorter responses and one small micro-batch so that the
# two steps take seconds (the config's own sizes: README, "Preflight").
FAST = ["rollout.max_new_tokens=16", "batch.micro_batch_size=4", "rollout.group_size=4"]


@pytest.mark.timeout(300)
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None,
    reason="vLLM is importable here (nox -s tests_vllm): part 5 would start the engine on the tiny checkpoint, whose "
    "head dim its CPU attention refuses; this test checks the path without vLLM, in nox -s tests",
)
def test_preflight_of_tiny_vppo_passes_on_cpu(tiny_ckpt, tmp_path, monkeypatch, capsys):
    from vppo_recipes.cli import main

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what `--device cpu` sets; restored after the test
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "preflight.json"
    argv = ["preflight", "--config", "tiny_vppo", f"model.path={tiny_ckpt}", *FAST, "--device", "cpu"]
    assert main([*argv, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["passed"] and report["device"] == "cpu"
    status = {p["part"]: p["status"] for p in report["parts"]}
    assert list(status.values()) == ["ok", "ok", "ok", "skipped", "skipped"], status
    for p in report["parts"]:
        assert f"| {p['part']} | {p['status']} |" in table
    env, kernel, step = (report["parts"][i]["details"] for i in range(3))
    assert env["torch"] == torch.__version__
    assert kernel["shape"] == {"positions": 4 * 16, "hidden": 64, "vocab": 704, "dtype": "float32"}
    assert kernel["error"]["kernel"] < 1e-5
    # a real step at both depths: an optimizer step, the config's micro-batch, planner figures that grow with depth
    for d in ("1", "2"):
        assert step["steps"][d]["optimizer_steps"] >= 1
    assert step["geometry"]["micro_batch"] == 4 and step["geometry"]["response"] <= 16
    cmp = step["comparison"]
    assert cmp["planned"][1] > cmp["planned"][0] > 0 and cmp["full_depth"] == 2
    assert cmp["planned_full"] == cmp["planned"][1]  # the tiny model's full depth is 2: the same model, planned twice
    assert step["memory_check"].startswith("skipped on CPU")
    assert "FSDP2 over NCCL needs more than one" in report["parts"][3]["summary"]


def test_a_failed_part_makes_the_command_fail_and_says_why(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory at depth 2")

    monkeypatch.setattr(preflight, "kernel_part", broken)
    monkeypatch.setattr(preflight, "rl_step_part", lambda *a, **k: ("ok", "not run here", {}))
    # where vLLM is importable (nox -s tests_vllm) part 5 would build the 7B's depth-1 model for the engine
    monkeypatch.setattr(preflight, "vllm_part", lambda *a, **k: ("ok", "not run here", {}))
    out = tmp_path / "p.json"
    # model.path names the stored architecture (no download): the kernel part reads [V, H] from it
    rc = preflight.main(["--config", "qwen2_5_vl_7b_vppo", "--device", "cpu", "--out", str(out)])
    assert rc == 1
    report = json.loads(out.read_text())
    row = next(p for p in report["parts"] if p["part"].startswith("2"))
    assert row["status"] == "FAILED" and "out of memory at depth 2" in row["summary"]
    assert "preflight FAILED" in capsys.readouterr().out


def test_a_spent_budget_fails_the_parts_it_did_not_start(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "kernel_part", lambda **k: (_ for _ in ()).throw(AssertionError("started")))
    results = preflight.run_preflight(
        preflight.Path(preflight.__file__).parent / "configs" / "tiny_vppo.yaml", device="cpu", budget_s=-1,
        work=tmp_path,
    )  # fmt: skip
    assert [r.status for r in results] == ["ok", "FAILED", "FAILED", "FAILED", "FAILED"]
    assert "budget" in results[1].summary


def test_a_bad_override_is_one_message_before_anything_runs(capsys):
    assert preflight.main(["--config", "tiny_vppo", "rollout.group_size", "--device", "cpu"]) == 2
    assert "vppo-recipes preflight:" in capsys.readouterr().err


def test_step_config_keeps_the_method_and_sizes_and_redirects_the_rest(tmp_path):
    from vppo_recipes.cli import load_run_config, resolve_config
    from vppo_recipes.config_schema import validate_config

    raw = load_run_config(["--config", str(resolve_config("qwen2_5_vl_7b_vppo"))])
    cfg = preflight.step_config(raw, model_path=tmp_path / "m", task=tmp_path / "t", output_dir=tmp_path / "o")
    full = validate_config(raw, "rl")  # the config's own values with the schema's defaults
    assert cfg.algorithm == full.algorithm and cfg.loss == full.loss and cfg.model.dtype == "bfloat16"
    assert cfg.batch.micro_batch_size == 16 and cfg.batch.max_tokens_per_micro_batch == 16384  # row cap + budget
    assert cfg.rollout.group_size == 8 and cfg.rollout.max_new_tokens == 2048
    assert cfg.training.activation_checkpointing is True
    # ceil(16 / 8) = 2 prompts' responses fill the largest micro-batch; one rank; embedded sampler; nothing filtered,
    # nothing resumed
    assert cfg.rollout.batch_prompts == cfg.batch.update_prompts == 2
    assert (cfg.world.nproc_per_node, cfg.rollout.engine, cfg.rollout.online_filter) == (1, "transformers", False)
    assert cfg.training.resume == "never" and cfg.model.path == str(tmp_path / "m")
    assert cfg.metric_logger._component_ == "vppo_recipes.metric_logging.JsonlLogger"


def test_the_cli_hides_the_gpus_only_when_asked_for_cpu():
    from vppo_recipes.cli import _asks_for_cpu

    assert _asks_for_cpu(["--config", "x", "--device", "cpu"]) and _asks_for_cpu(["--device=cpu"])
    assert not _asks_for_cpu(["--device", "cuda"]) and not _asks_for_cpu(["--out", "cpu"])
