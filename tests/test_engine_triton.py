"""UNOStep end to end on the Triton kernels (the interpreter on CPU, compiled on CUDA) against the eager
reference path: the same loss, metrics and generator gradients, for every critic family, with the caption,
density and structure terms all on. The ops' own tests check each kernel alone; this one checks that the step
wires them (bridge -> critic -> fused linear CE + fused regression) exactly like the reference."""

import pytest
import torch
from torch import nn

from uno_engine import Critic, UNOConfig, UNOLoss, UNOStep
from uno_engine.generators import CallableGenerator
from uno_engine.testing.presets.critics import build_critic_model

CRITICS = ["tiny-llava-clip", "tiny-llava-siglip", "tiny-janus", "tiny-qwen2-vl"]


class _Pixels(nn.Module):
    def __init__(self, batch=2, h=36, w=44):
        super().__init__()
        self.pixels = nn.Parameter(torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(3)))

    def forward(self, batch):
        return torch.tanh(self.pixels)


@pytest.mark.parametrize("structure_mode", ["edges", "features"])
@pytest.mark.parametrize("critic_name", CRITICS)
def test_triton_step_equals_reference(critic_name, structure_mode, device):
    model, processor = build_critic_model(critic_name, device=device)
    critic = Critic.from_hf(model, processor)
    gen = _Pixels().to(device)
    g = torch.Generator().manual_seed(0)
    captions = torch.randint(3, critic.vocab_size - 1, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    batch = {
        "captions": captions.to(device),
        "caption_mask": mask.to(device),
        "reference_images": (torch.rand(2, 3, 36, 44, generator=g) * 2 - 1).to(device),
    }
    results = {}
    for backend in ("reference", "triton"):
        gen.pixels.grad = None
        torch.manual_seed(1)  # identical head init
        loss = UNOLoss(caption=1.0, density=0.5, structure=0.5, structure_mode=structure_mode)
        cfg = UNOConfig(backend=backend, read=None)
        step = UNOStep(CallableGenerator(gen, module=gen), critic, loss, cfg)
        out = step(batch)
        out.loss.backward()
        results[backend] = (out.loss.detach(), gen.pixels.grad.clone(), dict(out.metrics))
    (l_ref, g_ref, m_ref), (l_tri, g_tri, m_tri) = results["reference"], results["triton"]
    assert set(m_tri) == set(m_ref) and {"caption_ce", "density", "structure"} <= set(m_ref)
    torch.testing.assert_close(l_tri, l_ref, rtol=1e-5, atol=1e-6)
    for k in m_ref:
        torch.testing.assert_close(m_tri[k], m_ref[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert g_ref.abs().sum() > 0
    rel = ((g_tri - g_ref).norm() / g_ref.norm()).item()
    assert rel < 1e-5, f"generator gradient on the Triton path differs from the reference: relative {rel:.3e}"
