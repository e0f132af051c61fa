"""Issue 23: paths resolved once; evaluation results belong to one model and one item set; a benchmark that keeps no
item is an error unless asked for. Each case was a wrong result with exit 0."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vppo_eval import cli
from vppo_eval.benchmarks import fixture_path
from vppo_eval.evaluate import CONFIG_FILE, ITEMS_FILE, RESULTS_FILE, evaluate, read_items
from vppo_eval.records import Record

FIXTURES = fixture_path("geo3k").parent
SHAREGPT = FIXTURES / "sharegpt"
# Items each benchmark's sharegpt fixture holds (read from its absolute path).
KEPT = {"mathverse": 3, "dynamath": 2, "mmk12": 3, "geo3k": 3, "mathvision": 3, "wemath": 3, "logicvista": 3,
        "mmmu_pro": 3}  # fmt: skip
QUICK = ["--k", "1", "--max-new-tokens", "4", "--engine", "transformers", "--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from vppo_rollout.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_a"), "qwen2_5_vl", seed=0)


@pytest.fixture(scope="module")
def processor(ckpt):
    from vppo_rollout.loading import load_processor

    return load_processor(ckpt)


class Scripted:
    """Answers every question with \\boxed{answer} of its script; counts the questions it was asked."""

    def __init__(self, script: dict[str, str]):
        self.script, self.questions = script, []

    def sample(self, prompts, n, sampling):
        from vppo_rollout.sampling import Rollouts

        self.questions += [p.question for p in prompts]
        texts = [f"<think>x</think> \\boxed{{{self.script[p.question]}}}" for p in prompts for _ in range(n)]
        return Rollouts(group_index=[g for g in range(len(prompts)) for _ in range(n)], token_ids=[[1] for _ in texts],
                        texts=texts, finish_reasons=["stop"] * len(texts), logprobs=None)  # fmt: skip


def _image(value: int) -> Image.Image:
    return Image.fromarray(np.full((28, 28, 3), value, dtype=np.uint8))


def _records(answers, images=None) -> list[Record]:
    images = images or [0] * len(answers)
    return [Record(id=str(i), question=f"question {i}", images=[_image(v)], answer=a)
            for i, (a, v) in enumerate(zip(answers, images, strict=True))]  # fmt: skip


def _sharegpt_dir(tmp_path: Path) -> Path:
    """A data folder with the geo3k sharegpt fixture file and its images."""
    data = tmp_path / "data"
    (data / "papo").mkdir(parents=True)
    shutil.copy(SHAREGPT / "papo" / "hiyouga_geometry3k.json", data / "papo")
    shutil.copytree(SHAREGPT / "images", data / "images")
    return data


# --- Paths resolved once -------------------------------------------------------------------------------------------


def test_a_relative_data_dir_from_another_working_folder_keeps_every_item(tmp_path, monkeypatch):
    """The reader resolved an image path against the relative folder and the decoder joined the folder again: 0
    items of every benchmark, all missing_image."""
    from vppo_eval.evaluate import load_benchmark_reports

    monkeypatch.chdir(tmp_path)
    reports = load_benchmark_reports("all", data_dir=os.path.relpath(SHAREGPT, tmp_path), protocol="vppo")
    absolute = load_benchmark_reports("all", data_dir=SHAREGPT, protocol="vppo")
    assert {name: len(r.records) for name, r in absolute.items()} == KEPT
    assert {name: (len(r.records), r.skipped) for name, r in reports.items()} == {n: (KEPT[n], {}) for n in KEPT}
    assert all(Path(r.source).is_absolute() for r in reports.values())


def test_the_readme_command_with_relative_paths_from_another_working_folder_scores_every_benchmark(
    ckpt, tmp_path, monkeypatch
):
    """`vppo-eval --model TINY --benchmarks all --data-dir <relative sharegpt fixtures> --out DIR` (the README's
    command, run from elsewhere than the repository root): every benchmark scored, exit 0, files where named."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = ["--model", os.path.relpath(ckpt, work), "--benchmarks", "all", "--data-dir", os.path.relpath(SHAREGPT, work),
            "--out", "out", *QUICK]  # fmt: skip
    assert cli.main(argv) == 0
    results = json.loads((work / "out" / RESULTS_FILE).read_text())
    assert {n: b["n_items"] for n, b in results["benchmarks"].items()} == KEPT
    assert results["config"]["model"]["path"] == str(Path(ckpt).resolve())


# --- Results belong to one model -----------------------------------------------------------------------------------


