"""The learning benchmark (benchmarks/learning.py): its world, its judge (unit tests against hand-built
images and the renderer's geometry), and a smoke run of the whole pipeline in a subprocess (wiring, JSON
layout; not the figure)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from learning_lib import judge, world  # noqa: E402


def _canvas():
    return np.zeros((32, 32, 3), dtype=np.float32)


def _paint(img, shape, color, x, y, s):
    img[y : y + s, x : x + s][world.shape_mask(shape, s)] = world.PALETTE[color]


def _chw(img):
    return img.transpose(2, 0, 1) * 2.0 - 1.0


# ------------------------------------------------------------------------------------------------ world
def test_held_out_split_words_all_seen_and_disjoint():
    seen, held = world.split_prompts()
    assert len(seen) + len(held) == len(world.all_prompts()) == 36 + 264
    seen_words = {w for p in seen for w in p.caption.split()}
    held_words = {w for p in held for w in p.caption.split()}
    assert held_words <= seen_words  # every word of a held-out prompt occurs in seen prompts
    for p in seen:
        assert not (set(p.objects) & world.HELD_OUT["binding"])
    kinds = {k for p in held for k in p.held_out_kinds()}
    assert kinds == {"binding", "count", "position"}


def test_tokenizer_roundtrip_and_errors():
    for p in world.all_prompts():
        ids, mask = world.encode(p.caption)
        assert len(ids) == world.MAX_LEN and sum(mask) == len(p.caption.split()) + 1
        assert world.decode(ids) == p.caption
    with pytest.raises(ValueError, match="unknown words"):
        world.encode("a purple circle")


def test_scenes_satisfy_their_prompt():
    rng = random.Random(3)
    for p in world.all_prompts()[::7]:
        sc = world.sample_scene(p, rng)
        if p.kind == "count":
            assert len(sc.objects) == p.n
        else:
            a, b = sc.objects
            assert world.relation_of(a.center, b.center) == p.relation
        img = world.render(sc)
        assert img.shape == (3, 32, 32) and img.min() == -1.0 and img.max() == 1.0


# ------------------------------------------------------------------------------------------------ judge
@pytest.mark.parametrize("s", [8, 9, 10, 12])
def test_shape_from_fill_ratio(s):
    # analytic fill ratios: square 1, disc pi/4, triangle 1/2; the rasterized masks classify correctly
    for shape, ideal in (("square", 1.0), ("circle", math.pi / 4), ("triangle", 0.5)):
        m = world.shape_mask(shape, s)
        ys, xs = np.nonzero(m)
        fill = m.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        assert abs(fill - ideal) < 0.08
        assert judge.classify_shape(fill) == shape


def test_parse_hand_built_scene():
    img = _canvas()
    _paint(img, "square", "red", 1, 2, 10)
    _paint(img, "circle", "blue", 20, 20, 10)
    _paint(img, "triangle", "yellow", 20, 1, 9)
    objs = sorted(judge.parse(_chw(img)), key=lambda o: o.color)
    assert [(o.color, o.shape) for o in objs] == [
        ("blue", "circle"),
        ("red", "square"),
        ("yellow", "triangle"),
    ]
    red = objs[1]
    assert red.area == 100 and abs(red.cx - 5.5) < 1e-9 and abs(red.cy - 6.5) < 1e-9


def test_parse_ignores_specks_and_dim_noise_and_marks_other_colors():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 0.3, size=(32, 32, 3)).astype(np.float32)  # dim noise: background
    img[0:3, 0:3] = world.PALETTE["green"]  # 9 px < MIN_AREA: a speck
    img[10:20, 10:20] = (1.0, 1.0, 1.0)  # white: no palette color within tolerance
    objs = judge.parse(_chw(img))
    assert [(o.color, o.shape) for o in objs] == [("other", "square")]


def test_check_count_and_relation():
    img = _canvas()
    _paint(img, "circle", "red", 2, 2, 9)
    _paint(img, "circle", "red", 20, 20, 9)
    objs = judge.parse(_chw(img))
    two = world.Prompt("count", (("red", "circle"),), n=2)
    three = world.Prompt("count", (("red", "circle"),), n=3)
    assert judge.check(two, objs) == {
        "color": True,
        "shape": True,
        "count": True,
        "binding": True,
        "overall": True,
    }
    r3 = judge.check(three, objs)
    assert r3["count"] is False and r3["overall"] is False and r3["color"] is True
    img = _canvas()
    _paint(img, "circle", "red", 2, 12, 9)  # red circle on the left
    _paint(img, "square", "blue", 21, 12, 9)
    objs = judge.parse(_chw(img))
    left = world.Prompt("relation", (("red", "circle"), ("blue", "square")), relation="left of")
    right = world.Prompt("relation", (("red", "circle"), ("blue", "square")), relation="right of")
    swapped = world.Prompt("relation", (("blue", "circle"), ("red", "square")), relation="left of")
    assert judge.check(left, objs)["overall"] is True
    r = judge.check(right, objs)
    assert r["binding"] is True and r["position"] is False
    r = judge.check(swapped, objs)  # colors and shapes present, bound the other way round
    assert r["color"] and r["shape"] and not r["binding"] and not r["overall"]


def test_judge_bad_input():
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        judge.parse(np.zeros((32, 32, 3)))
    bad = np.zeros((3, 32, 32))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        judge.parse(bad)


def test_judge_on_true_renders():
    acc = judge.true_render_accuracy(n=150, seed=5)
    assert acc["exact_parse_accuracy"] >= 0.98
    assert acc["checks"]["overall"] >= 0.98


def test_word_classes_of_the_vocabulary():
    from learning_lib import training

    cls = {w: training.WORD_CLASSES[training.word_class(i)] for i, w in enumerate(world.WORDS)}
    assert [w for w, c in cls.items() if c == "relation"] == ["left", "right", "above", "below"]
    assert [w for w, c in cls.items() if c == "number"] == list(world.NUMBERS)
    assert [w for w, c in cls.items() if c == "color"] == list(world.COLORS)
    assert sorted(w for w, c in cls.items() if c == "shape") == sorted(
        list(world.SHAPES) + list(world.PLURAL.values())
    )
    assert sorted(w for w, c in cls.items() if c == "other") == ["<eos>", "<pad>", "of"]


def test_weight_override_applies_only_to_terms_the_ablation_has():
    from learning_lib import experiment

    s = experiment.Settings(extra={"weights": {"kl": 0.25, "density": 3.0}})
    held, full = experiment._losses("caption+joint+kl", s)
    assert full == {"caption": 1.0, "generator_loss": 1.0, "kl": 0.25}
    assert held == {"caption": 1.0, "kl": 0.25}  # no real-image terms on the held-out stream
    assert experiment._losses("caption", s) == ({"caption": 1.0}, {"caption": 1.0})


# -------------------------------------------------------------------------------------------- smoke run
@pytest.mark.slow  # about 20 s on an idle 2-core CPU (a subprocess: imports, 5 ablations x 2 steps, evals)
def test_smoke_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "benchmarks/learning.py", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "learning-smoke.json").read_text())
    assert (tmp_path / "learning-smoke.png").stat().st_size > 0
    for key in ("before", "after"):
        assert 0.0 <= res[key]["overall"] <= 1.0
        for c in ("color", "shape", "binding"):
            assert 0.0 <= res[key][c] <= 1.0
        assert 0.0 <= res[key]["seen"]["overall"] <= 1.0
        assert res[key]["denoising_loss"] > 0
    assert res["judge_on_true_renders"]["exact_parse_accuracy"] >= 0.98
    assert len(res["commit"]) == 40 and isinstance(res["dirty"], bool)
    assert res["settings"]["uno_steps"] == 2 and res["machine"]["device"]
    ab = res["ablations"]
    assert ab["caption"]["status"] == "ran" and ab["caption+regression"]["status"] == "ran"
    assert ab["control (generator loss only)"]["status"] == "ran"
    assert ab["caption+joint+kl, augmented read (aug critic)"]["status"] == "ran"
    # powered evaluation: per-prompt counts, standard errors beside the figures, paired gains
    before = res["before_per_seed"][0]["held_out"]
    assert len(before["per_prompt_pass"]) == 6 and before["stats"]["samples_per_prompt"] == 2
    assert res["before"]["overall_se"] is not None and res["targets"]["held_out_gain_se"] is not None
    assert "vs_control_points" in res["targets"]
    assert "| pretrained |" in proc.stdout and "| control (generator loss only) |" in proc.stdout
    for name, a in ab.items():  # every ablation either ran or says why not
        assert a["status"] == "ran" or a["status"].startswith(("not yet run", "failed")), name


# ----------------------------------------------------------------------------------------------- probes
def test_probe_auc_against_brute_force_and_edges():
    import torch
    from learning_lib import probe

    g = torch.Generator().manual_seed(0)
    pos, neg = torch.rand(13, generator=g), torch.rand(9, generator=g) + 0.3
    pos[3] = neg[2]  # one tie counts one half
    brute = sum((p < n) + 0.5 * (p == n) for p in pos.tolist() for n in neg.tolist()) / (13 * 9)
    assert probe.auc(pos, neg) == pytest.approx(brute, abs=1e-12)
    assert probe.auc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert probe.auc(torch.tensor([2.0]), torch.tensor([1.0])) == 0.0
    assert probe.auc(torch.tensor([]), neg) is None


def test_probe_caption_nats_is_the_summed_masked_ce():
    """caption_nats = sum over caption tokens (mask 1) of -log p(token), against a float64 recomputation from
    the HF model's own logits."""
    import torch
    from learning_lib import models, probe, training

    from uno_engine import Critic

    model, proc = models.build_critic_model(0)
    critic = Critic.from_hf(model.double(), proc, checkpoint="none")
    rng = random.Random(0)
    images, ids, mask, _ = training.caption_batch(rng.sample(world.all_prompts(), 3), rng)
    got = probe.caption_nats(critic, images.double(), ids, mask)
    _, logits = training.critic_loss(critic, images.double(), ids, mask)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None])[..., 0]
    want = -(logp * mask).sum(1)
    assert mask.sum(1).min() < mask.shape[1]  # padding is present and must be excluded
    torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=1e-10)


