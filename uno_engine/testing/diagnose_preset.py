"""`uno_engine.diagnose` on a preset with random weights: the command-line demo of the diagnosis.

    python -m uno_engine.testing.diagnose_preset --preset tiny --out DIR

Builds the preset (uno_engine.testing.presets: models from configs, random weights, no download), makes the
reference image the generator's image on another seed and the caption what the critic reads in it (random
weights have no real captions; the reference is then read right by construction), runs `diagnose` and writes
diagnosis.json / diagnosis.png to DIR. It lives in uno_engine.testing because it builds test presets:
production modules never import uno_engine.testing (tests/test_imports.py).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from uno_engine import UNOConfig, UNOStep
from uno_engine.diagnose import diagnose, greedy_caption
from uno_engine.testing.presets import build_preset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m uno_engine.testing.diagnose_preset", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--preset", default="tiny", help="uno_engine.testing.presets name (CPU: tiny, tiny-janus)"
    )
    parser.add_argument("--out", required=True, help="output directory for diagnosis.json / diagnosis.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=math.log(2.0))
    args = parser.parse_args(argv)
    preset = build_preset(args.preset)
    step = UNOStep(preset.generator, preset.make_critic("none"), preset.make_loss(), UNOConfig())
    batch = preset.make_batch(seed=args.seed)
    with torch.no_grad():
        ref = preset.generator({**batch, "seed": args.seed + 1}).float().clamp(-1, 1)
        critic = step.critic
        ref_inputs = critic.prepare(ref, input_range=step.config.input_range, backend=step.config.backend)
        batch["captions"] = greedy_caption(critic, ref_inputs, preset.caption_len, None, batch["captions"])
        batch["caption_mask"] = torch.ones_like(batch["captions"])
        batch["reference_images"] = ref
    diag = diagnose(step, batch, threshold=args.threshold, out_dir=args.out)
    print(json.dumps({"out": str(Path(args.out).resolve()), "counts": diag.counts()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
