"""Issue 30: the authors' evaluation data read exactly as it ships (VPPO-Eval's snapshot, PAPO_eval's hub snapshot
with its zips extracted or not, PAPO-Eval's prepared DATA folder), two releases given as two --data-dir, the split
names, a missing split naming what the folder holds, and kept/expected counts in the report."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from vppo_eval import cli
from vppo_eval.benchmarks import BENCHMARK_NAMES, BENCHMARKS, fixture_path, items_sha256, load_benchmark
from vppo_eval.evaluate import benchmark_source, load_benchmark_reports
from vppo_eval.fixtures import releases
from vppo_eval.releases import resolve_image

# (PAPO-Eval layout, VPPO-Eval folder given as --data-dir: the snapshot root or its data/ folder)
LAYOUTS = [
    ("papo_hub", "root"),
    ("papo_hub_unzipped", "data"),
    ("papo_data", "root"),
    ("papo_data_zipped", "data"),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every layout, built once: name -> folder."""
    return releases.write_all(tmp_path_factory.mktemp("releases"))


def _dirs(built, papo: str, vppo: str) -> list[Path]:
    return [built[papo], built["vppo_eval"] / ("data" if vppo == "data" else "")]


def test_the_registry_knows_each_release_its_split_names_and_row_counts():
    rows = {name: (b.release, b.sharegpt_names[0], b.release_rows) for name, b in BENCHMARKS.items()}
    assert rows == {
        "mathverse": ("PAPO-Galaxy/PAPO_eval", "AI4Math_MathVerse", 2180),
        "dynamath": ("chamber111/VPPO-Eval", "DynaMath_DynaMath_Sample", 3666),
        "mmk12": ("PAPO-Galaxy/PAPO_eval", "PAPO_MMK12", 2000),
        "geo3k": ("PAPO-Galaxy/PAPO_eval", "hiyouga_geometry3k", 601),
        "mathvision": ("chamber111/VPPO-Eval", "MathLLMs_MathVision", 2907),
        "wemath": ("PAPO-Galaxy/PAPO_eval", "We_Math", 1740),
        "logicvista": ("PAPO-Galaxy/PAPO_eval", "lscpku_LogicVista", 447),
        "mmmu_pro": ("PAPO-Galaxy/PAPO_eval", "MMMU_MMMU_Pro", 1730),
        "mathverse_vision": ("PAPO-Galaxy/PAPO_eval", "AI4Math_MathVerse_vision_dependent", 1308),
    }
    # the names vppo-eval guessed before (and LLaMA-Factory's dataset names) are still read
    assert "FanqingM_MMK12" in BENCHMARKS["mmk12"].sharegpt_names
    assert "We-Math_We-Math" in BENCHMARKS["wemath"].sharegpt_names


@pytest.mark.parametrize(("papo", "vppo"), LAYOUTS)
def test_each_layout_reads_all_eight_as_the_raw_fixtures_kept_items(built, papo, vppo):
    reports = load_benchmark_reports([*BENCHMARK_NAMES, "mathverse_vision"], data_dir=_dirs(built, papo, vppo),
                                     protocol="vppo")  # fmt: skip
    for name, rep in reports.items():
        raw = load_benchmark(name, fixture_path("mathverse" if name == "mathverse_vision" else name), protocol="raw")
        assert rep.data_form == "sharegpt" and not rep.skipped and rep.n_rows == len(raw), name
        assert [(r.question, r.answer) for r in rep.records] == [(r.question, r.answer) for r in raw], name
        assert [[im.tobytes() for im in r.images] for r in rep.records] == [
            [im.tobytes() for im in r.images] for r in raw
        ], name
        assert rep.summary()["expected_items"] == BENCHMARKS[name].release_rows
        release = built["vppo_eval"] if name in ("dynamath", "mathvision") else built[papo]
        assert Path(rep.source).is_relative_to(release), (name, rep.source)
    # every image path is the release's ./data/images/<folder>/<file>.png
    assert all(
        p.startswith("./data/images/") for rep in reports.values() for r in rep.records for p in r.meta["images"]
    )


def test_the_three_papo_layouts_give_the_same_items(built):
    """The hub's `id` column is the row number the prepared JSON (which drops it) numbers its rows by, so the
    item hashes agree whichever layout was read."""
    hashes = {
        papo: {n: items_sha256(r.records) for n, r in load_benchmark_reports("geo3k,mmmu_pro", data_dir=built[papo],
                                                                              protocol="vppo").items()}
        for papo, _ in LAYOUTS
    }  # fmt: skip
    assert len({json.dumps(h, sort_keys=True) for h in hashes.values()}) == 1


