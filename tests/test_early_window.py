"""The early window of DiffusersGenerator: grad steps in the first half of the schedule, carried to the image by a
one-step recovery of x0 (`grad_window=(0.0, 0.5), recover="one_step"`), against the rest of the chain
(`recover="chain"`). Tiny real diffusers classes, random weights.

What is checked: the drawn grad step lies in the window and the trainable weights get gradient from it; the
returned latent is the x0 prediction of that step by the scheduler's own formula, recomputed in float64 from
the scheduler's tables (DDIM epsilon, DDIM v-prediction, flow matching); "chain" runs the remaining steps
with grad (the memory cost stated in the docstring: n - s calls' activations against K); bad values raise
naming the argument.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from uno_engine.testing.presets.generators import build_generator

N_STEPS = 6


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # learning_lib, for its arms


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _early(name="tiny-sd", **kw):
    kw = {"num_inference_steps": N_STEPS, "grad_window": (0.0, 0.5), "recover": "one_step", **kw}
    return build_generator(name, **kw)


def _batch(make_batch, seed=0, b=2):
    return make_batch(b, 6, 50, generator=torch.Generator().manual_seed(seed))


class _GradCalls:
    """Counts a module's forward calls made with grad enabled."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *_):
        self.n += torch.is_grad_enabled()


def test_early_step_gets_the_gradient():
    gen, make_batch = _early()
    starts = set()
    for seed in range(6):
        gen.zero_grad(set_to_none=True)
        x0 = gen(_batch(make_batch, seed), decode=False)
        (step,) = gen.last_grad_steps
        starts.add(step.index)
        assert step.index < N_STEPS // 2, f"grad step {step.index} outside the first half of {N_STEPS}"
        x0.square().mean().backward()
        grads = [p.grad for p in gen.trainable_parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
    assert len(starts) > 1, f"the window's start is drawn, got only {starts}"


def _x0_float64(gen, step):
    """The x0 prediction of a GradStep by the scheduler's formula, float64, from the scheduler's own tables."""
    sch = gen.scheduler
    x, out = step.x_t.detach().double(), step.prediction.detach().double()
    if gen.is_flow:
        sigma = sch.sigmas.double()[step.index]
        return x - sigma * out  # v = eps - x0, x = (1 - sigma) x0 + sigma eps
    abar = sch.alphas_cumprod.double()[int(round(step.t))]
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if gen.prediction_type == "epsilon":
        return (x - s * out) / a
    assert gen.prediction_type == "v_prediction"
    return a * x - s * out


@pytest.mark.parametrize(
    "name, kw",
    [("tiny-sd", {}), ("tiny-sd", {"prediction_type": "v_prediction"}), ("tiny-sana", {})],
    ids=["ddim-eps", "ddim-v", "flow"],
)
def test_one_step_x0_is_the_schedulers_x0_prediction(name, kw):
    gen, make_batch = _early(name, **kw)
    for seed in range(3):
        x0 = gen(_batch(make_batch, seed), decode=False)
        (step,) = gen.last_grad_steps
        want = _x0_float64(gen, step)
        err = (x0.double() - want).abs().max()
        assert err <= 1e-5 * (1 + want.abs().max()), f"seed {seed} step {step.index}: max error {err}"


def test_chain_runs_the_rest_with_grad_and_one_step_does_not():
    gen, make_batch = _early()
    calls = _GradCalls(gen.denoiser)
    batch = _batch(make_batch, 3)
    gen(batch, decode=False)
    assert calls.n == 1  # K = 1: one call's activations, wherever the window lies
    s = gen.last_grad_steps[0].index
    one_step = gen(batch, decode=False).detach()
    chain_gen, _ = _early(recover="chain")
    chain_gen.load_state_dict(gen.state_dict())
    calls = _GradCalls(chain_gen.denoiser)
    chain = chain_gen(batch, decode=False)
    assert chain_gen.last_grad_steps[0].index == s  # same seed: same drawn step
    assert calls.n == N_STEPS - s  # the rest of the chain keeps its activations
    assert chain.requires_grad
    with torch.no_grad():  # the chain's image is the final sample from the same x_s
        x = chain_gen.last_grad_steps[0].x_t.detach()
        cond = chain_gen.conditioning(batch)
        for i in range(s, N_STEPS):
            x, _, _ = chain_gen._step(x, i, cond)
    torch.testing.assert_close(chain.detach(), x)
    assert not torch.allclose(chain.detach(), one_step)


@pytest.mark.parametrize(
    "kw, arg",
    [
        ({"recover": "two_step"}, "recover"),
        ({"recover": None}, "recover"),
        ({"grad_window": (0.6, 0.5)}, "grad_window"),
        ({"grad_window": (-0.1, 0.5)}, "grad_window"),
    ],
)
def test_bad_values_name_the_argument(kw, arg):
    with pytest.raises(ValueError, match=arg):
        _early(**kw)


@pytest.mark.slow  # the cached learning models, 2 UNO steps
def test_learning_arm_uses_the_early_window():
    """The learning benchmark's "early window" arm trains through a generator with this option (2 steps on the
    cached models)."""
    from learning_lib import arms_repr, experiment, training

    critic_model, proc = training.load_critic(training.CACHE / "critic.safetensors")
    unet, text = training.load_generator(training.CACHE / "generator.safetensors")
    from uno_engine import Critic

    s = experiment.Settings(uno_steps=2, batch_held=2, batch_seen=2)
    trained, hist = experiment.run_uno(
        unet, text, Critic.from_hf(critic_model, proc), "early window", seed=100, s=s
    )
    gen = arms_repr.LAST["generator"]
    assert (gen.grad_window, gen.recover) == ((0.0, 0.5), "one_step")
    assert gen.last_grad_steps[0].index < s.sample_steps // 2
    assert len(hist) == 2 and any(
        not torch.equal(a, b) for a, b in zip(trained.parameters(), unet.parameters(), strict=True)
    )
