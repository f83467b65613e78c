"""The learning benchmark's two base generators (issue 27: "strengthen the base generator, and report both"):
their architectures, the cache files that name their base, and the runs that must not mix them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from learning_lib import experiment, models, training, world  # noqa: E402


def test_each_base_builds_its_architecture():
    """The strong base is the old UNet behind a 2-layer text encoder; both read the same latents and text width."""
    for base, layers in (("old", 0), ("strong", 2)):
        unet = models.build_unet(0, base)
        assert (
            tuple(unet.config.block_out_channels) == models.BASES[base]["block_out_channels"] == (32, 64, 64)
        )
        assert models.BASES[base]["text_layers"] == layers
        x, t = torch.randn(2, 12, 16, 16), torch.tensor([10, 900])
        ids = torch.tensor([world.encode("one red circle")[0]] * 2)
        with torch.no_grad():
            emb = models.TextEncoder(layers=layers)(ids)
            assert emb.shape == (2, world.MAX_LEN, models.TEXT_DIM)
            assert unet(x, t, encoder_hidden_states=emb).sample.shape == x.shape


def test_the_strong_text_encoder_is_contextual_and_the_old_one_is_not():
    """Changing the 4th word changes the strong encoder's first position; the old one's only its own."""
    a, _ = world.encode("red circle left of blue square")
    b, _ = world.encode("red circle left of green square")
    ids = torch.tensor([a, b])
    for layers, contextual in ((0, False), (2, True)):
        torch.manual_seed(0)
        with torch.no_grad():
            h = models.TextEncoder(layers=layers)(ids)
        first = (h[0, 0] - h[1, 0]).abs().max().item()
        own = (h[0, 4] - h[1, 4]).abs().max().item()
        assert own > 1e-3
        assert (first > 1e-4) == contextual, (layers, first)


def test_a_base_name_is_checked():
    with pytest.raises(ValueError, match="base must be one of"):
        models.base_arch("huge")
    with pytest.raises(ValueError, match="base must be one of"):
        models.build_unet(0, "huge")
    with pytest.raises(ValueError, match="base must be one of"):
        training.generator_path(training.CACHE, "huge")
    assert training.generator_path(Path("c"), "old") == Path("c/generator.safetensors")
    assert training.generator_path(Path("c"), "strong") == Path("c/generator-strong.safetensors")


def test_a_saved_generator_loads_back_as_its_base(tmp_path):
    torch.manual_seed(1)
    unet, text = models.build_unet(3, "strong").eval(), models.TextEncoder(layers=2).eval()
    path = tmp_path / "g.safetensors"
    training.save_generator(unet, text, path, "strong")
    assert training.generator_base(path) == "strong"
    unet2, text2 = training.load_generator(path)
    assert len(text2.layers) == 2
    ids = torch.tensor([world.encode("two red squares")[0]])
    with torch.no_grad():
        assert torch.equal(text(ids), text2(ids))  # the text encoder is stored in fp32
    for (k, v), (k2, v2) in zip(unet.state_dict().items(), unet2.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v.half().float(), v2), k  # the UNet in fp16
    with pytest.raises(ValueError, match="base must be one of"):
        training.save_generator(unet, text, path, "huge")
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(tmp_path / "h.safetensors"), metadata={"base": "huge"})
    with pytest.raises(ValueError, match=r"load_generator: .*h.safetensors was saved as base 'huge'"):
        training.load_generator(tmp_path / "h.safetensors")


def test_the_committed_old_cache_loads_as_the_old_base():
    """generator.safetensors was written before bases existed: no metadata, so the old architecture."""
    path = training.generator_path(training.CACHE, "old")
    assert training.generator_base(path) == "old"
    unet, text = training.load_generator(path)
    assert tuple(unet.config.block_out_channels) == (32, 64, 64) and len(text.layers) == 0


def test_reuse_before_does_not_mix_bases(tmp_path):
    """A file written before the base setting ran the old base; a strong run may not reuse its evaluations."""
    import learning

    s = experiment.Settings(seeds=(0,))
    settings = {k: v for k, v in json.loads(json.dumps(vars(s))).items() if k != "base"}
    path = tmp_path / "learning-cpu.json"
    path.write_text(json.dumps({"settings": settings, "before_per_seed": [{"held_out": 1}]}))
    assert learning.reused_before(path, experiment.Settings(seeds=(0,))) == [{"held_out": 1}]
    with pytest.raises(ValueError, match="--reuse-before: .* other settings"):
        learning.reused_before(path, experiment.Settings(seeds=(0,), base="strong"))


def test_the_command_line_refuses_an_unknown_base(capsys):
    import learning

    with pytest.raises(SystemExit):
        learning.main(["--base", "huge"])
    assert "--base: invalid choice: 'huge'" in capsys.readouterr().err


def _run_file(path: Path, base: str, gains: dict) -> Path:
    """A learning-*.json with only what --plot-bases reads: its settings, the pretrained accuracy, and each
    arm's paired gains (held-out, seen)."""
    pair = lambda m: {"mean": m, "se": 0.01}  # noqa: E731
    path.write_text(
        json.dumps(
            {
                "settings": {"base": base, "uno_steps": 80},
                "before": {"overall": 0.1, "seen": {"overall": 0.3}},
                "ablations": {
                    n: {"status": "ran", "paired": {"held_out": pair(g), "seen": pair(-g)}}
                    for n, g in gains.items()
                }
                | {"value (group reward)": {"status": "not yet run"}},
            }
        )
    )
    return path


