"""Tiny random-init vision-language models of every supported class, with a processor built offline.

Each model has 2 language blocks (hidden 64), a 2-layer vision tower on 28x28 or 56x56 images and a tokenizer of
single characters plus the class's special tokens (no hub download). ``tiny_vlm(kind)`` returns
``(model, processor)``; ``KINDS`` lists the kinds; ``image(seed)`` is a random RGB image.

Qwen2-VL's, Qwen2.5-VL's and SmolVLM's processors hold a video processor, which needs torchvision (the test extra
brings it through timm; :mod:`atprune.torchvision_compat` makes it importable next to a CPU torch); SmolVLM's also
needs num2words (its video prompts spell durations out), which the test extra installs.
"""

from __future__ import annotations

import string

import torch

KINDS = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "smolvlm")
TEXT_LAYERS = 2
VISION_LAYERS = 2


def _tokenizer(specials: list[str], extra: dict | None = None, bos: str = "<s>"):
    """Character-level fast tokenizer: <unk>, <pad>, <s>, </s>, printable ASCII, then ``specials`` (as special
    tokens, matched before the character split). ``extra``: named extra special tokens (``boi_token`` ...)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3}
    for ch in string.printable:
        if ch not in "\r\x0b\x0c":
            vocab[ch] = len(vocab)
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens=extra or {})
    fast.add_special_tokens({"additional_special_tokens": specials})
    return fast


def _text(arch_config, **kw):
    return arch_config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=TEXT_LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=1, bos_token_id=2, eos_token_id=3, **kw)


VOCAB = 192


def tiny_vlm(kind: str, seed: int = 0):
    """``(model, processor)`` for ``kind`` (one of ``KINDS``): random weights (seeded), eager attention, float32,
    eval mode."""
    import transformers as tf

    if kind in ("llava", "llava_next"):
        tok = _tokenizer(["<image>"])
        vision = tf.CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=VISION_LAYERS, num_attention_heads=2, projection_dim=32)
        common = dict(vision_config=vision, text_config=_text(tf.LlamaConfig),
                      image_token_id=tok.convert_tokens_to_ids("<image>"))
        crop = {"height": 28, "width": 28}
        if kind == "llava":
            config = tf.LlavaConfig(**common)
            ip = tf.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size=crop)
            proc = tf.LlavaProcessor(ip, tok, patch_size=14, vision_feature_select_strategy="default",
                                     num_additional_image_tokens=1)
        else:
            grid = [[28, 28], [28, 56]]
            config = tf.LlavaNextConfig(**common, image_grid_pinpoints=grid)
            ip = tf.LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size=crop, image_grid_pinpoints=grid)
            proc = tf.LlavaNextProcessor(ip, tok, patch_size=14, vision_feature_select_strategy="default",
                                         num_additional_image_tokens=1)
    elif kind in ("qwen2_vl", "qwen2_5_vl"):
        specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
        tok = _tokenizer(specials)
        ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
        text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=TEXT_LAYERS,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                    pad_token_id=1, bos_token_id=2, eos_token_id=3)
        vision = dict(depth=VISION_LAYERS, embed_dim=32, hidden_size=32, out_hidden_size=64, num_heads=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, intermediate_size=48)
        pixels = dict(min_pixels=28 * 28 * 4, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2)
        ip = tf.Qwen2VLImageProcessorPil(**pixels)
        vp = tf.Qwen2VLVideoProcessor(**pixels)  # Qwen2.5-VL's processor takes the same video processor
        token_ids = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                         vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        if kind == "qwen2_vl":
            vision = {k: v for k, v in vision.items() if k not in ("out_hidden_size", "intermediate_size")}
            vision["hidden_size"] = 64
            vision["mlp_ratio"] = 2
            config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **token_ids)
            proc = tf.Qwen2VLProcessor(ip, tok, vp)
        else:
            vision["fullatt_block_indexes"] = [1]
            vision["window_size"] = 56
            config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids)
            proc = tf.Qwen2_5_VLProcessor(ip, tok, vp)
    elif kind == "gemma3":
        specials = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
        tok = _tokenizer(specials, extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                          "image_token": "<image_soft_token>"})
        ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
        text = _text(tf.Gemma3TextConfig, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
                     layer_types=["sliding_attention", "full_attention"])
        vision = tf.SiglipVisionConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=VISION_LAYERS, num_attention_heads=2)
        config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                 boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                                 image_token_index=ids["<image_soft_token>"])
        ip = tf.Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
        proc = tf.Gemma3Processor(ip, tok, image_seq_length=4)
    elif kind in ("idefics3", "smolvlm"):
        # SmolVLM is Idefics3's layout (vision_model, connector, text_model) with its own classes and a video part
        specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
        specials += [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
        tok = _tokenizer(specials)
        names = ("Idefics3VisionConfig", "Idefics3Config", "Idefics3ImageProcessorPil", "Idefics3Processor")
        if kind == "smolvlm":
            names = tuple(n.replace("Idefics3", "SmolVLM") for n in names)
        vision_cls, config_cls, ip_cls, proc_cls = (getattr(tf, n) for n in names)
        vision = vision_cls(image_size=56, patch_size=14, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=VISION_LAYERS, num_attention_heads=2)
        config = config_cls(vision_config=vision, text_config=_text(tf.LlamaConfig), scale_factor=2,
                            image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=1)
        size = {"longest_edge": 56}
        ip = ip_cls(size=size, max_image_size=size, do_image_splitting=False)
        if kind == "smolvlm":
            proc = proc_cls(ip, tok, tf.SmolVLMVideoProcessor(size=size, max_image_size=size), image_seq_len=4)
        else:
            proc = proc_cls(ip, tok, image_seq_len=4)
    else:
        raise ValueError(f"unknown tiny VLM {kind!r}; one of {KINDS}")
    config._attn_implementation = "eager"
    for sub in ("text_config", "vision_config"):
        if getattr(config, sub, None) is not None:
            getattr(config, sub)._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForImageTextToText.from_config(config).eval()
    return model, proc


def image(seed: int = 0, size: int = 40):
    """A random ``size`` x ``size`` RGB ``PIL.Image``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
