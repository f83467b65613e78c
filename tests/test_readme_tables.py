"""The result tables of README.md and docs/benchmarks.md are generated from the committed
benchmarks/results/*.json (benchmarks/readme_tables.py), which only a benchmark run with --record writes (a user's
default run writes benchmarks/runs/: tests/test_benchmarks.py), and benchmarks/gpu_all.sh, the one GPU call that
re-measures them, is well-formed and calls the scripts' real CLIs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import readme_tables as rt  # noqa: E402

GPU_ALL = ROOT / "benchmarks" / "gpu_all.sh"
RESULTS = ROOT / "benchmarks" / "results"


def _mask_freshness(text: str) -> str:
    """The status after each commit cell (only where git cannot answer: a shallow clone)."""
    return re.sub(r"(`[0-9a-f]{7,40}`(\+dirty)?)[^|]*", r"\1", text)


# ------------------------------------------------------------------------------------- the README tables
def test_readme_tables_equal_the_results_files():
    blocks = rt.generate(RESULTS)
    assert sorted(rt.BLOCKS) == ["cpu-goals", "cpu-table", "gpu-table"]
    for rel, names in rt.TARGETS.items():
        text = (ROOT / rel).read_text()
        for name in names:
            got, want = rt.extract(text, name), blocks[name]
            if not rt.git_usable():  # a shallow clone cannot tell stale figures from current ones
                got, want = _mask_freshness(got), _mask_freshness(want)
            assert got == want, (
                f"{rel}: block {name} is not what the results say: run benchmarks/readme_tables.py"
            )


def test_each_block_lives_in_one_file():
    for rel, names in rt.TARGETS.items():
        text = (ROOT / rel).read_text()
        for name in rt.BLOCKS:
            assert text.count(f"<!-- {name}:begin -->") == (name in names), (rel, name)


def test_render_round_trips_and_check_flags_an_edited_number(tmp_path):
    readme = (ROOT / "README.md").read_text()
    blocks = {name: text for name, text in rt.generate().items() if name in rt.TARGETS["README.md"]}
    once = rt.render(readme, blocks)
    assert rt.render(once, blocks) == once  # idempotent
    for name in blocks:
        assert rt.extract(once, name) == blocks[name]
    # a hand-edited number inside a generated table: --check fails, a rewrite restores the generated text
    block = rt.extract(once, "cpu-table")
    number = re.search(r"\| (\d+\.\d+) \|", block)
    assert number is not None
    edited = once.replace(block, block.replace(number.group(0), f"| {float(number.group(1)) + 1:.1f} |", 1))
    assert edited != once
    path = tmp_path / "README.md"
    path.write_text(edited)
    for rel in rt.TARGETS:
        if rel != "README.md":
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, tmp_path / rel)
    assert rt.main(["--check", "--root", str(tmp_path)]) == 1
    assert rt.main(["--root", str(tmp_path)]) == 0
    assert path.read_text() == once
    assert rt.main(["--check", "--root", str(tmp_path)]) == 0
    with pytest.raises(ValueError, match="cpu-goals"):
        rt.render(readme.replace("<!-- cpu-goals:end -->", ""), blocks)


def _ms(x: float) -> str:
    """The README's rule for times: 3 digits below 10, one decimal below 100, none above."""
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _rows(name: str) -> list[dict]:
    return json.loads((RESULTS / name).read_text())["rows"]


def _fig(x: float, digits: int = 3) -> str:
    """The README's rule for figures, written out: no decimal from 100, one from 10, `digits - 1` decimals from
    1, `digits` significant digits below 1 (in magnitude)."""
    if abs(x) >= 100:
        return str(round(x))
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{digits - 1}f}"


def _engine_cells(results_dir: Path | None = None) -> list[str]:
    block = rt.generate(results_dir or RESULTS)["cpu-table"]
    engine = next(line for line in block.splitlines() if line.startswith("| tiny | engine |"))
    return [c.strip() for c in engine.strip("|").split("|")]


def _check_engine_cells(cells: list[str], e: dict) -> None:
    assert cells[2] == _fig(e["median_ms"])
    assert cells[4] == (f"{e['peak_MB']:.2f}" if e["peak_MB"] < 100 else _fig(e["peak_MB"]))
    assert cells[5] == f"{_fig(e['overhead_ms'], 2)} ms ({_fig(e['overhead_pct'], 2)}%)"
    assert cells[7] == f"{e['time_vs_eager']:.3f} / {e['peak_vs_eager']:.3f}"