def test_model_b_into_model_a_out_is_refused_naming_both(ckpt, tmp_path, monkeypatch, capsys):
    """Model B evaluated into model A's --out sampled nothing and reported A's results under B's name."""
    import vppo_rollout.loading
    from vppo_rollout.tiny import build_tiny_checkpoint

    other = build_tiny_checkpoint(tmp_path / "b", "qwen2_5_vl", seed=1)
    out = tmp_path / "eval"
    argv = ["--benchmarks", "geo3k", "--protocol", "raw", "--data-dir", str(FIXTURES), "--limit", "1", "--out",
            str(out), *QUICK]  # fmt: skip
    assert cli.main(["--model", str(ckpt), *argv]) == 0
    config = (out / CONFIG_FILE).read_text()

    def boom(*a, **k):
        raise AssertionError("refused before the model is loaded")

    monkeypatch.setattr(vppo_rollout.loading, "load_policy", boom)
    assert cli.main(["--model", str(other), *argv]) == 2
    assert re.search(rf"model {Path(ckpt).resolve()} .*this run is of model {other.resolve()}", capsys.readouterr().err)
    assert (out / CONFIG_FILE).read_text() == config  # still says model A


def test_the_model_fingerprint_covers_config_and_weight_files_and_a_changed_model_is_refused(processor, tmp_path):
    from vppo_eval.evaluate import model_identity

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"x" * 10)
    first = model_identity(model)
    assert first["path"] == str(model.resolve()) and model_identity(tmp_path / "m" / ".." / "m") == first
    (model / "model.safetensors").write_bytes(b"x" * 11)  # other weights, same path
    second = model_identity(model)
    (model / "config.json").write_text('{"hidden_size": 16}')
    assert len({first["fingerprint"], second["fingerprint"], model_identity(model)["fingerprint"]}) == 3

    data = {"a": _records(["1"])}
    kw = dict(processor=processor, k=1, out_dir=tmp_path / "eval", progress=False)
    evaluate(Scripted({"question 0": "1"}), data, model={"path": "m", "fingerprint": "f1"}, **kw)
    with pytest.raises(ValueError, match=r"model m \(fingerprint f1\).*this run is of model m \(fingerprint f2\)"):
        evaluate(Scripted({"question 0": "1"}), data, model={"path": "m", "fingerprint": "f2"}, **kw)


# --- Results belong to one item set --------------------------------------------------------------------------------


def test_a_resume_after_the_data_file_changed_is_refused_naming_the_changed_item(ckpt, tmp_path, capsys):
    """Evaluation resumed after the data file changed reused the old results beside the new file's item hash."""
    data = _sharegpt_dir(tmp_path)
    out = tmp_path / "eval"
    argv = ["--model", str(ckpt), "--benchmarks", "geo3k", "--data-dir", str(data), "--out", str(out), *QUICK]
    assert cli.main(argv) == 0
    items = (out / ITEMS_FILE).read_text()
    path = data / "papo" / "hiyouga_geometry3k.json"
    rows = json.loads(path.read_text())
    rows[1]["messages"][1]["content"] = "41"  # the answer of item 1 corrected
    path.write_text(json.dumps(rows))
    assert cli.main(argv) == 2
    assert re.search(r"1 item\(s\) that differ.*geo3k item 1: stored [0-9a-f]{16} vs now", capsys.readouterr().err)
    assert (out / ITEMS_FILE).read_text() == items