def test_the_layouts_are_where_the_releases_put_their_files(built):
    files = {name: sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
             for name, folder in built.items()}  # fmt: skip
    assert "data/vppo/DynaMath_DynaMath_Sample.json" in files["vppo_eval"]
    assert "data/images/MathLLMs_MathVision/1_0.png" in files["vppo_eval"]
    assert "data/PAPO_MMK12-00000-of-00001.parquet" in files["papo_hub"]
    assert "PAPO_MMK12_test_images.zip" in files["papo_hub"] and not any("images/" in f for f in files["papo_hub"])
    assert "papo/We_Math.json" in files["papo_data"] and "images/hiyouga_geometry3k/0_0.png" in files["papo_data"]
    assert "We-Math_We-Math_images.zip" in files["papo_data_zipped"]
    with zipfile.ZipFile(built["papo_hub"] / "hiyouga_geometry3k_images.zip") as z:
        assert z.namelist() == [
            "hiyouga_geometry3k/0_0.png",
            "hiyouga_geometry3k/1_0.png",
            "hiyouga_geometry3k/2_0.png",
        ]
    import pyarrow.parquet as pq

    assert pq.read_schema(built["papo_hub"] / "data" / "We_Math-00000-of-00001.parquet").names == [
        "messages", "images", "id"
    ]  # fmt: skip
    # PAPO-Eval's dataset_info.json names a file its script does not write: the name search finds We_Math.json
    info = json.loads((built["papo_data"] / "dataset_info.json").read_text())
    assert info["We-Math_We-Math"]["file_name"] == "papo/We-Math_We-Math.json"
    assert benchmark_source(built["papo_data"], "wemath", "vppo") == built["papo_data"] / "papo" / "We_Math.json"
    total = sum(p.stat().st_size for folder in built.values() for p in folder.rglob("*") if p.is_file())
    assert total < 1_000_000  # tiny: built per test session, never committed