def test_jobs_below_one_is_refused(capsys):
    import learning

    with pytest.raises(SystemExit) as e:
        learning.main(["--jobs", "0", "--smoke"])
    assert e.value.code == 2 and "--jobs must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--probe-readings", "augmented,blurry"],
            "--probe-readings must be a comma-separated subset of plain",
        ),
        (["--probe-readings", ","], "--probe-readings must be"),
        (["--probe-critics", "old,robust"], "--probe-critics must be a comma-separated subset of old, aug"),
        (["--probe-views", "0"], "--probe-views must be >= 1, got 0"),
    ],
)
def test_probe_selection_flags_are_checked(argv, message, capsys):
    """--probe-readings / --probe-critics / --probe-views: a bad value is refused naming the flag, before
    anything loads; probe.readings(names=) keeps only the named readings, in the order given."""
    import learning
    from learning_lib import probe

    with pytest.raises(SystemExit) as e:
        learning.main(["--probe", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    reads = probe.readings(2, names=["augmented", "plain"])
    assert list(reads) == ["augmented", "plain"] and reads["plain"] is None and reads["augmented"].views == 2
    assert list(probe.readings(3)) == list(probe.READINGS)


# --------------------------------------------------------------------------------- powered evaluation
def test_stats_accuracy_against_brute_force():
    from learning_lib import stats

    k, m = [0, 1, 4, 2, 0, 3, 0], 4
    y = np.array(k) / m
    P = len(k)
    r = stats.accuracy(k, m)
    assert r["mean"] == pytest.approx(y.mean(), abs=1e-12)
    assert r["se"] == pytest.approx(y.std(ddof=1) / math.sqrt(P), abs=1e-12)  # prompts are the clusters
    assert r["se_binomial"] == pytest.approx(math.sqrt(y.mean() * (1 - y.mean()) / (m * P)), abs=1e-12)
    assert r["se_fixed_prompts"] == pytest.approx(
        math.sqrt((y * (1 - y) * m / (m - 1)).sum() / m) / P, abs=1e-12
    )
    # all prompts alike: the cluster SE is 0 while the binomial one is not
    assert stats.accuracy([2, 2, 2], 4)["se"] == 0.0 and stats.accuracy([2, 2, 2], 4)["se_binomial"] > 0


def test_stats_paired_and_over_seeds():
    from learning_lib import stats

    before, after = [0, 1, 2, 0, 4], [1, 1, 3, 0, 4]
    d = (np.array(after) - np.array(before)) / 4
    r = stats.paired(after, before, 4)
    assert r["diff"] == pytest.approx(d.mean()) and r["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(5))
    # the same shift on every prompt: a paired difference with no error (an unpaired one would have some)
    assert stats.paired([1, 2, 3], [0, 1, 2], 4)["se"] == 0.0
    o = stats.over_seeds([0.1, 0.2, 0.3], [0.01, 0.02, 0.02])
    assert o["mean"] == pytest.approx(0.2) and o["se"] == pytest.approx(0.03 / 3)
    assert o["seed_sd"] == pytest.approx(0.1)


def test_stats_bad_input_names_the_argument():
    from learning_lib import stats

    with pytest.raises(ValueError, match="`k`"):
        stats.accuracy([0, 5], 4)
    with pytest.raises(ValueError, match="`k`"):
        stats.accuracy([], 4)
    with pytest.raises(ValueError, match="`m`"):
        stats.accuracy([0], 0)
    with pytest.raises(ValueError, match="`k_before`"):
        stats.paired([0, 1], [0], 4)


def test_power_pairs_each_seed_with_its_own_before():
    from learning_lib import experiment

    def ev(kh, ks, m=2):
        from learning_lib import stats

        return {
            "held_out": {"per_prompt_pass": kh, "stats": stats.accuracy(kh, m)},
            "seen": {"per_prompt_pass": ks, "stats": stats.accuracy(ks, m)},
        }

    before = [ev([0, 0, 1], [1, 1, 1]), ev([1, 1, 1], [0, 0, 0])]
    after = [ev([1, 1, 1], [1, 1, 1]), ev([1, 1, 1], [0, 0, 1])]
    p = experiment.power(after, before)
    assert [x["diff"] for x in p["paired"]["held_out"]["per_seed"]] == pytest.approx([2 / 6, 0.0])
    assert p["paired"]["seen"]["mean"] == pytest.approx((0 + 1 / 6) / 2)
    assert p["accuracy"]["held_out"]["mean"] == pytest.approx(0.5)


# ---------------------------------------------------------------------- the augmentation-trained critic
def test_augment_renders_identity_shift_and_noise():
    import torch
    from learning_lib import training

    rng = random.Random(1)
    images, _, _, _ = training.caption_batch(rng.sample(world.all_prompts(), 4), rng)
    g = torch.Generator().manual_seed(0)
    off = training.augment_renders(images, g, {"p_aug": 0.0})
    torch.testing.assert_close(off, images, atol=1e-5, rtol=0)  # no augmentation: the render itself
    # always on but scale 1, no shift, no noise: the resampling is exact
    pure = {"p_aug": 1.0, "scale": (1.0, 1.0), "p_noise": 0.0, "shift_px": 0.0}
    g = torch.Generator().manual_seed(0)
    same = training.augment_renders(images, g, pure)
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)
    aug = training.augment_renders(images, torch.Generator().manual_seed(3), {"p_aug": 1.0})
    assert aug.shape == images.shape and aug.min() >= -1 and aug.max() <= 1
    assert (aug - images).abs().mean() > 0.01  # it does change the renders
    with pytest.raises(ValueError, match="`images`"):
        training.augment_renders(images[0], g)


def test_augment_finetune_critic_trains_a_copy_on_augmented_renders():
    import torch
    from learning_lib import models, training

    model, proc = models.build_critic_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned, st = training.augment_finetune_critic(model, proc, steps=2, batch=4)
    assert st["steps"] == 2 and st["augmentation"] == training.AUG
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and not any(p.requires_grad for p in tuned.parameters())


def test_probe_shift_and_views_reading():
    import torch
    from learning_lib import models, probe, training

    from uno_engine import Critic, ReadAugment

    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5) / 200 - 0.5
    r = probe.shifted(x, 0, 1)  # one pixel to the right: column 0 is background
    assert torch.equal(r[..., 1:], x[..., :-1]) and (r[..., 0] == -1).all()
    d = probe.shifted(x, -1, 0)  # one pixel up: the last row is background
    assert torch.equal(d[..., :-1, :], x[..., 1:, :]) and (d[..., -1, :] == -1).all()
    model, proc = models.build_critic_model(0)
    critic = Critic.from_hf(model, proc, checkpoint="none")
    rng = random.Random(0)
    images, ids, mask, _ = training.caption_batch(rng.sample(world.all_prompts(), 3), rng)
    plain = probe.caption_nats(critic, images, ids, mask)
    # K identical (jitter-free) views average to the plain read, per image
    same = probe.caption_nats(critic, images, ids, mask, read=ReadAugment(views=3))
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-5)
    jit = probe.caption_nats(critic, images, ids, mask, read=ReadAugment(views=2, shift=3.0, noise=0.3))
    assert jit.shape == (3,) and not torch.allclose(jit, plain)
    gap = probe.hack_gap(critic, images, ids, mask)
    assert gap["hack_gap"] == pytest.approx(gap["ce_one_pixel_shift"] / gap["ce_unshifted"])