def test_generated_cells_are_the_json_numbers():
    """Independent formatting of a few committed figures, found in the generated rows."""
    blocks = rt.generate()
    cpu = {r["provider"]: r for r in _rows("step_throughput-tiny-cpu.json")}
    _check_engine_cells(_engine_cells(), cpu["engine"])
    goals = json.loads((RESULTS / "step_throughput-mid-cpu.json").read_text())["meta"]["goals"]
    for g in goals:
        row = next(
            line for line in blocks["cpu-goals"].splitlines() if line.startswith(f"| {g['goal'][5:]} | mid |")
        )
        status = "met" if g["status"] == "met" else f"**{g['status']}**"
        assert f"| {g['measured']:.3f}x | {status} |" in row, row
    gpu = blocks["gpu-table"].splitlines()
    lce_files = sorted(RESULTS.glob("linear_cross_entropy-nvidia_*.json"))
    bridge_files = sorted(RESULTS.glob("bench_bridge-nvidia_*.json"))
    assert lce_files and bridge_files
    for r in _rows(lce_files[0].name):
        if r["provider"] == "ours" and r.get("fwd_bwd_ms") is not None:
            row = next(line for line in gpu if f"N={r['N']}, V={r['V']}" in line)
            assert row.split("|")[3].strip().startswith(f"{_ms(r['fwd_bwd_ms'])} ms")
    for r in _rows(bridge_files[0].name):
        if r["provider"] == "triton":
            row = next(line for line in gpu if line.startswith(f"| bridge fwd / bwd, {r['case']} |"))
            assert row.split("|")[3].strip().startswith(f"{_ms(r['fwd_ms'])} / {_ms(r['bwd_ms'])} ms")


@pytest.mark.parametrize(
    "median_ms, overhead_ms",
    [(68.8, 6.8), (104.3, 12.4), (9.87, 0.654), (1234.5, 150.2), (99.96, -0.35)],
)
def test_generated_cells_follow_the_rule_at_every_magnitude(tmp_path, median_ms, overhead_ms):
    """The same check on a results file with figures of other magnitudes than the committed ones (a slower
    machine's tiny step is over 100 ms): the check must not depend on which side of 10 or 100 a run lands."""
    data = json.loads((RESULTS / "step_throughput-tiny-cpu.json").read_text())
    for r in data["rows"]:
        if r["provider"] == "engine":
            r.update(median_ms=median_ms, overhead_ms=overhead_ms, overhead_pct=100 * overhead_ms / 62.04)
            engine = r
    (tmp_path / "step_throughput-tiny-cpu.json").write_text(json.dumps(data))
    _check_engine_cells(_engine_cells(tmp_path), engine)


