"""A miniature GenEval that runs on a CPU: a synthetic world of colored shapes, a critic that captions all of
it, a generator pretrained on part of it, a rule-based judge, and UNO post-training (benchmarks/learning.py).

Modules: `world` (scenes, captions, tokenizer, held-out split), `judge` (pixels -> objects -> checks),
`models` (critic / generator / text encoder builders), `training` (critic and generator pretraining, cache),
`experiment` (UNO runs, evaluation, ablations).
"""