def test_control_arm_trains_on_the_generator_loss_without_reading_the_critic():
    import torch
    from learning_lib import experiment, models

    from uno_engine import Critic

    model, proc = models.build_critic_model(0)
    critic = Critic.from_hf(model, proc, checkpoint="none")

    def refuse(*a, **k):
        raise AssertionError("the control arm read the critic")

    critic.prepare = refuse  # any rollout read by the critic would go through the bridge
    unet, text = models.build_unet(0).eval().requires_grad_(False), models.TextEncoder().eval()
    s = experiment.Settings(uno_steps=2, batch_held=2, batch_seen=2, sample_steps=2, lr=1e-3)
    trained, hist = experiment.run_uno(unet, text, critic, "control (generator loss only)", seed=0, s=s)
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in hist)
    assert not all(torch.equal(a, b) for a, b in zip(trained.parameters(), unet.parameters(), strict=True))
    assert not any(k.startswith("held_") for k in hist[0])  # no held-out stream: it has no real images


def test_probe_descent_through_a_reading_lowers_its_ce_and_pairs_the_judge():
    import torch
    from learning_lib import experiment, models, probe, training

    from uno_engine import Critic

    model, proc = models.build_critic_model(0)
    critic = Critic.from_hf(model, proc, checkpoint="none")
    rng = random.Random(2)
    prompts = rng.sample(world.all_prompts(), 3)
    images, ids, mask, _ = training.caption_batch(prompts, rng)
    read = experiment.reading("augmented", views=2)
    xs, rec = probe.descend(critic, images, ids, mask, prompts, read=read, steps=4, lr=0.05)
    assert xs.shape == images.shape and xs.min() >= -1 and xs.max() <= 1
    tr = rec["trace"]
    assert tr[0]["step"] == 0 and tr[-1]["step"] == 4 and tr[-1]["ce_nats_read"] < tr[0]["ce_nats_read"]
    assert rec["per_prompt_pass_before"] == [1, 1, 1]  # true renders: the judge passes them
    assert rec["judge_change"]["diff"] == pytest.approx(
        rec["judge_after"]["mean"] - rec["judge_before"]["mean"]
    )
    with pytest.raises(ValueError, match="`name`"):
        experiment.reading("blurred")


