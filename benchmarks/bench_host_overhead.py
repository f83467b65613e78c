"""Host time per call of the registered ops, with every kernel launch stubbed (CPU).

What a GPU host pays per call besides the launches and the kernels: argument checks, backend and algorithm
choice, the op's dispatch (eager fast path or custom op), autograd bookkeeping, the torch glue around the
launches. Each Triton launcher (`uno_engine.kernels.*`) is replaced by a stub that returns preallocated
outputs of the right shapes, so the numbers do not depend on the kernels. Ops: linear cross-entropy (loss
only; forward + backward with the gradient formed in the forward; forward + backward with the recompute
backward), fused regression (forward; forward + backward), bridge (forward; forward + backward).

    python benchmarks/bench_host_overhead.py                        # this working tree
    python benchmarks/bench_host_overhead.py --compare /tmp/head    # side by side with another checkout

--compare runs this script on both trees in alternating subprocesses (`--rounds` each), so drift of a
shared machine hits both alike, and reports the median over rounds of each tree's median, and the ratio.
The other tree needs `uno_engine/kernels` importable from its root (e.g. a symlink to ../kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # backend="triton" on CPU tensors; launches are stubbed

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import add_output_args, env_metadata, output_dir, print_table, write_results  # noqa: E402


def _stub_lce(counts):
    import uno_engine.kernels.linear_cross_entropy as K

    def forward(hidden, weight, labels, bias, **kw):
        counts["launches"] += 1
        N = hidden.shape[0]
        return hidden.new_zeros(N, dtype=torch.float32), hidden.new_zeros((2, N), dtype=torch.float32)

    def backward(g, hidden, weight, labels, bias, lse, *, need_dhidden, need_dweight, need_dbias, **kw):
        counts["launches"] += 1
        return (
            torch.empty_like(hidden) if need_dhidden else None,
            torch.empty(weight.shape, dtype=torch.float32) if need_dweight else None,
            torch.empty(weight.shape[0], dtype=torch.float32) if need_dbias else None,
        )

    def grad_in_forward(hidden, weight, labels, bias, *, need_dhidden, need_dweight, need_dbias, **kw):
        counts["launches"] += 1
        N = hidden.shape[0]
        return (
            hidden.new_zeros(N, dtype=torch.float32),
            torch.empty_like(hidden) if need_dhidden else None,
            torch.empty(weight.shape, dtype=torch.float32) if need_dweight else None,
            torch.empty(weight.shape[0], dtype=torch.float32) if need_dbias else None,
        )

    def scale_rows_(x, g):
        counts["launches"] += 1
        return x

    K.linear_cross_entropy_forward = forward
    K.linear_cross_entropy_backward = backward
    # the launcher's former name too, for --compare against older checkouts
    for name in ("linear_cross_entropy_gif", "linear_cross_entropy_grad_in_forward"):
        setattr(K, name, grad_in_forward)
    K.scale_rows_ = scale_rows_


def _stub_regression(counts):
    import uno_engine.kernels.regression as K

    def stub(*a, **k):
        counts["launches"] += 1

    K.launch_forward = K.launch_finish = K.launch_scale = stub


def _stub_bridge(counts):
    import uno_engine.kernels.bridge as K

    def forward(images, tables, consts, canvas, region, input_range, *, qwen, out_dtype, **kw):
        counts["launches"] += 1
        B = images.shape[0]
        return images.new_empty((B, 3, *canvas), dtype=out_dtype), None

    def backward(grad_out, images, side, *a, **kw):
        counts["launches"] += 1
        return torch.empty_like(images)

    K.bridge_forward = forward
    K.bridge_backward = backward


def cases(impl_kw: bool):
    """(op, case, fn) triples; fn() runs one call."""
    from uno_engine import ops
    from uno_engine.bridge_spec import BridgeSpec

    out = []
    # linear cross-entropy: 8 tokens, H 64, V 128 (the host path does not depend on the size)
    torch.manual_seed(0)
    h = torch.randn(8, 64, requires_grad=True)
    w = torch.randn(128, 64)
    y = torch.randint(0, 128, (8,))

    def lce(impl):
        kw = {"impl": impl} if impl_kw else {}
        return ops.linear_cross_entropy(h, w, y, backend="triton", **kw)

    def lce_fwd():
        with torch.no_grad():
            return lce("auto")

    def lce_gif():
        if not impl_kw:
            os.environ["UNO_LCE_IMPL"] = "gif"
        return torch.autograd.grad(lce("grad_in_forward"), h)

    def lce_rec():
        if not impl_kw:
            os.environ["UNO_LCE_IMPL"] = "recompute"
        try:
            return torch.autograd.grad(lce("recompute"), h)
        finally:
            os.environ.pop("UNO_LCE_IMPL", None)

    out += [
        ("linear_cross_entropy", "fwd (no grad)", lce_fwd),
        ("linear_cross_entropy", "fwd+bwd grad_in_forward", lce_gif),
        ("linear_cross_entropy", "fwd+bwd recompute", lce_rec),
    ]

    # fused regression: 3 terms as in bench_regression (mse, smooth_l1 with mask, cosine)
    B, N, D = 2, 9, 32
    preds = [torch.randn(B, N, D, requires_grad=True) for _ in range(3)]
    mask = torch.rand(B, N) > 0.3
    terms = [
        ops.RegressionTerm(preds[0], torch.randn(B, N, D), "mse"),
        ops.RegressionTerm(preds[1], torch.randn(B, N, D), "smooth_l1", mask=mask[..., None], weight=0.5),
        ops.RegressionTerm(preds[2], torch.randn(B, N, D), "cosine", mask=mask),
    ]

    def reg_fwd():
        with torch.no_grad():
            return ops.fused_regression(terms, backend="triton")

    def reg_fwd_bwd():
        total, _ = ops.fused_regression(terms, backend="triton")
        return torch.autograd.grad(total, preds)

    out += [("fused_regression", "fwd (no grad)", reg_fwd), ("fused_regression", "fwd+bwd", reg_fwd_bwd)]

    # bridge: 2 x 3 x 64 x 64 -> 32 x 32
    spec = BridgeSpec(resize="exact", size=(32, 32))
    img = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)

    def br_fwd():
        with torch.no_grad():
            return ops.bridge(img, spec, backend="triton")

    def br_fwd_bwd():
        return torch.autograd.grad(ops.bridge(img, spec, backend="triton").sum(), img)

    out += [("bridge", "fwd (no grad)", br_fwd), ("bridge", "fwd+bwd", br_fwd_bwd)]
    return out


def run_here(rep: int) -> list[dict]:
    import inspect

    from uno_engine import ops

    counts = {"launches": 0}
    _stub_lce(counts)
    _stub_regression(counts)
    _stub_bridge(counts)
    impl_kw = "impl" in inspect.signature(ops.linear_cross_entropy).parameters
    rows = []
    for op, case, fn in cases(impl_kw):
        for _ in range(30):
            fn()
        counts["launches"] = 0
        fn()
        n_launch = counts["launches"]
        ts = []
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e6)
        rows.append(
            {"op": op, "case": case, "host_us": round(statistics.median(ts), 1), "launches": n_launch}
        )
    return rows


def _subprocess(tree: str | None, rep: int) -> list[dict]:
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--json", "--rep", str(rep)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd="/" if tree else None,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rep", type=int, default=400, help="timed calls per case")
    ap.add_argument("--compare", default=None, help="root of another checkout to compare against")
    ap.add_argument("--rounds", type=int, default=3, help="alternating subprocess runs per tree (--compare)")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tag", default=None)
    ap.add_argument("--no-write", action="store_true")
    add_output_args(ap)
    args = ap.parse_args()
    if args.json:
        print(json.dumps(run_here(args.rep)))
        return
    meta = env_metadata("cpu")
    meta["torch_threads"] = torch.get_num_threads()
    if args.compare is None:
        rows = run_here(args.rep)
        cols = ["op", "case", "host_us", "launches"]
    else:
        runs = {"this": [], "other": []}
        for _ in range(args.rounds):
            runs["other"].append(_subprocess(args.compare, args.rep))
            runs["this"].append(_subprocess(None, args.rep))
        rows = []
        for i, r in enumerate(runs["this"][0]):
            other = [run[i]["host_us"] for run in runs["other"]]
            this = [run[i]["host_us"] for run in runs["this"]]
            o, t = statistics.median(other), statistics.median(this)
            rows.append(
                {
                    "op": r["op"],
                    "case": r["case"],
                    "other_us": round(o, 1),
                    "this_us": round(t, 1),
                    "this/other": round(t / o, 3),
                    "launches other/this": f"{runs['other'][0][i]['launches']}/{r['launches']}",
                }
            )
        meta["other_tree"] = args.compare
        cols = ["op", "case", "other_us", "this_us", "this/other", "launches other/this"]
    print_table(rows, cols, title=f"host time per call, launches stubbed, {meta['device']}")
    if not args.no_write:
        paths = write_results("bench_host_overhead", rows, meta, tag=args.tag, out_dir=output_dir(args))
        print("wrote", *paths)


if __name__ == "__main__":
    main()
