"""The SFT recipe: log-prob alignment, 2-process `tune run` training on the synthetic task (loss falls, checkpoint
reloads), single- vs 2-process equality of the first step, exact resume, and errors before any compute.

The launches go through `python -m vppo_recipes.cli run ...` from a temporary directory that holds the tiny model
and the task under ./runs/, i.e. the shipped `tiny_sft` config used as a user would use it.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vppo_recipes.checkpointing import find_latest_checkpoint
from vppo_recipes.config_schema import ConfigError
from vppo_recipes.data import VisualQADataset
from vppo_recipes.metric_logging import read_jsonl
from vppo_recipes.sft.sft_distributed import target_logprobs
from vppo_recipes.sharding import call_in_root_forward
from vppo_rollout.collate import collate_rollout, model_inputs
from vppo_rollout.loading import load_policy, load_processor
from vppo_rollout.prompts import build_prompt

STEPS = 8
# Small but real: 32 training rows, global batch 16 (8 per rank, one micro-batch each).
COMMON = ["training.save_every_n_steps=4", "batch.batch_size=16", "batch.micro_batch_size=8"]


def _launch(cwd: Path, *args: str, nproc: int | None = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    flags = ["--nproc_per_node", str(nproc)] if nproc else []
    cmd = [sys.executable, "-m", "vppo_recipes.cli", "run", "sft_distributed", *flags, "--config", "tiny_sft", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def _metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "logs" / "metrics.jsonl")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A user's directory: ./runs/tiny_ckpt (tiny Qwen2.5-VL) and ./runs/visual_task (synthetic task)."""
    from vppo_eval.synthetic import build_visual_task
    from vppo_rollout.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("user_dir")
    build_tiny_checkpoint(root / "runs" / "tiny_ckpt", "qwen2_5_vl", seed=0)
    build_visual_task(root / "runs" / "visual_task", n_train=32, n_test=8, seed=0)
    return root


@pytest.fixture(scope="module")
def uninterrupted(workspace) -> Path:
    """2-process run of STEPS steps (checkpoints at 4 and 8)."""
    _ok(_launch(workspace, "output_dir=runs/sft_a", f"training.max_steps={STEPS}", *COMMON))
    return workspace / "runs" / "sft_a"


def test_target_logprobs_equal_log_softmax_of_the_full_logits(workspace):
    """Target j is read at position P-1+j: the chunked hidden-state path equals the model's own logits."""
    model, processor = load_policy(workspace / "runs/tiny_ckpt"), load_processor(workspace / "runs/tiny_ckpt")
    ds = VisualQADataset.from_source(workspace / "runs/visual_task", "train")
    examples = [ds.example(i) for i in range(3)]
    prompts = [build_prompt(processor, ex.question, ex.images) for ex in examples]
    targets = [processor.tokenizer(f"\\boxed{{{ex.answer}}}" * (i + 1))["input_ids"] for i, ex in enumerate(examples)]
    batch = collate_rollout(processor, prompts, targets, config=model.config)
    P, L = batch["prompt_length"], batch["responses"].shape[1]
    with torch.no_grad():
        lp = call_in_root_forward(model, target_logprobs, model_inputs(batch), batch["responses"], P, chunk_size=5)
        logits = model(**model_inputs(batch)).logits[:, P - 1 : P - 1 + L].float()
    ref = logits.log_softmax(-1).gather(-1, batch["responses"].unsqueeze(-1)).squeeze(-1)
    mask = batch["response_mask"] > 0
    assert mask.sum() < mask.numel()  # ragged targets: padding really is present
    torch.testing.assert_close(lp[mask], ref[mask], rtol=0, atol=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_sft_loss_falls_and_the_checkpoint_reloads(uninterrupted):
    metrics = _metrics(uninterrupted)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    losses = [m["loss"] for m in metrics]
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(m["tokens"] > 0 and m["grad_norm"] > 0 for m in metrics)
    ckpt = find_latest_checkpoint(uninterrupted)
    assert ckpt is not None and ckpt.name == f"step_{STEPS:06d}"
    model, processor = load_policy(ckpt), load_processor(ckpt)  # plain transformers folder + processor files
    initial = load_policy(uninterrupted.parent / "tiny_ckpt")
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), initial.parameters()))
    assert moved > 1e-3  # the saved weights are the trained ones
    assert processor.tokenizer("<|im_end|>")["input_ids"] == [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.distributed
@pytest.mark.slow
def test_single_process_first_step_equals_two_process_first_step(workspace, uninterrupted):
    """Same global batch on 1 rank (2 micro-batches) and on 2 ranks (1 each): the same token-mean loss and the
    same gradient norm, which checks the ×world / global-token normalisation of the loss."""
    _ok(
        _launch(
            workspace,
            "output_dir=runs/sft_single",
            "world.nproc_per_node=1",
            "training.max_steps=1",
            *COMMON,
            nproc=None,
        )
    )
    one = _metrics(workspace / "runs" / "sft_single")[0]
    two = _metrics(uninterrupted)[0]
    # fp32; different padding and reduction order between the two layouts: agreement to ~1e-6 relative.
    assert one["tokens"] == two["tokens"]
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-4)


