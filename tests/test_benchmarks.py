"""Smoke test of the main benchmark on the CPU: `benchmarks/step_throughput.py` on the tiny preset with very
few steps, in a subprocess (benchmarks are never imported by tests), then its JSON, its picture, `--compare`,
`plot.py`, and a provider added from outside (the plug-in interface of benchmarks/_step.py).

It checks the plumbing and the figures' consistency, not speed (no timing assertions)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
pytestmark = pytest.mark.slow


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the engine's CPU path is torch
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`: relative path -> (size, mtime in ns)."""
    files = (f for f in folder.rglob("*") if f.is_file())
    return {str(f.relative_to(folder)): (f.stat().st_size, f.stat().st_mtime_ns) for f in files}


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """The main job with its default output folder, as a user runs it (no --out-dir, no --record), on a copy of
    benchmarks/ whose results/ holds one committed-looking file: the default folder is the copy's, so this
    never writes into the repository (nor races another xdist worker there)."""
    bench = tmp_path_factory.mktemp("clone") / "benchmarks"
    bench.mkdir()
    for script in BENCH.glob("*.py"):
        shutil.copy2(script, bench / script.name)
    committed = bench / "results" / "step_throughput-tiny-cpu.json"
    committed.parent.mkdir()
    committed.write_text('{"meta": {}, "rows": []}\n')
    before = _tree(bench / "results")
    proc = _run(
        [
            str(bench / "step_throughput.py"),
            "--preset",
            "tiny",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--profile-steps",
            "1",
            "--allow-few-steps",
            "--device",
            "cpu",
            "--quick-ceilings",
        ]
    )
    assert proc.returncode == 0, _explain(proc)
    assert _tree(bench / "results") == before, "a run without --record wrote into benchmarks/results/"
    out = bench / "runs"
    files = sorted(out.glob("step_throughput-tiny-*.json"))
    assert len(files) == 1, (
        f"expected one results JSON in {out}, found {[f.name for f in files]}\n" + _explain(proc)
    )
    return files[0], proc


def test_a_default_run_writes_to_the_ignored_runs_folder_and_says_so(tiny_results):
    """The README's first command leaves the committed figures alone: it writes benchmarks/runs/ (checked in
    the fixture: the copy's results/ is byte- and time-identical after the run), a folder git ignores, and
    prints where it wrote."""
    path, proc = tiny_results
    assert path.parent.name == "runs"
    assert f"wrote {os.path.relpath(path, ROOT)}" in proc.stdout, proc.stdout[-2000:]  # relative to its cwd
    assert "results go to" in proc.stderr and "--record" in proc.stderr
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "benchmarks/runs/step_throughput-tiny-cpu.json"], cwd=ROOT
    )
    if ignored.returncode == 128:  # not a git checkout (an unpacked sdist): nothing to ignore
        pytest.skip("no git repository here")
    assert ignored.returncode == 0, "benchmarks/runs/ must be ignored by git (.gitignore)"


