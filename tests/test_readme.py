"""The README's usage example runs as written, on tiny real models standing in for the names it leaves open."""

import torch
from doc_snippets import doc_path, python_block


def _usage_block() -> str:
    return python_block("README.md", "## Usage")


def test_readme_usage_example_runs():
    from uno_engine.testing.presets.critics import build_critic_model
    from uno_engine.testing.presets.generators import build_generator
    from uno_engine.testing.presets.processors import chat_processor

    llava_model, llava_image_processor = build_critic_model("tiny-llava-clip")
    llava_processor = chat_processor("tiny-llava-clip", llava_model, llava_image_processor)
    tiny, make_batch = build_generator("tiny-sd")
    batches = [
        make_batch(
            2, 5, llava_model.config.text_config.vocab_size, generator=torch.Generator().manual_seed(i)
        )
        for i in range(2)
    ]
    for b in batches:
        b["reference_images"] = torch.rand(2, 3, 48, 64) * 2 - 1
    logged = []
    namespace = {
        "llava_model": llava_model,
        "llava_processor": llava_processor,
        "unet": tiny.denoiser,
        "scheduler": tiny.scheduler,
        "vae": tiny.vae,
        "loader": batches,
        "log": logged.append,
    }
    code = _usage_block()
    assert "UNOStep" in code and "out.loss.backward()" in code
    exec(compile(code, str(doc_path("README.md")), "exec"), namespace)  # noqa: S102
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in logged)
    assert {"loss", "caption_ce", "density", "structure"} <= set(logged[0])
