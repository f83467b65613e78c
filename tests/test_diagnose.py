"""uno_engine.diagnose: greedy caption, per-token CE, verdicts, and the JSON / PNG report."""

import json
import math

import pytest
import torch
from torch import nn

import uno_engine
from uno_engine import Critic, UNOLoss, UNOStep
from uno_engine.diagnose import greedy_caption
from uno_engine.generators import CallableGenerator
from uno_engine.testing.presets.critics import build_critic_model


class PixelGenerator(nn.Module):
    def __init__(self, batch=2, h=40, w=56, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.pixels = nn.Parameter(torch.randn(batch, 3, h, w, generator=g) * 0.5)

    def forward(self, batch):
        return torch.tanh(self.pixels)


class WordTokenizer:
    """The three tokenizer calls diagnose makes, on a made-up vocabulary: id i <-> "w<i>"; eos = 5."""

    eos_token_id = 5

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [f"w{i}" for i in ids]


@pytest.fixture(scope="module")
def setup():
    model, processor = build_critic_model("tiny-llava-clip")
    critic = Critic.from_hf(model, processor)
    gen = PixelGenerator()
    step = UNOStep(CallableGenerator(gen, module=gen), critic, UNOLoss())
    g = torch.Generator().manual_seed(1)
    captions = torch.randint(3, critic.vocab_size - 1, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return step, critic, gen, {"captions": captions, "caption_mask": mask}


def test_token_ce_and_verdicts_follow_the_rule(setup, tmp_path):
    step, critic, gen, batch = setup
    ref = PixelGenerator(seed=3)
    batch = {**batch, "reference_images": ref(None).detach()}
    threshold = 4.8  # near the random critic's CE, so both outcomes occur
    diag = uno_engine.diagnose(step, batch, threshold=threshold, out_dir=tmp_path)
    # float64 eager reference of the per-token CE and the top-1 test
    with torch.no_grad():
        res = {}
        for key, images in (("gen", gen(None)), ("ref", batch["reference_images"])):
            out = critic(critic.prepare(images), batch["captions"], batch["caption_mask"])
            logp = torch.log_softmax(out.caption_hidden.double() @ out.lm_head_weight.double().T, -1)
            ce = -logp.gather(-1, batch["captions"][..., None]).squeeze(-1) * batch["caption_mask"]
            res[key] = (ce, logp.argmax(-1) == batch["captions"])
    torch.testing.assert_close(diag.token_ce.double(), res["gen"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(diag.reference_token_ce.double(), res["ref"][0], rtol=1e-5, atol=1e-6)
    ok_gen = res["gen"][1] | (res["gen"][0] < threshold)
    ok_ref = res["ref"][1] | (res["ref"][0] < threshold)
    for b in range(2):
        for i in range(7):
            want = (
                "pad"
                if batch["caption_mask"][b, i] == 0
                else "understanding error"
                if not ok_ref[b, i]
                else "fine"
                if ok_gen[b, i]
                else "generation error"
            )
            assert diag.verdict[b][i] == want, (b, i)
    assert diag.counts()["pad"] == 2 and len(set(v for row in diag.verdict for v in row)) >= 3
    data = json.loads((tmp_path / "diagnosis.json").read_text())
    assert data["images"][1]["verdict"] == diag.verdict[1] and data["threshold"] == threshold
    assert (tmp_path / "diagnosis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_greedy_caption_is_read_right_and_same_image_reference_has_no_generation_error(setup):
    step, critic, gen, batch = setup
    greedy = greedy_caption(critic, critic.prepare(gen(None)), 7, None, batch["captions"])
    # on the critic's own greedy caption every token is its top-1 prediction
    same = {"captions": greedy, "reference_images": gen(None).detach()}
    diag = uno_engine.diagnose(step, same)
    assert diag.top1.all() and torch.equal(diag.greedy_ids, greedy)
    assert all(v == "fine" for row in diag.verdict for v in row)
    # reference == generated image: the two reads agree, so no token is a generation error
    diag2 = uno_engine.diagnose(step, {**batch, "reference_images": gen(None).detach()})
    assert diag2.counts()["generation error"] == 0
    assert diag2.counts()["understanding error"] == sum(
        v != "fine" and v != "pad" for r in diag2.verdict for v in r
    )


def test_without_reference_and_bad_input(setup):
    step, critic, gen, batch = setup
    diag = uno_engine.diagnose(step, batch, threshold=1e-3)
    assert diag.reference_token_ce is None
    flat = [v for row in diag.verdict for v in row]
    assert set(flat) <= {"fine", "misread", "pad"} and "misread" in flat
    with pytest.raises(ValueError, match="threshold"):
        uno_engine.diagnose(step, batch, threshold=0)
    with pytest.raises(ValueError, match="captions"):
        uno_engine.diagnose(step, {"captions": batch["captions"][:, :0]})
    assert math.isclose(uno_engine.diagnose(step, batch).threshold, math.log(2))


def test_tokenizer_gives_text(setup, tmp_path):
    step, critic, gen, batch = setup
    diag = uno_engine.diagnose(step, batch, tokenizer=WordTokenizer(), out_dir=tmp_path)
    for b in range(2):
        ids = [i for i in diag.greedy_ids[b].tolist() if i != 5]
        assert diag.greedy_text[b] == " ".join(f"w{i}" for i in ids)
        assert diag.caption_tokens[b] == [f"w{i}" for i in batch["captions"][b].tolist()]
    data = json.loads((tmp_path / "diagnosis.json").read_text())
    assert data["images"][0]["greedy_text"] == diag.greedy_text[0]