def test_a_changed_picture_under_the_same_id_is_not_reused_and_old_rows_without_hashes_are_refused(processor, tmp_path):
    kw = dict(processor=processor, k=1, out_dir=tmp_path, progress=False)
    script = {f"question {i}": str(i) for i in range(2)}
    evaluate(Scripted(script), {"a": _records(["0", "1"])}, **kw)
    with pytest.raises(ValueError, match=r"a item 1: stored"):
        evaluate(Scripted(script), {"a": _records(["0", "1"], images=[0, 255])}, **kw)
    rows = read_items(tmp_path / ITEMS_FILE)
    (tmp_path / ITEMS_FILE).write_text("".join(json.dumps({**r, "item_sha256": None}) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"2 item\(s\).*no hash"):
        evaluate(Scripted(script), {"a": _records(["0", "1"])}, **kw)


# --- A benchmark that keeps no item --------------------------------------------------------------------------------


def test_a_benchmark_that_keeps_no_item_exits_non_zero_naming_the_reasons_before_the_model_loads(
    ckpt, tmp_path, monkeypatch
):
    import vppo_rollout.loading

    data = _sharegpt_dir(tmp_path)
    shutil.rmtree(data / "images")  # every picture missing

    def boom(*a, **k):
        raise AssertionError("the model must not be loaded when a benchmark has no item")

    monkeypatch.setattr(vppo_rollout.loading, "load_policy", boom)
    monkeypatch.setattr(vppo_rollout.loading, "load_processor", boom)
    with pytest.raises(SystemExit, match=r"benchmark 'geo3k' kept no item .*3 row\(s\).*missing_image \(at load\): 3"):
        cli.main(["--model", str(ckpt), "--benchmarks", "geo3k", "--data-dir", str(data), "--out", str(tmp_path / "o"),
                  *QUICK])  # fmt: skip


def test_allow_empty_reports_the_empty_benchmark_as_an_empty_row(ckpt, tmp_path):
    data = _sharegpt_dir(tmp_path)
    (data / "papo" / "PAPO_MMK12.json").write_text(
        json.dumps([{"messages": [{"role": "user", "content": "<image>Q"}], "images": ["images/none.png"]}])
    )
    out = tmp_path / "o"
    argv = ["--model", str(ckpt), "--benchmarks", "geo3k,mmk12", "--data-dir", str(data), "--out", str(out), *QUICK]
    with pytest.raises(SystemExit, match=r"'mmk12' kept no item"):
        cli.main(argv)
    assert cli.main([*argv, "--allow-empty"]) == 0
    results = json.loads((out / RESULTS_FILE).read_text())
    assert results["benchmarks"]["geo3k"]["n_items"] == 3 and results["benchmarks"]["mmk12"]["n_items"] == 0
    assert results["benchmarks"]["mmk12"]["load_skipped"] == {"missing_image": 1}


def test_every_item_skipped_at_evaluation_is_an_error_after_the_results_are_written(processor, tmp_path):
    data = {"a": _records(["1"]), "b": [Record(id="0", question="<image><image> two?", images=[_image(0)], answer="1")]}
    kw = dict(processor=processor, k=1, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"benchmark 'b' kept no item .*bad_prompt \(at evaluation\): 1") as err:
        evaluate(Scripted({"question 0": "1"}), data, **kw)
    assert type(err.value).__name__ == "EmptyBenchmarkError" and err.value.results.benchmarks["a"].n_items == 1
    assert json.loads((tmp_path / RESULTS_FILE).read_text())["benchmarks"]["b"]["n_items"] == 0
    res = evaluate(Scripted({"question 0": "1"}), data, allow_empty=True, **kw)
    assert res.benchmarks["b"].n_items == 0 and res.benchmarks["a"].avg_at_k == 1.0
    with pytest.raises(ValueError, match=r"'c' kept no item .*no skip recorded"):
        evaluate(Scripted({}), {"c": []}, processor=processor, k=1, progress=False)


def test_a_resume_with_another_k_is_one_message_and_exit_code_2(ckpt, tmp_path, capsys):
    """`vppo-eval` resumed into the same --out with another --k: the right message used to come as a traceback."""
    out = tmp_path / "eval"
    argv = ["--model", str(ckpt), "--benchmarks", "geo3k", "--protocol", "raw", "--data-dir", str(FIXTURES),
            "--limit", "1", "--out", str(out), *QUICK]  # fmt: skip
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main([*argv, "--k", "2"]) == 2
    err = capsys.readouterr().err
    assert f"vppo-eval: --out {str(out)!r}: " in err and "k: stored 1 vs now 2" in err and "Use a new out_dir" in err
    assert "Traceback" not in err


def test_an_out_dir_written_before_models_were_recorded_is_refused_saying_so(processor, tmp_path):
    """An --out from an older vppo-eval (its eval_config.json names no model) cannot be checked to be this model's:
    refused, saying it is older, not "holds the results of model no model named"."""
    data = {"a": _records(["1"])}
    kw = dict(processor=processor, k=1, out_dir=tmp_path / "eval", progress=False)
    evaluate(Scripted({"question 0": "1"}), data, model={"path": "m", "fingerprint": "f1"}, **kw)
    stored = json.loads((tmp_path / "eval" / CONFIG_FILE).read_text())
    del stored["model"]  # what an older vppo-eval wrote
    (tmp_path / "eval" / CONFIG_FILE).write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"written by an older vppo-eval.*m \(fingerprint f1\).*new out_dir"):
        evaluate(Scripted({"question 0": "1"}), data, model={"path": "m", "fingerprint": "f1"}, **kw)