@pytest.mark.distributed
@pytest.mark.slow
def test_resumed_run_continues_exactly_like_the_uninterrupted_one(workspace, uninterrupted):
    run = workspace / "runs" / "sft_b"
    _ok(_launch(workspace, "output_dir=runs/sft_b", "training.max_steps=4", *COMMON))
    # What a kill at step 5 leaves behind: a logged line past the checkpoint and a half-written checkpoint folder.
    with open(run / "logs" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")
    (run / "checkpoints" / ".tmp_step_000006").mkdir()
    proc = _launch(workspace, "output_dir=runs/sft_b", f"training.max_steps={STEPS}", *COMMON)
    _ok(proc)
    assert f"resumed from {run}/checkpoints/step_000004 at step 4" in proc.stdout  # output_dir made absolute
    final = (run / "checkpoints" / f"step_{STEPS:06d}").resolve()
    assert f"SFT done at step {STEPS}; final checkpoint: {final}\n" in proc.stdout  # absolute: usable from anywhere
    resumed, reference = _metrics(run), _metrics(uninterrupted)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, reference):
        for key in ("loss", "grad_norm", "tokens", "lr"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])  # same ops in the same order: bit-identical
    final_a = load_file(find_latest_checkpoint(uninterrupted) / "model.safetensors")
    final_b = load_file(find_latest_checkpoint(run) / "model.safetensors")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_unknown_config_key_fails_before_any_compute(monkeypatch):
    from vppo_recipes.sft import sft_distributed

    config = Path(sft_distributed.__file__).parent.parent / "configs" / "tiny_sft.yaml"
    monkeypatch.setattr(sys, "argv", ["sft", "--config", str(config), "training.max_step=3"])
    with pytest.raises(ConfigError, match=r"did you mean 'training\.max_steps'"):
        sft_distributed.recipe_main()
    import torch.distributed as dist

    assert not dist.is_initialized()  # nothing was started


def _sft_recipe_in_process(workspace: Path, tmp_path: Path, *overrides: str, run):
    """Build the SFT recipe in this process (a 1-rank gloo group) on `workspace`'s tiny model and task, then
    `run(recipe)` while the process group is up; returns what `run` returns."""
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from vppo_recipes.config_schema import validate_config
    from vppo_recipes.sft.sft_distributed import SFTRecipeDistributed

    config = Path(__file__).resolve().parents[1] / "src" / "vppo_recipes" / "configs" / "tiny_sft.yaml"
    dotlist = [
        f"output_dir={tmp_path / 'run'}",
        f"model.path={workspace / 'runs' / 'tiny_ckpt'}",
        f"data.source={workspace / 'runs' / 'visual_task'}",
        "world.nproc_per_node=1",
        "batch.batch_size=4",
        "batch.micro_batch_size=4",
        *overrides,
    ]
    cfg = validate_config(OmegaConf.merge(OmegaConf.load(config), OmegaConf.from_dotlist(dotlist)), "sft")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        recipe = SFTRecipeDistributed(cfg)
        recipe.setup(cfg)
        out = run(recipe)
        recipe.metric_logger.close()
    finally:
        dist.destroy_process_group()
    return out