# ------------------------------------------------------------------------ arms run apart, then merged
def _fake_eval(name: str, seed: int, P: int = 7, m: int = 3) -> dict:
    """An evaluation dict as `experiment.evaluate` + `_run_unit` write it, drawn from (name, seed)."""
    from learning_lib import stats

    rng = random.Random(f"{name}/{seed}")
    ev = {}
    for split in ("held_out", "seen"):
        k = [rng.randint(0, m) for _ in range(P)]
        ev[split] = {"overall": sum(k) / (m * P), **{c: rng.random() for c in judge.CATEGORIES}}
        ev[split] |= {"per_prompt_pass": k, "stats": stats.accuracy(k, m)}
    ev["held_out_by_kind"] = {"binding": rng.random(), "count": rng.random(), "position": rng.random()}
    ev["denoising_loss"] = 0.08 + 0.01 * rng.random()
    if name != "before":
        ev["uno_s"] = 100.0 * rng.random()
    return ev


def _fake_run(monkeypatch, path: Path, arms: tuple, seeds: tuple, before: list | None = None) -> dict:
    """learning.py's JSON of a run of `arms` on `seeds` whose units return `_fake_eval` (run_all for real)."""
    from learning_lib import experiment

    monkeypatch.setattr(experiment, "feature_status", lambda name: None)
    monkeypatch.setattr(
        experiment, "_run_unit", lambda models_, u, s, bar=None, log=None: (u, _fake_eval(*u), None)
    )
    s = experiment.Settings(seeds=seeds, ablations=arms)
    res = experiment.run_all(None, None, None, None, s, log=lambda m: None, before=before)
    res.pop("_trained_main_seed0")
    res["commit"] = f"commit-of-{path.name}"
    path.write_text(json.dumps(res, default=str))
    return json.loads(json.dumps(res, default=str))


