"""Test and benchmark fixtures that ship with the package but are not part of the training API.

`uno_engine.testing.presets` builds real transformers / diffusers models from configs with random weights
(tiny CPU shapes and the real models' shapes). Tests, benchmarks and examples import them from here, the
way `torch.testing` serves PyTorch's own tests: importable wherever uno_engine is installed, and kept out of
the core (`uno_engine.step`, `uno_engine.loss`, the critics, the generators never import it).
"""