def test_an_sft_step_made_non_finite_by_clipping_is_skipped_counted_and_never_applied(workspace, tmp_path, monkeypatch):
    """Issue 23: the SFT recipe, like the RL one, checked only the norm before clipping, so a NaN clip scale
    (`training.grad_clip=.nan`, refused by the config now) applied NaN gradients. The guard reads the clipped grads."""
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, **kw: real_clip(params, float("nan"))
    )

    def one_step(recipe):
        before = {k: v.full_tensor().detach().clone() for k, v in recipe.model.state_dict().items()}
        metrics = recipe.train_step(recipe.stream.take(recipe.batch_size))
        after = {k: v.full_tensor().detach().clone() for k, v in recipe.model.state_dict().items()}
        return metrics, dict(recipe.totals), all(torch.equal(before[k], v) for k, v in after.items())

    metrics, totals, unchanged = _sft_recipe_in_process(workspace, tmp_path, run=one_step)
    assert metrics["skipped_step"] == 1.0 and totals["skipped_steps_nonfinite"] == 1.0
    assert unchanged, "a non-finite update was applied"


def test_rows_whose_prompt_cannot_be_built_are_counted_skips_and_the_sft_step_trains_on_the_rest(
    workspace, tmp_path, capsys
):
    """Issue 23 (the SFT data path): a row with two <image> placeholders for one image, or one 10000x10 image, is
    skipped as bad_prompt, named on stderr with its row and file, counted; the step trains on the good rows."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _bad_rows import write_rows

    source = write_rows(tmp_path / "bad", ["good", "two_placeholders", "good", "wide", "good", "good"])

    def one_step(recipe):
        batch = recipe.stream.take(recipe.batch_size)
        return recipe.train_step(batch), dict(recipe.stream.skipped)

    metrics, skipped = _sft_recipe_in_process(
        workspace, tmp_path, f"data.source={source}", "data.shuffle=false", run=one_step
    )
    assert skipped == {"bad_prompt": 2} and metrics["skipped_step"] == 0.0
    err = capsys.readouterr().err
    assert f"skipped row 1 of {source} (split train): bad_prompt: row 1: question: has 2 '<image>' placeholders" in err
    assert f"skipped row 3 of {source} (split train): bad_prompt: row 3: image aspect ratio must be < 200" in err


@pytest.mark.slow
def test_missing_dataset_column_is_a_clear_error_naming_the_key(workspace):
    proc = _launch(
        workspace, "output_dir=runs/sft_badcol", "world.nproc_per_node=1", "data.columns.question=question", nproc=None
    )
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "column 'question' (the question column) is not in the dataset" in err
    assert "Set data.columns.question=" in err
    assert not (workspace / "runs" / "sft_badcol" / "checkpoints").exists()


@pytest.mark.slow
def test_rows_whose_target_is_too_long_are_counted_and_never_trained_on_silently(workspace):
    proc = _launch(
        workspace, "output_dir=runs/sft_long", "world.nproc_per_node=1", "data.max_response_length=3", nproc=None
    )
    assert proc.returncode != 0
    # the error names the data source and its split (the task folder's train split)
    assert re.search(
        r"no usable row in a full pass over \S*visual_task \(split train\) \(32 rows\); "
        r"skips so far: \{'response_too_long': 32\}",
        proc.stderr + proc.stdout,
    ), proc.stderr[-2000:]


@pytest.mark.slow
def test_resuming_from_a_checkpoint_of_another_model_fails_before_any_compute(workspace):
    from vppo_rollout.tiny import build_tiny_checkpoint

    run = workspace / "runs" / "sft_other"
    ckpt = build_tiny_checkpoint(run / "checkpoints" / "step_000003", "qwen3_vl", seed=0)
    (ckpt / "vppo_checkpoint.json").write_text(json.dumps({"format_version": 1, "step": 3, "arch": "qwen3_vl"}))
    proc = _launch(workspace, "output_dir=runs/sft_other", "world.nproc_per_node=1", nproc=None)
    assert proc.returncode != 0
    assert "holds a 'qwen3_vl' model but model.arch is 'qwen2_5_vl'" in proc.stderr + proc.stdout
    assert not (run / "logs").exists()  # stopped before the logger, the model and the data were set up


def test_sft_with_lora_trains_the_adapters_alone_and_resumes_from_its_adapter_checkpoint(workspace, tmp_path):
    """`model.lora.rank=4` (dropout allowed in SFT): one step moves every adapter's B and no base weight; the
    checkpoint holds the adapter alone and verifies; a relaunch in the same folder resumes from model.path plus that
    adapter, with the saved adapter weights and the optimizer's step count."""
    from vppo_recipes.checkpointing import verify_checkpoint

    lora = ("model.lora.rank=4", "model.lora.dropout=0.1", "optimizer.lr=1e-3")

    def step_and_save(recipe):
        before = {k: v.full_tensor().detach().clone() for k, v in recipe.model.state_dict().items()}
        metrics = recipe.train_step(recipe.stream.take(recipe.batch_size))
        recipe.step = 1
        after = {k: v.full_tensor().detach().clone() for k, v in recipe.model.state_dict().items()}
        recipe.save_checkpoint()
        return metrics, before, after

    metrics, before, after = _sft_recipe_in_process(workspace, tmp_path, *lora, run=step_and_save)
    assert math.isfinite(metrics["loss"])
    assert all(torch.equal(after[k], before[k]) for k in after if ".lora_" not in k), "a frozen weight moved"
    assert min((after[k] - before[k]).abs().max() for k in after if ".lora_B." in k) > 0
    ckpt = find_latest_checkpoint(tmp_path / "run")
    assert verify_checkpoint(ckpt) == [] and not (ckpt / "model.safetensors").exists()
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert len(saved) == 28

    def resumed(recipe):
        state = {k: v.full_tensor().detach().clone() for k, v in recipe.model.state_dict().items()}
        steps = {int(s["step"]) for s in recipe.optimizer.state.values()}
        return recipe.step, state, steps

    step, state, optimizer_steps = _sft_recipe_in_process(workspace, tmp_path, *lora, run=resumed)
    assert step == 1 and optimizer_steps == {1}
    assert all(torch.equal(state[k], after[k]) for k in after)  # base from model.path, adapter from the checkpoint