def test_record_and_out_dir_choose_the_folder(tmp_path):
    """--record writes the committed folder, --out-dir the one given, neither the ignored runs folder; the two
    flags together are refused. Checked on the parser alone (nothing is measured)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import harness, step_throughput as st\n"
        "for argv in ([], ['--record'], ['--out-dir', sys.argv[2]]):\n"
        "    args, _ = st.parse_args(argv + ['--device', 'cpu'])\n"
        "    print(harness.output_dir(args))\n"
        "st.parse_args(['--record', '--out-dir', sys.argv[2]])\n"
    )
    proc = _run(["-c", code, str(BENCH), str(tmp_path)], timeout=120)
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr, _explain(proc)
    assert proc.stdout.split() == [str(BENCH / "runs"), str(BENCH / "results"), str(tmp_path)], proc.stdout


def test_step_throughput_tiny_writes_results(tiny_results):
    path, proc = tiny_results
    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["rows"]
    for key in ("device", "date", "commit", "torch", "ceilings", "goals"):
        assert key in meta, f"meta lacks {key!r}: {sorted(meta)}"
    assert meta["ceilings"]["matmul_TFLOPs"] > 0 and meta["ceilings"]["copy_GBps"] > 0
    assert path.with_suffix(".csv").exists()
    by = {r["provider"]: r for r in rows}
    # compile providers are skipped on the CPU, with a printed note
    assert set(by) == {"generation-only", "eager", "engine"}, sorted(by)
    note = next(line for line in proc.stderr.splitlines() if line.startswith("note: providers"))
    assert "eager+compile, engine+compile" in note and "do not run by default on the CPU" in note, note
    # the checkpoint policy the critic runs: "auto" resolved to "none" for the tiny critic (0.4 MiB/image)
    assert by["eager"]["checkpoint"] == "none" and by["engine"]["checkpoint"] == "none"
    for prov, r in by.items():
        assert not r.get("error"), f"{prov}: {r['error']}"
        assert r["preset"] == "tiny" and r["batch"] >= 1 and r["steps"] == 2
        assert r["median_ms"] > 0 and r["images_per_s"] > 0, r
        assert r["peak_MB"] is not None and r["peak_MB"] > 0, r
    gen = by["generation-only"]
    for prov in ("eager", "engine"):
        r = by[prov]
        assert r["overhead_ms"] == pytest.approx(r["median_ms"] - gen["median_ms"])
        assert r["overhead_pct"] == pytest.approx(100 * r["overhead_ms"] / gen["median_ms"])
        assert r["critic_fwd_GFLOP"] > 0 and r["floor_ms"] > 0
        assert r["overhead_over_floor"] == pytest.approx(r["overhead_ms"] / r["floor_ms"])
        for ph in ("generate", "bridge", "critic", "loss", "loss_bwd", "critic_bwd", "bridge_bwd"):
            assert r[f"phase_{ph}_ms"] >= 0, (prov, ph, r[f"phase_{ph}_ms"])
        parts = sum(r[f"overhead_{k}_ms"] for k in ("bridge", "critic", "loss", "other"))
        assert parts == pytest.approx(r["overhead_ms"])
    assert by["engine"]["time_vs_eager"] == pytest.approx(
        by["engine"]["median_ms"] / by["eager"]["median_ms"]
    )
    # the table is printed at the end, and the goals with their figures
    assert "median_ms" in proc.stdout and "overhead_pct" in proc.stdout and "engine" in proc.stdout
    goals = {g["goal"]: g for g in meta["goals"]}
    t_goal = goals["CPU: step time <= 1.1x eager"]
    assert t_goal["measured"] == pytest.approx(by["engine"]["time_vs_eager"], abs=1e-3)
    assert t_goal["status"] == ("met" if by["engine"]["time_vs_eager"] <= 1.1 else "MISSED")


def test_step_throughput_draws_the_phase_picture(tiny_results):
    """The README's first command draws the per-phase PNG beside the results (matplotlib is a dependency)."""
    path, proc = tiny_results
    png = path.parent / "step_throughput.png"
    assert png.exists() and png.stat().st_size > 10_000, _explain(proc)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in proc.stdout


def test_compare_flags_regressions(tiny_results, tmp_path):
    path, _ = tiny_results
    same = _run(
        [str(BENCH / "step_throughput.py"), "--from-results", str(path), "--compare", str(path)], timeout=120
    )
    assert same.returncode == 0, _explain(same)
    assert "compared with" in same.stdout
    # a committed baseline twice as fast as this run: every time metric is > 10% worse -> exit 1
    data = json.loads(path.read_text())
    faster = copy.deepcopy(data)
    for r in faster["rows"]:
        r["median_ms"] = r["median_ms"] / 2
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps(faster))
    worse = _run(
        [str(BENCH / "step_throughput.py"), "--from-results", str(path), "--compare", str(base)], timeout=120
    )
    assert worse.returncode == 1, _explain(worse)
    assert "WORSE" in worse.stdout


def test_rejects_too_few_steps():
    proc = _run([str(BENCH / "step_throughput.py"), "--steps", "3"], timeout=120)
    assert proc.returncode == 2 and "--allow-few-steps" in proc.stderr, _explain(proc)


def test_plot_draws_png(tiny_results, tmp_path):
    path, _ = tiny_results
    png = tmp_path / "plot.png"
    proc = _run([str(BENCH / "plot.py"), str(path), "--out", str(png)], timeout=120)
    assert proc.returncode == 0, _explain(proc)
    assert png.exists() and png.stat().st_size > 1000


