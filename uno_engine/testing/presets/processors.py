"""Full HF processors (tokenizer + image processor + chat template) for the tiny critic presets, built in-process.

`chat_processor(name, hf_model, image_processor)` returns the family's real processor class (LlavaProcessor,
LlavaOnevisionProcessor, JanusProcessor, Qwen2VLProcessor / Qwen3VLProcessor) around a word-level fast tokenizer
whose special tokens sit at the ids the tiny model's config uses (image token, Qwen's vision start / end, Janus's
begin / end of image), and a chat template in the family's style. No files, no downloads, no torchvision: the
Qwen processors are built without their video processor (image-only), which is all a critic needs.

The vocabulary (128 ids, the tiny presets' `vocab_size`): padding, unknown, BOS, EOS, the chat markers, the
family's image markers at the config's ids, and `WORDS` (captions and instructions of the tests).
"""

from __future__ import annotations

__all__ = ["WORDS", "TEMPLATES", "chat_processor", "chat_tokenizer", "image_only"]

WORDS = (
    "a an the red green blue yellow circle square triangle star cube ball left right of above below on under "
    "and two three one small big photo image picture this describe what is in shows there are . , ? : "
    "user assistant system you helpful"
).split()

# chat templates in each family's style (whitespace-separated words; the tokenizer splits on whitespace and on
# its special tokens). `message['content']` is the HF list form: {"type": "image"} / {"type": "text", ...}.
_CONTENT = (
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{IMAGE}{%- elif part['type'] == 'text' -%}{{ ' ' + part['text'] + ' ' }}{%- endif -%}"
    "{%- endfor -%}"
)
TEMPLATES = {
    # LLaVA-1.5: "USER: <image>\n{instruction} ASSISTANT: {caption}</s>"
    "llava": (
        "{{ bos_token }}{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%} user : " + _CONTENT.replace("{IMAGE}", "<image>") + " "
        "{%- else -%} assistant : " + _CONTENT.replace("{IMAGE}", "") + " {{ eos_token }} {%- endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt -%} assistant : {%- endif -%}"
    ),
    # Qwen2-VL / Qwen3-VL / LLaVA-OneVision: ChatML with a default system turn
    "chatml": (
        "{%- if messages[0]['role'] != 'system' -%}<|im_start|> system you are a helpful assistant . <|im_end|> "
        "{%- endif -%}"
        "{%- for message in messages -%}<|im_start|> {{ message['role'] }} "
        + _CONTENT
        + " <|im_end|> {% endfor -%}{%- if add_generation_prompt -%}<|im_start|> assistant {%- endif -%}"
    ),
    # Janus: "<|User|>: <image_placeholder>\n{instruction}\n\n<|Assistant|>: {caption}<eos>"
    "janus": (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%} user : "
        + _CONTENT.replace("{IMAGE}", "<image_placeholder>")
        + " {%- else -%} assistant : "
        + _CONTENT.replace("{IMAGE}", "")
        + " {{ eos_token }} {%- endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt -%} assistant : {%- endif -%}"
    ),
}
_CHATML_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
TEMPLATES["qwen"] = TEMPLATES["chatml"].replace(_CONTENT, _CONTENT.replace("{IMAGE}", _CHATML_IMAGE))
TEMPLATES["onevision"] = TEMPLATES["chatml"].replace(_CONTENT, _CONTENT.replace("{IMAGE}", "<image>"))
del TEMPLATES["chatml"]


def chat_tokenizer(vocab_size: int, specials: dict[str, int], *, model_max_length: int = 4096, **attrs):
    """A word-level PreTrainedTokenizerFast over `WORDS` plus `specials` (token -> id, placed at those ids).
    Ids 0-5: [PAD] [UNK] <s> </s> <|im_start|> <|im_end|>; the words follow; `attrs` become tokenizer
    attributes (Janus's boi_token / eoi_token)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = {"[PAD]": 0, "[UNK]": 1, "<s>": 2, "</s>": 3, "<|im_start|>": 4, "<|im_end|>": 5}
    vocab = dict(base)
    for w in WORDS:
        vocab[w] = len(vocab)
    taken = set(specials.values())
    if len(vocab) + len(specials) > vocab_size or any(i < len(vocab) or i >= vocab_size for i in taken):
        raise ValueError(
            f"specials {specials} do not fit a vocabulary of {vocab_size} after {len(vocab)} words"
        )
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = ["[PAD]", "<s>", "</s>", "<|im_start|>", "<|im_end|>", *specials]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=model_max_length,
    )
    for k, v in attrs.items():
        setattr(out, k, v)
    return out


def image_only(cls):
    """`cls` (a processor class whose __init__ takes a video_processor) without its video processor: the HF class
    wants one (and the default video processor wants torchvision); a critic reads images only. The processor's
    attributes come from its __init__ signature, so the subclass's signature drops `video_processor`."""

    class ImageOnly(cls):
        def __init__(self, image_processor=None, tokenizer=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"ImageOnly{cls.__name__}"
    return ImageOnly


def chat_processor(name: str, hf_model, image_processor, *, chat_template: str | None = None):
    """The full processor of a tiny critic preset `name` (its `hf_model` and image processor from
    `build_critic_model`), with the family's chat template (or `chat_template`)."""
    import transformers

    cfg = hf_model.config
    V = cfg.get_text_config().vocab_size
    if "qwen" in name:
        specials = {
            "<|image_pad|>": cfg.image_token_id,
            "<|video_pad|>": cfg.video_token_id,
            "<|vision_start|>": cfg.vision_start_token_id,
            "<|vision_end|>": cfg.vision_end_token_id,
        }
        tok = chat_tokenizer(V, specials)
        cls = transformers.Qwen3VLProcessor if "qwen3" in name else transformers.Qwen2VLProcessor
        proc = image_only(cls)(image_processor=image_processor, tokenizer=tok)
        template = TEMPLATES["qwen"]
    elif "janus" in name:
        specials = {
            "<begin_of_image>": V - 3,
            "<end_of_image>": V - 2,
            "<image_placeholder>": cfg.image_token_id,
        }
        tok = chat_tokenizer(V, specials, boi_token="<begin_of_image>", eoi_token="<end_of_image>")
        tok.image_token = "<image_placeholder>"
        n = hf_model.config.vision_config.num_image_tokens
        proc = transformers.JanusProcessor(image_processor=image_processor, tokenizer=tok, num_image_tokens=n)
        template = TEMPLATES["janus"]
    elif "onevision" in name:
        tok = chat_tokenizer(V, {"<video>": cfg.video_token_id, "<image>": cfg.image_token_id})
        proc = image_only(transformers.LlavaOnevisionProcessor)(
            image_processor=image_processor,
            tokenizer=tok,
            num_image_tokens=(cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            vision_aspect_ratio="anyres_max_9",
        )
        template = TEMPLATES["onevision"]
    elif "llava" in name:
        tok = chat_tokenizer(V, {"<image>": cfg.image_token_id})
        strategy = cfg.vision_feature_select_strategy
        extra = 1 if getattr(cfg.vision_config, "model_type", "") == "clip_vision_model" else 0
        proc = transformers.LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=cfg.vision_config.patch_size,
            vision_feature_select_strategy=strategy,
            num_additional_image_tokens=extra,
        )
        template = TEMPLATES["llava"]
    else:
        raise ValueError(f"chat_processor: no chat processor for preset {name!r}")
    proc.chat_template = chat_template or template
    return proc