def test_a_missing_split_names_what_the_folders_hold(built, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        benchmark_source(built["papo_hub"], "dynamath", "vppo")
    message = str(err.value)
    assert "names looked for: dynamath, DynaMath_DynaMath_Sample, DynaMath_DynaMath (chamber111/VPPO-Eval" in message
    assert "data/hiyouga_geometry3k-00000-of-00001.parquet" in message and "PAPO_MMK12_test_images.zip" in message
    # two folders: each one's holdings are named
    with pytest.raises(FileNotFoundError, match=r"none of data_dir=.*names looked for: mmk12, PAPO_MMK12.*"
                       r"vppo_eval holds: data/vppo/DynaMath_DynaMath_Sample\.json"):  # fmt: skip
        benchmark_source([built["vppo_eval"], tmp_path], "mmk12", "vppo")
    with pytest.raises(FileNotFoundError, match=r"holds: no \.json, \.parquet or \.zip file"):
        benchmark_source(tmp_path, "geo3k", "vppo")


def test_a_benchmark_in_two_folders_is_read_from_the_first_and_the_other_recorded(built):
    both = [built["papo_data"], built["papo_hub"]]
    rep = load_benchmark_reports("geo3k", data_dir=both, protocol="vppo")["geo3k"]
    assert Path(rep.source).is_relative_to(built["papo_data"])
    assert rep.summary()["also_in"] == [str(built["papo_hub"] / "data" / "hiyouga_geometry3k-00000-of-00001.parquet")]
    rep = load_benchmark_reports("geo3k", data_dir=both[::-1], protocol="vppo")["geo3k"]
    assert Path(rep.source).is_relative_to(built["papo_hub"])
    assert "also_in" not in load_benchmark_reports("geo3k", data_dir=both[:1], protocol="vppo")["geo3k"].summary()


def test_zip_members_are_found_under_a_top_folder_or_flat_in_their_own_zip(tmp_path):
    from vppo_eval.fixtures.build import draw_png

    (tmp_path / "data").mkdir()
    png = draw_png("z")
    with zipfile.ZipFile(tmp_path / "extra_images.zip", "w") as z:  # an extra top folder
        z.writestr("extra_images/g/1.png", png)
    with zipfile.ZipFile(tmp_path / "flat_images.zip", "w") as z:  # no folder: only this split's zip may match
        z.writestr("2.png", png)
    base = tmp_path / "data"
    assert resolve_image("./data/images/g/1.png", base)["bytes"] == png
    assert resolve_image("./data/images/flat/2.png", base)["path"].endswith("flat_images.zip/2.png")
    assert resolve_image("./data/images/other/2.png", base) == "./data/images/other/2.png"  # not its zip: missing
    (tmp_path / "data" / "images" / "g").mkdir(parents=True)
    (tmp_path / "data" / "images" / "g" / "1.png").write_bytes(png)  # an extracted file wins over the zip
    assert resolve_image("./data/images/g/1.png", base) == str(tmp_path / "data" / "images" / "g" / "1.png")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from vppo_rollout.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_releases"), "qwen2_5_vl", seed=0)


@pytest.mark.parametrize(("papo", "vppo"), LAYOUTS)
def test_cli_protocol_vppo_scores_every_item_of_all_eight_from_each_layout(built, ckpt, tmp_path, papo, vppo, capsys):
    out = tmp_path / "eval"
    papo_dir, vppo_dir = _dirs(built, papo, vppo)
    argv = ["--model", str(ckpt), "--benchmarks", "all", "--data-dir", str(papo_dir), "--data-dir", str(vppo_dir),
            "--k", "1", "--max-new-tokens", "2", "--batch-size", "32", "--engine", "transformers", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["protocol"] == "vppo" and list(results["benchmarks"]) == list(BENCHMARK_NAMES)
    for name in BENCHMARK_NAMES:
        raw = load_benchmark(name, fixture_path(name), protocol="raw")
        b = results["benchmarks"][name]
        assert b["n_items"] == len(raw) and b["n_skipped"] == 0 and not b["load_skipped"], name
    md = (out / "report.md").read_text()
    assert "| MMK12 | " in md and "| sharegpt | 3 / 2,000 |" in md and "| sharegpt | 2 / 3,666 |" in md
    # the fixtures are not the releases: each benchmark warns, in the report and on stderr
    assert md.count("**Warning:**") == 8
    assert "MMK12: 3 item(s) kept, the authors' release (PAPO-Galaxy/PAPO_eval) has 2,000" in md
    assert "only comparable on the same items" in md
    assert capsys.readouterr().err.count("vppo-eval: warning: ") == 8


def test_report_counts_warn_only_where_the_limit_does_not_explain_them():
    from vppo_eval.report import count_mismatches

    data = {"geo3k": {"items": 601, "expected_items": 601}, "mmk12": {"items": 1999, "expected_items": 2000},
            "mathvision": {"items": 5, "expected_items": None}}  # fmt: skip
    assert [w.split(":")[0] for w in count_mismatches(data)] == ["MMK12"]
    limited = {"geo3k": {"items": 20, "expected_items": 601}, "mmk12": {"items": 19, "expected_items": 2000}}
    assert [w.split(":")[0] for w in count_mismatches(limited, limit=20)] == ["MMK12"]
    assert "(the first 20: 20)" in count_mismatches(limited, limit=20)[0]


class Oracle:
    """Answers every question with \\boxed{its answer}: every item scored from the releases must grade 1."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def sample(self, prompts, n, sampling):
        from vppo_rollout.sampling import Rollouts

        texts = [f"<think>x</think> \\boxed{{{self.answers[p.question]}}}" for p in prompts for _ in range(n)]
        return Rollouts(group_index=[g for g in range(len(prompts)) for _ in range(n)], token_ids=[[1] for _ in texts],
                        texts=texts, finish_reasons=["stop"] * len(texts), logprobs=None)  # fmt: skip


def test_evaluate_takes_a_list_of_data_dirs_and_grades_the_releases_answers(built, ckpt, tmp_path):
    from vppo_eval.evaluate import evaluate
    from vppo_rollout.loading import load_processor

    answers = {r.question: r.answer for name in BENCHMARK_NAMES for r in load_benchmark(name, fixture_path(name))}
    results = evaluate(Oracle(answers), "all", processor=load_processor(ckpt), data_dir=_dirs(built, "papo_hub", "root"),
                       k=1, max_new_tokens=4, out_dir=tmp_path / "o", progress=False)  # fmt: skip
    assert results.config["protocol"] == "vppo"
    assert {n: (b.n_items, b.avg_at_k) for n, b in results.benchmarks.items()} == {
        n: (len(load_benchmark(n, fixture_path(n))), 1.0) for n in BENCHMARK_NAMES
    }
    assert results.config["data"]["mmk12"]["expected_items"] == 2000