def test_plot_without_matplotlib_exits_cleanly(tiny_results, tmp_path):
    """matplotlib is blocked in the child (sys.modules entry None), so this path runs whether or not it is
    installed."""
    path, _ = tiny_results
    block = (
        "import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    proc = _run(
        ["-c", block, str(BENCH / "plot.py"), str(path), "--out", str(tmp_path / "plot.png")], timeout=120
    )
    assert proc.returncode == 0, _explain(proc)
    assert "matplotlib is not installed" in proc.stdout


def test_step_throughput_janus_preset(tmp_path):
    """The unified-model path: tiny Janus as its own critic, with the cached-sampling generator."""
    proc = _run(
        [
            str(BENCH / "step_throughput.py"),
            "--preset",
            "tiny-janus",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--profile-steps",
            "1",
            "--allow-few-steps",
            "--device",
            "cpu",
            "--quick-ceilings",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert proc.returncode == 0, _explain(proc)
    rows = json.loads(next(tmp_path.glob("step_throughput-tiny-janus-*.json")).read_text())["rows"]
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"generation-only", "eager", "engine"}, sorted(by)
    for prov, r in by.items():
        assert not r.get("error"), f"{prov}: {r['error']}"
        assert r["median_ms"] > 0 and r["janus_sampling"] == "cached" and r["sample_ms"] > 0, r


def test_cached_sampling_janus_matches_janus_generator():
    """The benchmark's cached-sampling Janus generator computes the same images and generator gradients as
    JanusGenerator on the same batch (later calls reuse the first call's tokens via batch["gen_tokens"])."""
    import torch

    from uno_engine.generators import JanusGenerator
    from uno_engine.testing.presets import build_preset

    preset = build_preset("tiny-janus", janus_sampling="cached")
    cached = preset.generator
    plain = JanusGenerator(preset.hf_model)
    batch = preset.make_batch()
    params = cached.trainable_parameters()
    assert params and [id(p) for p in params] == [id(p) for p in plain.trainable_parameters()]

    def run(gen):
        for p in params:
            p.grad = None
        images = gen(batch)
        images.float().square().mean().backward()
        return images.detach(), [p.grad.clone() for p in params]

    ref_images, ref_grads = run(plain)
    run(cached)  # first call: samples (the plain forward) and caches the tokens
    assert torch.equal(cached.last_tokens, plain.last_tokens)
    images, grads = run(cached)  # second call: the cached training part only
    torch.testing.assert_close(images, ref_images, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


PROBE_PROVIDER = """
import sys
sys.path.insert(0, {bench!r})
import _step
import step_throughput


@_step.provider("probe", default_on=(), doc="the engine with the torch backend (a plug-in provider)")
def probe(preset, loss):
    from uno_engine import UNOConfig, UNOStep

    return UNOStep(preset.generator, preset.make_critic("selective"), loss, UNOConfig(backend="torch"))


try:
    _step.provider("probe")(probe)
except ValueError as e:
    print("duplicate refused:", e)
sys.exit(step_throughput.main(sys.argv[1:]))
"""


def test_a_provider_plugs_in_with_a_decorator(tmp_path):
    """A provider registered from outside with `@_step.provider` gets a full row (time, overhead, phases,
    peak, ratios to eager) and its critic's checkpoint policy; it runs only when named (default_on=())."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE_PROVIDER.format(bench=str(BENCH)))
    common = ["--preset", "tiny", "--steps", "1", "--warmup", "1", "--profile-steps", "1"]
    common += ["--allow-few-steps", "--device", "cpu", "--quick-ceilings", "--no-plot"]
    proc = _run([str(script), *common, "--providers", "eager,probe", "--out-dir", str(tmp_path)])
    assert proc.returncode == 0, _explain(proc)
    assert "duplicate refused: provider 'probe' is already registered" in proc.stdout
    assert not (tmp_path / "step_throughput.png").exists()  # --no-plot
    rows = json.loads(next(tmp_path.glob("step_throughput-tiny-*.json")).read_text())["rows"]
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"generation-only", "eager", "probe"}, sorted(by)
    probe = by["probe"]
    assert not probe.get("error") and probe["checkpoint"] == "selective", probe
    assert probe["median_ms"] > 0 and probe["peak_MB"] > 0 and probe["phase_critic_bwd_ms"] >= 0
    assert probe["time_vs_eager"] == pytest.approx(probe["median_ms"] / by["eager"]["median_ms"])