def test_merge_combines_an_arms_seeds_as_a_run_of_all_seeds(tmp_path, monkeypatch, capsys):
    import learning

    arm, ctrl = "caption+joint+kl (aug critic)", "control (generator loss only)"
    full = _fake_run(monkeypatch, tmp_path / "full.json", (arm,), (0, 1, 2))
    target = tmp_path / "learning-cpu.json"
    _fake_run(monkeypatch, target, (ctrl,), (0, 1, 2))
    before = full["before_per_seed"]
    _fake_run(monkeypatch, tmp_path / "s0.json", (arm,), (0,), before=before[:1])
    _fake_run(monkeypatch, tmp_path / "s12.json", (arm,), (1, 2), before=before[1:])
    # seed 2 first, seed 0 in a file of its own: the merge sorts the seeds
    assert learning.merge(target, [tmp_path / "s12.json", tmp_path / "s0.json"]) == 0
    merged = json.loads(target.read_text())
    got, want = merged["ablations"][arm], full["ablations"][arm]
    assert got["seeds"] == [0, 1, 2]
    for key in ("per_seed", "mean", "accuracy", "paired"):
        assert got[key] == want[key], key
    # the paired gain is the mean over seeds of each seed's own after - before
    d = [
        np.mean(
            np.subtract(_fake_eval(arm, sd)["held_out"]["per_prompt_pass"], b["held_out"]["per_prompt_pass"])
        )
        / 3
        for sd, b in zip((0, 1, 2), before, strict=True)
    ]
    assert got["paired"]["held_out"]["mean"] == pytest.approx(np.mean(d), abs=1e-12)
    assert got["seed_sources"]["0"] == {"file": "s0.json", "commit": "commit-of-s0.json"}
    assert merged["ablations"][ctrl]["seeds"] == [0, 1, 2]  # the target's own arm is kept
    # a seed present twice is an error naming both files
    with pytest.raises(SystemExit, match=r"seed 0 is in both s0\.json and s0\.json"):
        learning.merge(target, [tmp_path / "s0.json"])
    again = tmp_path / "again.json"
    _fake_run(monkeypatch, again, (arm,), (1,), before=before[1:2])
    with pytest.raises(SystemExit, match=r"seed 1 is in both s12\.json and again\.json"):
        learning.merge(target, [again])


