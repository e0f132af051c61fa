"""Token log-probs from the last hidden states: vppo-core against the naive path and every peer (issue 15).

    python packages/vppo-core/benchmarks/bench_race.py            # N = 4,096 and 1,024, H = 3,584, V = 151,936
    python packages/vppo-core/benchmarks/bench_race.py --quick    # small sizes, a few minutes: checks the harness
    python packages/vppo-core/benchmarks/bench_race.py --ablations  # the ideas tried, measured (N = 1,024, bf16)

The task: ``lp[n] = log softmax(hidden[n] @ weight.T)[labels[n]]`` for N positions, as an RL step needs it — once
without gradient (``lp_old``, the perturbed and the reference passes) and once with the backward of ``Σ lp``
(the policy-gradient pass, into both the hidden states and the LM-head weight).

Implementations (a peer that is not installed is listed with the reason; ``nox -s bench`` installs them all, in its
own venv — none is a dependency of any vppo package):

- ``naive``: ``log_softmax(F.linear(h, W).float(), -1).gather(...)`` — the baseline of every ratio.
- ``vppo hidden``: ``vppo_core.logprobs_from_hidden`` (default blocks).
- ``vppo keep``: the same with ``keep_logits=True`` (the backward reuses the forward's model-dtype logits blocks
  instead of recomputing them: one LM-head product less, for ``B·L·V`` model-dtype values of memory).
- ``vppo logits``: ``vppo_core.token_logprobs`` after a plain ``F.linear`` (the model's own bf16 logits).
- ``liger``: Liger-Kernel's chunked selective log-probs (``_ChunkedSelectiveLogProbFunction``, the op behind its
  PPO/GRPO losses), default chunks.
- ``cce``: cut-cross-entropy ``linear_cross_entropy(..., reduction="none", impl="torch_compile")`` (its CPU path;
  ``lp = −loss``); compiled on a small input first, so compile time is not counted.
- ``trl``: TRL's ``selective_log_softmax`` after ``F.linear`` (on CPU its per-sequence loop; in bf16 it takes the
  log-softmax in bf16).
- ``torchtune``: ``CEWithChunkedOutputLoss`` on the logits of 8 position chunks, as torchtune's models emit them;
  it returns the mean loss only, so its check is on ``Σ lp`` (= −N · loss).

Method (as bench_core.py): every implementation runs in a fresh subprocess on the same seeded inputs. Peak memory =
the process's extra peak resident set during the first call (inputs excluded). Time: forward, the second call;
forward + backward, the first call itself (a minute or more at full size, so one call). Every ratio is to
``naive`` measured in the same run. Correctness: a float64 worker computes the exact ``lp`` of every position, and
the exact gradients of ``Σ lp`` for 256 positions (``grad_hidden`` rows) and 256 vocabulary entries (``grad_W``
rows, labels' ids among them); each implementation's results are compared with them (max abs error of lp; max
abs error of a gradient relative to the largest reference entry).

Targets (issue 15), for vppo hidden in bf16 and float32: forward peak ≤ 1/16 of naive; forward + backward time ≤
naive and < every peer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import _gib, _measure  # the same memory and time method

FULL = {"hidden": 3584, "vocab": 151_936, "sizes": [(4, 1024), (1, 1024)]}
QUICK = {"hidden": 256, "vocab": 16_384, "sizes": [(4, 256), (1, 256)]}
CHECKED = 256  # positions and vocabulary rows whose exact gradients the float64 worker computes
IMPLS = ["naive", "vppo hidden", "vppo keep", "vppo logits", "liger", "cce", "trl", "torchtune"]
PEERS = {"liger": "liger_kernel", "cce": "cut_cross_entropy", "trl": "trl", "torchtune": "torchtune"}


def _inputs(cfg: dict, batch: int, length: int, dtype):
    """Seeded hidden [B, L, H], weight [V, H] (logits of std ~1.8, like a trained LM head's), labels [B, L]."""
    import torch

    g = torch.Generator().manual_seed(0)
    h, v = cfg["hidden"], cfg["vocab"]
    hidden = torch.randn(batch, length, h, generator=g).to(dtype)
    weight = torch.empty(v, h).normal_(0, 0.03, generator=g).to(dtype)
    labels = torch.randint(0, v, (batch, length), generator=g)
    return hidden, weight, labels


def _checked_rows(cfg: dict, labels):
    """The positions and vocabulary rows whose gradients are checked: seeded, the labels' ids first."""
    import torch

    g = torch.Generator().manual_seed(1)
    n = labels.numel()
    rows = torch.randperm(n, generator=g)[: min(CHECKED, n)].sort().values
    ids = torch.unique(torch.cat([labels.reshape(-1)[: CHECKED // 2], torch.randperm(cfg["vocab"], generator=g)]))
    return rows, ids[:CHECKED].sort().values


def _implementation(name: str, chunks: int = 8):
    """fn(hidden [B, L, H], weight [V, H], labels [B, L]) -> (lp [B, L] or None, Σ lp as a 0-d tensor)."""
    import torch
    import torch.nn.functional as F

    if name == "naive":

        def fn(hidden, weight, labels):
            lp = torch.log_softmax(F.linear(hidden, weight).float(), -1).gather(-1, labels[..., None])[..., 0]
            return lp, lp.sum()
    elif name == "vppo hidden":
        from vppo_core.logprobs import logprobs_from_hidden

        def fn(hidden, weight, labels):
            lp = logprobs_from_hidden(hidden, weight, labels)
            return lp, lp.sum()
    elif name == "vppo keep":
        from vppo_core.logprobs import logprobs_from_hidden

        def fn(hidden, weight, labels):
            lp = logprobs_from_hidden(hidden, weight, labels, keep_logits=True)
            return lp, lp.sum()
    elif name == "vppo logits":
        from vppo_core.logprobs import token_logprobs

        def fn(hidden, weight, labels):
            lp = token_logprobs(F.linear(hidden, weight), labels)
            return lp, lp.sum()
    elif name == "liger":
        from liger_kernel.chunked_loss.fused_linear_ppo import _ChunkedSelectiveLogProbFunction

        def fn(hidden, weight, labels):
            h2 = hidden.reshape(-1, hidden.shape[-1])
            lp = _ChunkedSelectiveLogProbFunction.apply(h2, weight, labels.reshape(-1), None, 1.0, 4096)
            return lp.view(labels.shape), lp.sum()
    elif name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def fn(hidden, weight, labels):
            lp = -linear_cross_entropy(hidden, weight, labels, reduction="none", impl="torch_compile")
            return lp, lp.sum()
    elif name == "trl":
        from trl.trainer.utils import selective_log_softmax

        def fn(hidden, weight, labels):
            lp = selective_log_softmax(F.linear(hidden, weight), labels)
            return lp, lp.sum()
    elif name == "torchtune":
        from torchtune.modules.loss import CEWithChunkedOutputLoss

        loss_fn = CEWithChunkedOutputLoss(num_output_chunks=chunks)

        def fn(hidden, weight, labels):
            logits = [F.linear(c, weight) for c in hidden.chunk(chunks, dim=1)]
            return None, -loss_fn(logits, labels) * labels.numel()
    else:
        raise ValueError(f"unknown implementation {name!r}")
    return fn


def _worker(name: str, cfg: dict, batch: int, length: int, dtype_name: str, mode: str, out: str) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    hidden, weight, labels = _inputs(cfg, batch, length, dtype)
    rows, ids = _checked_rows(cfg, labels)
    if name == "reference":
        return _reference(hidden, weight, labels, rows, ids, out)
    fn = _implementation(name)
    if name == "cce":  # compile before measuring (dynamic shapes: one graph for every size)
        small = [t.clone().requires_grad_(mode == "fwdbwd") for t in (hidden[:1, :8], weight[:64])]
        res = fn(*small, labels[:1, :8] % 64)[1]
        if mode == "fwdbwd":
            res.backward()
    if mode == "fwd":
        with torch.no_grad():
            result = {}

            def call():
                result["lp"], result["total"] = fn(hidden, weight, labels)

            res = _measure(call, 1)
        saved = {"total": result["total"].double()}
        if result["lp"] is not None:
            saved["lp"] = result["lp"].double().reshape(-1)
    else:
        hidden.requires_grad_()
        weight.requires_grad_()
        result = {}

        def call():
            result["lp"], result["total"] = fn(hidden, weight, labels)
            result["total"].backward()

        res = _measure(call, 0)
        saved = {
            "total": result["total"].detach().double(),
            "grad_hidden": hidden.grad.reshape(-1, hidden.shape[-1])[rows].double(),
            "grad_weight": weight.grad[ids].double(),
        }
        if result["lp"] is not None:
            saved["lp"] = result["lp"].detach().double().reshape(-1)
    torch.save(saved, out)
    return {"peak_bytes": res["peak_bytes"], "time_s": res["time_s"]}


def _reference(hidden, weight, labels, rows, ids, out: str) -> dict:
    """Exact (float64) lp of every position; gradients of Σ lp on the checked rows and vocabulary entries."""
    import torch

    h = hidden.reshape(-1, hidden.shape[-1]).double()
    lab = labels.reshape(-1)
    block = 8192
    lse = torch.full((h.shape[0],), float("-inf"), dtype=torch.float64)
    with torch.no_grad():
        w64 = weight.double()
        for v0 in range(0, w64.shape[0], block):
            lse = torch.logaddexp(lse, torch.logsumexp(h @ w64[v0 : v0 + block].T, -1))
        lp = (h * w64[lab]).sum(-1) - lse
        # d Σ lp / d h_n = W[label_n] − Σ_v p_nv W_v ;  d Σ lp / d W_v = Σ_n (1[label_n = v] − p_nv) h_n
        p_rows = torch.softmax(h[rows] @ w64.T, -1)
        grad_hidden = w64[lab[rows]] - p_rows @ w64
        p_ids = torch.exp(h @ w64[ids].T - lse[:, None])
        onehot = (lab[:, None] == ids[None, :]).double()
        grad_weight = (onehot - p_ids).T @ h
    torch.save({"lp": lp, "total": lp.sum(), "grad_hidden": grad_hidden, "grad_weight": grad_weight}, out)
    return {}


def _errors(got: dict, ref: dict) -> dict:
    err = {"total": abs(float(got["total"] - ref["total"])) / max(1.0, abs(float(ref["total"])))}
    if "lp" in got:
        err["lp"] = float((got["lp"] - ref["lp"]).abs().max())
    for key in ("grad_hidden", "grad_weight"):
        if key in got:
            err[key] = float((got[key] - ref[key]).abs().max() / ref[key].abs().max())
    return err


def _run(args: list[str], tmp: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _unavailable() -> dict[str, str]:
    missing = {}
    for impl, module in PEERS.items():
        if importlib.util.find_spec(module) is None:
            missing[impl] = f"{module} is not installed (nox -s bench installs it)"
    return missing


def _ablations(cfg: dict, n: int, dtype_name: str) -> None:
    """The ideas measured for issue 15, in one process at one size (ratios within each group).

    1. Layout of the LM-head product: all N positions at once (what ``logprobs_from_hidden`` runs per vocabulary
       block) against 110-position chunks over the whole vocabulary (the old forward) as contiguous 2-D rows, and as
       the strided 3-D slice the old code passed (the defect; timed on one chunk, scaled to N).
    2. Block width of ``logprobs_from_hidden`` (forward + backward).
    3. ``keep_logits`` against the recompute (forward + backward).
    4. ``torch.compile`` of the per-block element-wise work (forward: max, exp, sum; backward: exp, scale, cast)
       against eager, on the same blocks.
    """
    import torch
    import torch.nn.functional as F

    from vppo_core.logprobs import logprobs_from_hidden

    dtype = getattr(torch, dtype_name)
    batch, length = 1, n
    hidden, weight, labels = _inputs(cfg, batch, length, dtype)
    v = cfg["vocab"]

    def best(fn, calls=2):
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    h2 = hidden.reshape(n, -1)
    chunk = min(n, 110)
    with torch.no_grad():
        full = best(lambda: F.linear(h2, weight))
        rows2d = best(lambda: [F.linear(h2[i : i + chunk], weight) for i in range(0, n, chunk)])
        rows3d = best(lambda: F.linear(hidden.view(1, n, -1)[:, :chunk], weight), calls=1) * n / chunk
    print(f"  1. LM-head product over N={n:,} positions, {dtype_name} (ratio to all positions at once):")
    print(f"       all positions, one product      {full:7.2f} s  1.00")
    print(f"       {chunk}-position 2-D chunks        {rows2d:7.2f} s  {rows2d / full:4.2f}")
    print(f"       {chunk}-position strided 3-D slices {rows3d:7.2f} s  {rows3d / full:4.2f}   (the defect)")

    def fwd_bwd(**kw):
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()

        def run():
            logprobs_from_hidden(h, w, labels, **kw).sum().backward()

        return best(run, calls=1)

    print(f"  2./3. logprobs_from_hidden forward + backward, N={n:,}, {dtype_name} (ratio to the default):")
    default = fwd_bwd()
    print(f"       default blocks                  {default:7.2f} s  1.00")
    for width in (256, 1024, 4096, 16384):
        chunk_size = max(1, width * n // v)  # vocab_block: chunk_size · V / N entries
        t = fwd_bwd(chunk_size=chunk_size)
        print(f"       blocks of ~{width:>6,} entries       {t:7.2f} s  {t / default:4.2f}")
    t = fwd_bwd(keep_logits=True)
    print(f"       keep_logits=True                {t:7.2f} s  {t / default:4.2f}")

    def fwd_elementwise(z):
        zf = z.float()
        m = zf.amax(-1, keepdim=True)
        return m.squeeze(1) + (zf - m).exp().sum(-1).log()

    def bwd_elementwise(z, lse, g):
        return ((z.float() - lse).exp() * (-g)).to(z.dtype)

    width = 4096
    blocks = [F.linear(h2, weight[v0 : v0 + width]) for v0 in range(0, 8 * width, width)]
    lse, g = torch.full((n, 1), 12.0), torch.randn(n, 1)
    print(f"  4. per-block element-wise work, eager vs torch.compile, scaled to the whole vocabulary (N={n:,}):")
    for name, fn, args in (("forward", fwd_elementwise, ()), ("backward", bwd_elementwise, (lse, g))):
        compiled = torch.compile(fn, dynamic=False)
        compiled(blocks[0], *args)  # compile outside the timing
        eager_t = best(lambda fn=fn, args=args: [fn(z, *args) for z in blocks]) * v / (8 * width)
        comp_t = best(lambda c=compiled, args=args: [c(z, *args) for z in blocks]) * v / (8 * width)
        print(f"       {name:<8} eager {eager_t:6.3f} s   compiled {comp_t:6.3f} s   saves {eager_t - comp_t:6.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (H = 256, V = 16,384), about a minute")
    ap.add_argument("--impls", nargs="*", default=IMPLS, help=f"implementations to run (default: all of {IMPLS})")
    ap.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    ap.add_argument("--modes", nargs="*", default=["fwd", "fwdbwd"])
    ap.add_argument("--sizes", nargs="*", default=None, help="BxL, e.g. 4x1024 (default: the full or quick set)")
    ap.add_argument("--json", help="also write every measurement to this file")
    ap.add_argument("--ablations", action="store_true", help="measure the ideas tried (N = 1,024 bf16) and exit")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        name, cfg, b, l_, dtype, mode, out = args.worker
        print(json.dumps(_worker(name, json.loads(cfg), int(b), int(l_), dtype, mode, out)))
        return

    import torch

    cfg = dict(QUICK if args.quick else FULL)
    if args.ablations:
        print(f"log-prob ablations: H={cfg['hidden']:,}  V={cfg['vocab']:,}  torch {torch.__version__}")
        n = cfg["sizes"][-1][0] * cfg["sizes"][-1][1]
        for dtype in args.dtypes if args.dtypes != ["bfloat16", "float32"] else ["bfloat16"]:
            _ablations(cfg, n, dtype)
        return
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes] if args.sizes else cfg["sizes"]
    missing = _unavailable()
    impls = ["naive"] + [i for i in args.impls if i != "naive" and i not in missing]
    print(
        f"log-prob race: H={cfg['hidden']:,}  V={cfg['vocab']:,}  torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs; ratios are to `naive` in the same run"
    )
    for impl, why in missing.items():
        if impl in args.impls:
            print(f"  not run: {impl}: {why}")
    records, verdicts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for batch, length in sizes:
            n = batch * length
            for dtype in args.dtypes:
                ref_file = os.path.join(tmp, "reference.pt")
                t0 = time.perf_counter()
                res = _run(["reference", json.dumps(cfg), str(batch), str(length), dtype, "fwdbwd", ref_file], tmp)
                if "error" in res:
                    raise RuntimeError(f"the float64 reference failed: {res['error']}")
                ref = torch.load(ref_file, weights_only=True)
                print(f"\nN = {n:,} ({batch}x{length}), {dtype}  (float64 reference: {time.perf_counter() - t0:.0f} s)")
                for mode in args.modes:
                    table = {}
                    for impl in impls:
                        out = os.path.join(tmp, "result.pt")
                        res = _run([impl, json.dumps(cfg), str(batch), str(length), dtype, mode, out], tmp)
                        if "error" not in res:
                            res["errors"] = _errors(torch.load(out, weights_only=True), ref)
                        table[impl] = res
                        records.append({"n": n, "dtype": dtype, "mode": mode, "impl": impl, **res})
                    verdicts += _print_table(table, n, dtype, mode)
    print()
    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'MISS'}  {text}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))


def _print_table(table: dict, n: int, dtype: str, mode: str) -> list[tuple[str, bool]]:
    base = table["naive"]
    if "error" in base:
        raise RuntimeError(f"the naive baseline failed: {base['error']}")
    title = "forward, no grad" if mode == "fwd" else "forward + backward of Σ lp"
    print(f"  {title}: naive peak {_gib(base['peak_bytes'])}, {base['time_s']:.2f} s")
    hdr = f"    {'implementation':<14}{'memory':>9}{'time':>8}   {'lp err':>9}{'Σlp rel':>9}{'grad_h':>9}{'grad_W':>9}"
    print(hdr)
    for impl, res in table.items():
        if "error" in res:
            print(f"    {impl:<14}  failed: {res['error'][:90]}")
            continue
        e = res["errors"]
        cells = [f"{e[k]:9.1e}" if k in e else f"{'—':>9}" for k in ("lp", "total", "grad_hidden", "grad_weight")]
        print(
            f"    {impl:<14}{res['peak_bytes'] / base['peak_bytes']:9.3f}{res['time_s'] / base['time_s']:7.2f}x   "
            + "".join(cells)
        )
    where = f"N={n:,} {dtype}"
    out = []
    for name in ("vppo hidden", "vppo keep"):
        ours = table.get(name)
        if ours is None:
            continue
        if "error" in ours:
            out.append((f"{where} {mode}: {name} ran", False))
            continue
        if mode == "fwd":
            if name == "vppo hidden":  # keep_logits keeps nothing without grad: the same forward
                ratio = ours["peak_bytes"] / base["peak_bytes"]
                out.append((f"{where} forward: {name} peak {ratio:.3f} of naive <= 1/16", ratio <= 1 / 16))
            continue
        ratio = ours["time_s"] / base["time_s"]
        out.append((f"{where} fwd+bwd: {name} time {ratio:.2f}x naive <= 1", ratio <= 1))
        peers = {k: v for k, v in table.items() if k in PEERS and "error" not in v}
        if peers:
            fastest = min(peers, key=lambda k: peers[k]["time_s"])
            text = f"{where} fwd+bwd: {name} {ours['time_s']:.1f} s < fastest peer ({fastest}, {peers[fastest]['time_s']:.1f} s)"
            out.append((text, ours["time_s"] < peers[fastest]["time_s"]))
    return out


if __name__ == "__main__":
    main()