def test_plot_bases_draws_the_arms_every_file_ran(tmp_path):
    import learning

    a = _run_file(
        tmp_path / "a.json", "old", {"caption+joint+kl": 0.01, "control (generator loss only)": 0.0}
    )
    b = _run_file(tmp_path / "b.json", "strong", {"caption+joint+kl": 0.04, "caption": 0.02})
    out = tmp_path / "bases.png"
    assert learning.plot_bases([a, b], out) == ["caption+joint+kl"]
    assert out.stat().st_size > 10_000
    c = _run_file(tmp_path / "c.json", "strong", {"caption": 0.02})
    with pytest.raises(SystemExit, match="--plot-bases: .* no arm in common"):
        learning.plot_bases([a, c], tmp_path / "none.png")


class _Ran(Exception):
    pass


@pytest.mark.parametrize(
    "argv, base, main, steps",
    [
        ([], "old", "caption+joint+kl", 80),
        (["--base", "strong"], "strong", "caption+joint+kl, augmented read", 480),
        (
            ["--base", "strong", "--main", "caption+joint+kl", "--uno-steps", "80"],
            "strong",
            "caption+joint+kl",
            80,
        ),
    ],
)
def test_each_base_runs_its_own_headline_against_the_control(monkeypatch, argv, base, main, steps):
    """`learning.py --base B` loads B's cached generator and runs B's headline (experiment.BASE_HEADLINES) and
    the control at B's steps; --main / --uno-steps override. run_all is stopped before any UNO step."""
    import learning

    seen = {}

    def stop(critic, proc, unet, text, s, **kw):
        seen.update(s=s, text_layers=len(text.layers), cache=kw["cache"])
        raise _Ran

    monkeypatch.setattr(experiment, "run_all", stop)
    monkeypatch.setattr(training, "critic_accuracy", lambda *a, **k: {"token_accuracy": 1.0})
    monkeypatch.setattr(learning.judge, "true_render_accuracy", lambda **k: {"exact_parse_accuracy": 1.0})
    with pytest.raises(_Ran):
        learning.main(argv)
    s = seen["s"]
    assert (s.base, s.main, s.uno_steps) == (base, main, steps)
    assert s.ablations == (main, "control (generator loss only)")
    assert seen["cache"][1] == training.generator_path(training.CACHE, base)
    assert seen["text_layers"] == models.base_arch(base)["text_layers"]