def test_an_sft_step_with_a_token_budget_equals_the_fixed_micro_batch_step(workspace, tmp_path):
    """batch.max_tokens_per_micro_batch=330 (rows of ~105 positions: 3 per micro-batch, longest first, 8 at most)
    against 2 rows per micro-batch in data order, from the same weights on the same 8 rows: the same loss and the
    same parameters within float reassociation; every micro-batch within the budget; the padding fraction is the
    plain count of the positions."""

    def one_step(recipe):
        seen = []
        split = recipe.micro_batches

        def recording(mine):
            parts = split(mine)
            seen.extend(parts)
            return parts

        recipe.micro_batches = recording
        metrics = recipe.train_step(recipe.stream.take(recipe.batch_size))
        after = {k: v.full_tensor().detach().clone() for k, v in recipe.model.state_dict().items()}
        return metrics, after, seen

    common = ("batch.batch_size=8", "data.max_prompt_length=80", "data.max_response_length=32", "data.shuffle=false")
    fixed, after_fixed, fixed_split = _sft_recipe_in_process(
        workspace, tmp_path / "fixed", *common, "batch.micro_batch_size=2", run=one_step
    )
    budget, after_budget, budget_split = _sft_recipe_in_process(
        workspace, tmp_path / "budget", *common, "batch.micro_batch_size=8", "batch.max_tokens_per_micro_batch=330",
        run=one_step,
    )  # fmt: skip
    assert [len(m) for m in fixed_split] == [2, 2, 2, 2] and [len(m) for m in budget_split] != [2, 2, 2, 2]
    assert budget["loss"] == pytest.approx(fixed["loss"], rel=1e-6) and budget["tokens"] == fixed["tokens"]
    worst = max((after_budget[k] - v).abs().max().item() for k, v in after_fixed.items())
    assert worst <= 1e-5, worst
    for split, metrics in ((fixed_split, fixed), (budget_split, budget)):
        computed = padding = 0
        for micro in split:
            width = max(p.num_tokens for p, _ in micro) + max(len(ids) for _, ids in micro)
            computed += len(micro) * width
            padding += sum(width - p.num_tokens - len(ids) for p, ids in micro)
            assert split is fixed_split or len(micro) * width <= 330
        assert metrics["throughput/padding_fraction"] == pytest.approx(padding / computed, abs=1e-12)
