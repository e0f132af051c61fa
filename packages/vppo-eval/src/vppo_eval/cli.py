"""`vppo-eval`: avg@k of a checkpoint on the benchmarks, with the paper's Table 1 beside it.

    vppo-eval --model PATH --benchmarks all --out DIR --data-dir DIR [--data-dir DIR2] [--protocol vppo|raw]
              [--limit N] [--engine auto] [--allow-empty]

--protocol vppo (the default) scores the authors' item sets, read from their releases in --data-dir (given once per
release: each benchmark is read from the first folder that holds it), with the
paper's decoding (avg@8, temperature 1.0, top-p 1.0, 2048 new tokens); --protocol raw scores the benchmarks' own
releases with vppo-eval's exact-match filter. The result files and the report record the protocol, each
benchmark's source, the items kept and a hash of the items (ids, questions, answers); decoding flags that differ from the protocol's are
listed there as deviations.

Every folder and file argument (--model, --out, --data-dir) is resolved to an absolute path once, before anything
is read. A benchmark that keeps no item is an error (exit status non-zero, the skip reasons named) unless
--allow-empty; a rerun into an --out that holds another model's results, or results of items that have changed
since, is refused. All of these are checked before the model is loaded (it is loaded when the first item is sampled).

Writes into DIR: items.jsonl (one line per finished item; rerunning the same command resumes), eval_config.json,
results.json, report.md, report.json, benchmarks.png, and with --dependency N also dependency_hist.png,
dependency.html and dependency.json (visual dependency of one response of each of the first N items).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from vppo_eval.benchmarks import DEFAULT_PROTOCOL

DTYPES = ("auto", "float32", "bfloat16", "float16")
# The decoding of both protocols (the paper's, ALGORITHMS.md §8); a run that changes one records it as a deviation.
PROTOCOL_DECODING = {"k": 8, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 2048}
AUTHORS_DATA = (
    "the authors' evaluation data: chamber111/VPPO-Eval (collection chamber111/vppo-data) for DynaMath and "
    "MathVision, and PAPO-Galaxy/PAPO_eval for MathVerse, MMK12, Geo3k, We-Math, LogicVista and MMMU-Pro (give "
    "--data-dir once per release)"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vppo-eval",
        description="avg@k evaluation of a Qwen2.5-VL / Qwen3-VL checkpoint (VPPO paper protocol: k=8, T=1.0, "
        "top-p 1.0, 2048 new tokens) with the paper's Table 1 beside the result.",
    )
    p.add_argument("--model", required=True, help="local Hugging Face folder of the checkpoint")
    p.add_argument("--benchmarks", default="all",
                   help="'all' (the eight of Table 1) or a comma-separated list of registry names (also "
                   "mathverse_vision: MathVerse's vision-dependent subset)")  # fmt: skip
    p.add_argument("--protocol", choices=("vppo", "raw"), default=DEFAULT_PROTOCOL,
                   help="vppo: the authors' item sets (sharegpt files in --data-dir); raw: the benchmarks' own "
                   "releases with vppo-eval's exact-match filter")  # fmt: skip
    p.add_argument("--k", type=int, default=PROTOCOL_DECODING["k"], help="samples per item (avg@k); default 8")
    p.add_argument("--out", required=True, help="output folder (rerunning with the same folder resumes)")
    p.add_argument("--data-dir", action="append", default=None,
                   help="local data; may be given more than once (each benchmark is read from the first folder that "
                   "holds it). Protocol vppo: the authors' releases as they ship: a chamber111/VPPO-Eval snapshot "
                   "(or its data/), a PAPO-Galaxy/PAPO_eval snapshot (parquet files, image zips extracted or not) or "
                   "PAPO-Eval's prepared DATA folder; raw: DATA_DIR/NAME[.parquet|.json|...] (default: the hub)")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="only the first N items of each benchmark")
    p.add_argument("--engine", choices=("auto", "vllm", "transformers"), default="auto",
                   help="auto: vLLM when it is importable and a CUDA GPU exists, else transformers; vllm: also "
                   "vLLM's CPU build (see noxfile.py tests_vllm)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=PROTOCOL_DECODING["temperature"])
    p.add_argument("--top-p", type=float, default=PROTOCOL_DECODING["top_p"])
    p.add_argument("--max-new-tokens", type=int, default=PROTOCOL_DECODING["max_new_tokens"])
    p.add_argument("--batch-size", type=int, default=16, help="items per sampler call (resume granularity)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--min-pixels", type=int, default=None, help="image resize lower bound (processor default)")
    p.add_argument("--max-pixels", type=int, default=None, help="image resize upper bound (processor default)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM only")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM only")
    p.add_argument("--max-model-len", type=int, default=None, help="vLLM only (default: the model's)")
    p.add_argument("--run-name", default=None, help="row label in the report (default: the model folder name)")
    p.add_argument("--dependency", type=int, default=0, metavar="N",
                   help="also compute the visual dependency of one response of each of the first N scored items "
                   "(transformers model; writes dependency_hist.png and dependency.html)")  # fmt: skip
    p.add_argument("--allow-empty", action="store_true",
                   help="report a benchmark that keeps no item (every row skipped) as an empty row instead of "
                   "failing; the default exits non-zero naming the skip reasons")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _resolve_paths(args: argparse.Namespace) -> None:
    """--model, --out and --data-dir as absolute paths (``~`` expanded), resolved once against the working folder:
    every later join and every message then names the file meant, wherever it is used."""
    for name in ("model", "out"):
        value = getattr(args, name)
        if value is not None:
            setattr(args, name, str(Path(value).expanduser().resolve()))
    if args.data_dir is not None:  # a list: --data-dir may be given more than once
        args.data_dir = [str(Path(d).expanduser().resolve()) for d in args.data_dir]


class SamplerOnFirstUse:
    """A sampler built by `build()` on its first `sample` call.

    `evaluate` checks everything it can refuse (another model's results in --out, items changed since, a benchmark
    without items, other settings) before it samples: with this, those refusals come before a model is loaded, and
    rerunning a finished evaluation loads no model at all.
    """

    def __init__(self, build) -> None:
        self._build = build
        self.inner = None  # the built sampler, once built

    def sample(self, prompts, n, sampling):
        if self.inner is None:
            self.inner = self._build()
        return self.inner.sample(prompts, n, sampling)


def choose_engine(engine: str) -> str:
    """ "auto" -> "vllm" if vllm is importable and CUDA is available, else "transformers"; checks explicit choices.

    An explicit "vllm" needs only an importable vLLM: its CPU build runs without a GPU (slower than on a GPU, but
    it is the engine the numbers of a GPU run come from).
    """
    import torch

    has_vllm = importlib.util.find_spec("vllm") is not None
    has_gpu = torch.cuda.is_available()
    if engine == "auto":
        return "vllm" if has_vllm and has_gpu else "transformers"
    if engine == "vllm" and not has_vllm:
        raise SystemExit(
            "vppo-eval: --engine vllm: vllm is not installed (pip install 'vppo-rollout[vllm]'); "
            "use --engine transformers (or auto)"
        )
    if engine not in ("vllm", "transformers"):
        raise SystemExit(f"vppo-eval: --engine {engine!r}: use auto, vllm or transformers")
    return engine


def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def _check_args(args: argparse.Namespace) -> None:
    # Cheap argument checks first: a mistyped flag must not cost a model load.
    if args.k < 1:
        raise SystemExit(f"vppo-eval: --k {args.k}: must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"vppo-eval: --limit {args.limit}: must be >= 1")
    if args.dependency < 0:
        raise SystemExit(f"vppo-eval: --dependency {args.dependency}: must be >= 0")
    if not Path(args.model).is_dir():
        raise SystemExit(f"vppo-eval: --model {args.model!r} is not a folder; pass a local Hugging Face checkpoint")
    for data_dir in args.data_dir or []:
        if not Path(data_dir).is_dir():
            raise SystemExit(f"vppo-eval: --data-dir {data_dir!r} is not a folder")
    if args.protocol == "vppo" and args.data_dir is None:
        raise SystemExit(
            f"vppo-eval: --protocol vppo reads {AUTHORS_DATA}, from a local folder: download them on a machine with "
            "network (vppo-eval README, 'Protocols') and pass --data-dir; or use --protocol raw for the benchmarks' "
            "own releases from the hub"
        )


def protocol_deviations(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Decoding settings that differ from the protocol's: {setting: {"protocol": value, "used": value}}."""
    used = {"k": args.k, "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}
    return {k: {"protocol": PROTOCOL_DECODING[k], "used": v} for k, v in used.items() if v != PROTOCOL_DECODING[k]}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _resolve_paths(args)
    _check_args(args)

    import torch

    from vppo_eval.evaluate import (
        EmptyBenchmarkError,
        ResumeRefusedError,
        check_kept_items,
        evaluate,
        load_benchmark_reports,
    )
    from vppo_eval.report import count_mismatches, write_report
    from vppo_rollout.loading import load_policy, load_processor

    engine = choose_engine(args.engine)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = _dtype(args.dtype, device)
    out = Path(args.out)
    run_name = args.run_name or Path(args.model).name

    # Data before the model: an unknown name or a missing file fails in seconds, not after a 60 GB load.
    try:
        reports = load_benchmark_reports(
            args.benchmarks, data_dir=args.data_dir, limit=args.limit, protocol=args.protocol
        )
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"vppo-eval: --benchmarks {args.benchmarks!r} (--protocol {args.protocol}): {err}") from err
    data = {name: list(r.records) for name, r in reports.items()}
    load_skipped = {name: dict(r.skipped) for name, r in reports.items()}
    data_info = {name: r.summary() for name, r in reports.items()}
    for name, r in reports.items():
        print(f"{name}: {len(r.records)} items from {r.source} ({r.data_form} form)"
              + (f", dropped at load: {r.skipped}" if r.skipped else "")
              + (f"; also in {', '.join(r.also_in)} (not read: the first --data-dir wins)" if r.also_in else ""),
              file=sys.stderr)  # fmt: skip
    # Before the model load: a copy that is not the release's (kept != its rows) is said at once, not after hours.
    for line in count_mismatches({name: r.summary() for name, r in reports.items()}, args.limit):
        print(f"vppo-eval: warning: {line}", file=sys.stderr)
    if not args.allow_empty:
        try:  # before the model load: an empty benchmark fails in seconds
            check_kept_items(data, load_skipped, data_info)
        except EmptyBenchmarkError as err:
            raise SystemExit(f"vppo-eval: {err}") from err
    deviations = protocol_deviations(args)
    processor = load_processor(args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    loaded: dict[str, object] = {}  # the transformers model, once a sampler call needs it

    def build_sampler():
        if engine == "vllm":
            from vppo_rollout.vllm_engine import VLLMSampler

            return VLLMSampler(
                args.model,
                max_images=max(1, max((len(r.images) for recs in data.values() for r in recs), default=1)),
                gpu_memory_utilization=args.gpu_memory_utilization,
                dtype=str(dtype).removeprefix("torch."),
                max_model_len=args.max_model_len,
                tensor_parallel_size=args.tensor_parallel_size,
                seed=args.seed,
                min_pixels=args.min_pixels,
                max_pixels=args.max_pixels,
            )
        from vppo_rollout.transformers_engine import TransformersSampler

        loaded["model"] = load_policy(args.model, dtype=dtype, device=device)
        return TransformersSampler(loaded["model"], processor, batch_size=args.batch_size * args.k)

    sampler = SamplerOnFirstUse(build_sampler)
    try:
        results = evaluate(
            sampler,
            data,
            load_skipped=load_skipped,
            protocol=args.protocol,
            data_info=data_info,
            model=args.model,
            allow_empty=args.allow_empty,
            processor=processor,
            k=args.k,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            limit=args.limit,  # already applied at load; passed so the report says the run is partial
            out_dir=out,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=not args.no_progress,
            meta={
                "engine": engine,
                "dtype": str(dtype),
                "min_pixels": args.min_pixels,
                "max_pixels": args.max_pixels,
                "protocol_deviations": deviations,
            },
        )
    except EmptyBenchmarkError as err:
        if err.results is not None:  # every item of a benchmark was skipped at evaluation: the report shows which
            write_report(err.results, out, run_name=run_name)
        raise SystemExit(f"vppo-eval: {err}") from err
    except ResumeRefusedError as err:  # another model's results, changed items or other settings: the fix is named
        print(f"vppo-eval: --out {str(out)!r}: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # evaluate's refusals of its inputs (a corrupt items.jsonl, duplicate ids): named there
        print(f"vppo-eval: {err}", file=sys.stderr)
        return 2
    paths = write_report(results, out, run_name=run_name)
    print((out / "report.md").read_text() if paths["markdown"].exists() else "")

    if args.dependency:
        if engine == "vllm" and sampler.inner is not None:
            sampler.inner.sleep()  # free the engine's GPU memory for the transformers model (no-op without sleep mode)
        model = loaded.get("model") or load_policy(args.model, dtype=dtype, device=device)
        dep_paths = dependency_for_items(model, processor, data, results, out, n_items=args.dependency,
                                            seed=args.seed, progress=not args.no_progress)  # fmt: skip
        paths.update(dep_paths)
    if engine == "vllm" and sampler.inner is not None:
        sampler.inner.close()
    print("wrote: " + ", ".join(str(p) for p in paths.values()))
    return 0


def dependency_for_items(model, processor, data, results, out_dir, *, n_items, seed=0, progress=True) -> dict:
    """Visual dependency of the first response of each of the first `n_items` scored items (across benchmarks).

    data: benchmark name -> records (to rebuild the prompts with their images); results: what `evaluate` returned.
    Writes dependency_hist.png, dependency.html and dependency.json into out_dir; returns their paths.
    """
    from vppo_eval.report import dependency_analysis, write_dependency_report
    from vppo_rollout.prompts import build_prompt

    records = {(name, str(r.id)): r for name, recs in data.items() for r in recs}
    system_prompt = results.config.get("system_prompt", "You are a helpful assistant.")
    chosen = [row for row in results.items if row["status"] == "scored" and row["responses"][0].strip()][:n_items]
    if not chosen:
        raise SystemExit("vppo-eval: --dependency: no scored item with a non-empty response to analyse")
    prompts, texts, headers = [], [], []
    for row in chosen:
        rec = records[(row["benchmark"], row["id"])]
        prompts.append(build_prompt(processor, rec.question, list(rec.images), system_prompt=system_prompt))
        texts.append(row["responses"][0])
        headers.append(
            f"[{row['benchmark']} / {row['id']}] accuracy {row['accuracy'][0]:.0f}, answer {row['answer']}\n"
            f"Q: {row['question']}"
        )
    analysis = dependency_analysis(model, processor, prompts, texts, seed=seed, micro_batch_size=1, progress=progress)
    return write_dependency_report(analysis, out_dir, headers=headers)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