def test_figures_from_an_old_commit_are_marked_stale_not_hidden(tmp_path):
    """21aec89 (the first H200 session's tree) predates the current bridge kernels: its figures stay in the
    table, marked stale (or 'not checked' where the clone has no history)."""
    meta = {"device": "NVIDIA H200", "commit": "21aec89+dirty", "torch": "2.11.0+cu130", "triton": "3.6.0"}
    rows = [{"case": "janus", "provider": "triton", "shape": "8x3x1024x1024->384x384", "dtype": "fp32",
             "fwd_ms": 0.1716, "bwd_ms": 0.1922}]  # fmt: skip
    (tmp_path / "bench_bridge-nvidia_h200.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    block = rt.generate(tmp_path)["gpu-table"]
    row = next(line for line in block.splitlines() if line.startswith("| bridge fwd / bwd, janus |"))
    assert "0.172 / 0.192 ms" in row and "`21aec89`+dirty" in row
    assert ("**stale**" if rt.git_usable() else "not checked") in row


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    return subprocess.run(
        ["git", "-c", "commit.gpgsign=false", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout


def test_freshness_follows_the_history(tmp_path, monkeypatch):
    """A figure is current at or after the kernels' last commit, stale before it or with the kernels modified
    in the working tree; an unknown commit or one missing from the history is never shown as current."""
    repo = tmp_path / "repo"
    (repo / "kernels").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "kernels" / "bridge.py").write_text("v = 1\n")
    (repo / "README.md").write_text("x\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "a")
    a = _git(repo, "rev-parse", "--short", "HEAD").strip()
    (repo / "README.md").write_text("y\n")
    _git(repo, "commit", "-q", "-am", "b (no kernel change)")
    b = _git(repo, "rev-parse", "--short", "HEAD").strip()
    monkeypatch.setattr(rt, "ROOT", repo)
    for f in (rt.git_usable, rt._last_change, rt.freshness):
        f.cache_clear()
    assert rt.freshness(a, "bridge") == f"`{a}`"
    assert rt.freshness(b + "+dirty", "bridge") == f"`{b}`+dirty"
    assert "stale?" in rt.freshness("unknown", "bridge")
    assert "stale?" in rt.freshness("0123abc", "bridge")  # not in this history
    (repo / "kernels" / "bridge.py").write_text("v = 2\n")
    for f in (rt._last_change, rt.freshness):
        f.cache_clear()
    assert rt.freshness(b, "bridge") == f"`{b}`, **stale**"  # modified in the working tree
    _git(repo, "commit", "-q", "-am", "c (kernel change)")
    c = _git(repo, "rev-parse", "--short", "HEAD").strip()
    for f in (rt._last_change, rt.freshness):
        f.cache_clear()
    assert rt.freshness(b, "bridge") == f"`{b}`, **stale**"  # the same mark once committed
    assert rt.freshness(c, "bridge") == f"`{c}`"
    for f in (rt.git_usable, rt._last_change, rt.freshness):
        f.cache_clear()


# ------------------------------------------------------------------------------------------ gpu_all.sh
def _dry_run(**env) -> list[str]:
    out = subprocess.run(
        ["bash", str(GPU_ALL)],
        env={**os.environ, "DRY_RUN": "1", "OUT": "/nonexistent/uno_gpu_out", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return [
        line for line in out.stdout.splitlines() if line.startswith("[") and not line.startswith("[setup]")
    ]


def test_gpu_all_parses_and_dry_run_lists_the_parts_in_order():
    assert subprocess.run(["bash", "-n", str(GPU_ALL)], capture_output=True).returncode == 0
    lines = _dry_run()
    parts = list(dict.fromkeys(line[1 : line.index("]")] for line in lines))
    assert parts == "info bridge lce regression critic tests steps families diag compile".split()
    text = "\n".join(lines)
    assert "--kernel two_pass" in text and "--kernel fused" in text
    lce = next(line for line in lines if line.startswith("[lce]"))
    assert " native " in lce and " liger " in lce and " ours " in lce
    steps = [line for line in lines if line.startswith("[steps]")]
    assert any("--preset sd15-llava7b" in s for s in steps) and any(
        "--preset janus-pro-1b" in s for s in steps
    )
    tests = next(line for line in lines if line.startswith("[tests]"))
    assert tests.rstrip().endswith(" tests") and "TRITON_INTERPRET" not in tests  # the whole suite
    assert not Path("/nonexistent/uno_gpu_out").exists()
    # every benchmark that writes results records them where the README's figures come from (--record)
    writers = [line for line in lines if re.search(r"benchmarks/(bench_\w+|step_throughput)\.py", line)]
    assert len(writers) >= 8 and all(line.rstrip().endswith(" --record") for line in writers), writers
    # a second call runs only the parts it names
    assert {line[1 : line.index("]")] for line in _dry_run(PARTS="steps compile")} == {"steps", "compile"}


def test_gpu_all_calls_existing_scripts_presets_and_flags():
    """Every benchmark script the dry run calls exists and defines each flag it passes; every preset exists."""
    from uno_engine.testing.presets import PRESETS

    for line in _dry_run():
        m = re.search(r"(benchmarks/\w+\.py)(.*)", line)
        if m is None:
            continue
        script = ROOT / m.group(1)
        assert script.exists(), line
        src = script.read_text()
        if script.name == "step_throughput.py":
            src += (ROOT / "benchmarks" / "_step.py").read_text()
        if "add_output_args(" in src:  # --out-dir and --record: the harness's, shared by every benchmark
            src += (ROOT / "benchmarks" / "harness.py").read_text()
        for flag in re.findall(r"\s(--[a-z][a-z0-9-]*)", m.group(2)):
            negated = flag.startswith("--no-") and f'"--{flag[5:]}"' in src and "BooleanOptionalAction" in src
            assert f'"{flag}"' in src or negated, f"{script.name} has no {flag}: {line}"
        for preset in re.findall(r"--preset (\S+)", m.group(2)):
            assert preset in PRESETS, line


def test_gpu_all_plumbing_stamps_packs_and_records(tmp_path):
    """A real (not dry) run with a stand-in python for the measured parts: the results it writes get the run's
    commit, come back in results.tgz, and run.json / summary.txt list the stages; an exhausted budget skips."""
    fake = tmp_path / "python3"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$*" == "-P -m uno_engine.info" ]]; then\n'
        '  echo \'{"meta": {"device": "NVIDIA Fake", "commit": "unknown"}, "rows": []}\' '
        '> "$GPU_ALL_RESULTS/bench_fake-nvidia_fake.json"; echo info-ok; exit 0\n'
        "fi\n"
        f'exec {shutil.which("python3") or sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    results, out = tmp_path / "results", tmp_path / "out"
    results.mkdir()
    env = {**os.environ, "PYTHON": str(fake), "SKIP_SETUP": "1", "GPU_ALL_RESULTS": str(results), "OUT": str(out),
           "PARTS": "info", "UNO_COMMIT": "feedbeef"}  # fmt: skip
    p = subprocess.run(["bash", str(GPU_ALL)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    meta = json.loads((results / "bench_fake-nvidia_fake.json").read_text())["meta"]
    expected = head.stdout.strip() if head.returncode == 0 else "feedbeef"
    assert meta["commit"].split("+")[0] == expected and meta["commit_seen"] == "unknown"
    assert meta["run"] == {"script": "gpu_all.sh", "part": "info"}
    with tarfile.open(out / "results.tgz") as tar:
        names = set(tar.getnames())
    assert "results/bench_fake-nvidia_fake.json" in names and "results/logs/gpu_all-info.log" in names
    run = json.loads((out / "run.json").read_text())
    assert run["commit"] == meta["commit"] and [s["status"] for s in run["stages"]] == ["ok"]
    assert "info-ok" in (out / "log.txt").read_text()
    # no budget left: every stage skipped, and the summary names the parts for the next call
    p = subprocess.run(["bash", str(GPU_ALL)], env={**env, "BUDGET_S": "20", "PARTS": "info regression"},
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert 'PARTS="info regression"' in (out / "summary.txt").read_text()