def test_merge_refuses_other_settings_and_other_pretrained_evaluations(tmp_path, monkeypatch):
    import learning

    arm = "caption"
    target = tmp_path / "learning-cpu.json"
    res = _fake_run(monkeypatch, target, ("control (generator loss only)",), (0, 1, 2))
    other = tmp_path / "other.json"
    _fake_run(monkeypatch, other, (arm,), (1,), before=res["before_per_seed"][1:2])
    changed = json.loads(other.read_text())
    changed["settings"]["lr"] = 1e-4
    other.write_text(json.dumps(changed))
    with pytest.raises(SystemExit, match="other.json was run with other settings"):
        learning.merge(target, [other])
    _fake_run(monkeypatch, other, (arm,), (1,))  # its own pretrained evaluation (seed 1's fake differs)
    changed = json.loads(other.read_text())
    changed["before_per_seed"][0]["held_out"]["per_prompt_pass"][0] += 1
    other.write_text(json.dumps(changed))
    with pytest.raises(SystemExit, match="judged another pretrained generator on seed 1"):
        learning.merge(target, [other])
    _fake_run(monkeypatch, other, (arm,), (5,))
    with pytest.raises(SystemExit, match="ran seed 5"):
        learning.merge(target, [other])


def test_reuse_before_takes_the_evaluations_by_seed(tmp_path, monkeypatch):
    import learning
    from learning_lib import experiment

    path = tmp_path / "learning-cpu.json"
    res = _fake_run(monkeypatch, path, ("caption",), (0, 1, 2))
    got = learning.reused_before(path, experiment.Settings(seeds=(1, 2), ablations=("representation",)))
    assert got == res["before_per_seed"][1:]
    assert learning.reused_before(path, experiment.Settings(seeds=(2,)))[0] == res["before_per_seed"][2]
    with pytest.raises(ValueError, match=r"--reuse-before: .* no evaluation of seeds \[3\]"):
        learning.reused_before(path, experiment.Settings(seeds=(2, 3)))
    with pytest.raises(ValueError, match="--reuse-before: .* other settings"):
        learning.reused_before(path, experiment.Settings(seeds=(1,), lr=1e-4))


def test_the_combination_arm_is_the_aug_critic_headline_through_the_early_window():
    from learning_lib import experiment, models

    name = experiment.COMBINATION
    assert experiment._losses(name) == experiment._losses("caption+joint+kl")
    assert experiment.ABLATIONS[name]["critic"] == "aug" and name not in experiment.DEFAULT_ABLATIONS
    s = experiment.Settings()
    gen = experiment.ABLATIONS[name]["prepare"](models.make_generator(models.build_unet(0)), None, None, s, 0)
    assert gen.grad_window == (0.0, 0.5) and gen.recover == "one_step"
