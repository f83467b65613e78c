"""The value path's arm of the learning benchmark (benchmarks/learning_lib/value.py): its wiring through the
ablation registry on untrained models, and the paired standard error of the quick check."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from learning_lib import experiment, models, value  # noqa: E402


def test_paired_standard_error_by_hand():
    before = [True, False, False, True, False, False]
    after = [True, True, False, False, True, False]
    r = value.paired(before, after)
    d = [0, 1, 0, -1, 1, 0]  # after - before
    m = sum(d) / 6
    se = (sum((x - m) ** 2 for x in d) / 5 / 6) ** 0.5
    assert r["n"] == 6 and r["before"] == pytest.approx(100 * 2 / 6) and r["after"] == pytest.approx(50.0)
    assert r["gain_points"] == pytest.approx(100 * m) and r["gain_se_points"] == pytest.approx(100 * se)


@pytest.mark.slow  # a few seconds: untrained tiny models, one step
def test_value_arm_runs_through_the_registry():
    from uno_engine import Critic

    assert "value (group reward)" in experiment.ABLATIONS
    assert "value (group reward)" not in experiment.Settings().ablations  # outside the default run
    critic_model, proc = models.build_critic_model(0)
    critic = Critic.from_hf(critic_model, proc, checkpoint="none")
    unet, text = models.build_unet(0).eval(), models.TextEncoder().eval()
    s = experiment.Settings(
        sample_steps=2,
        extra={"value_steps": 2, "value_batch": 2, "value": {"group_size": 2}, "value_lr": 1e-3},
    )
    trained, hist = experiment.run_uno(unet, text, critic, "value (group reward)", seed=0, s=s)
    assert len(hist) == 2
    for rec in hist:
        assert rec["held_reward"] <= 0 and 0 <= rec["held_ranked_first"] <= 1
        assert (
            "seen_generator_loss" in rec and "held_generator_loss" not in rec
        )  # the real-data anchor: seen only
    moved = max((a - b).abs().max() for a, b in zip(trained.parameters(), unet.parameters(), strict=True))
    assert moved > 0 and all(not p.requires_grad for p in trained.parameters())
    assert all(torch.isfinite(p).all() for p in trained.parameters())


@pytest.mark.slow  # a few seconds: untrained tiny models, three short runs
def test_value_arm_resumes_exactly(tmp_path):
    """A run cut after 1 step and resumed from its progress file ends where an uncut 2-step run ends (the
    control arm: its shuffling generators are restored too)."""
    from uno_engine import Critic

    critic_model, proc = models.build_critic_model(0)
    critic = Critic.from_hf(critic_model, proc, checkpoint="none")
    unet, text = models.build_unet(0).eval(), models.TextEncoder().eval()

    def run(steps, resume):
        extra = {"value_steps": steps, "value_batch": 2, "value": {"group_size": 2}, "value_lr": 1e-3}
        s = experiment.Settings(sample_steps=2, extra={**extra, "value_control": "shuffled"})
        return value.run_value(unet, text, critic, "value (group reward)", seed=0, s=s, resume=resume)

    whole, hist = run(2, None)
    run(1, tmp_path / "p.pt")
    resumed, hist2 = run(2, tmp_path / "p.pt")
    assert [h["loss"] for h in hist2] == [h["loss"] for h in hist]
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
