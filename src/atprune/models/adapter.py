"""The architecture adapter: where the prunable parts of a loaded causal LM are.

It finds what the engine needs from the module tree and the config alone: the list of decoder blocks, the
prunable matrices inside each block (``nn.Linear``, GPT-2 ``Conv1D`` seen transposed, one expert of a fused
mixture-of-experts weight), and the embeddings / output head that are never pruned. It never reads private
attributes of attention modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from atprune.errors import ConfigError
from atprune.models.sources import _config_num_blocks


KNOWN_BLOCK_PATHS = (
    "model.layers",  # LLaMA, Mistral, Mixtral, Qwen2/3, Gemma 2/3, Phi-3
    "model.language_model.layers",  # vision-language wrappers: LLaVA, LLaVA-NeXT, Qwen2-VL / 2.5-VL, Gemma 3
    "model.text_model.layers",  # Idefics3 / SmolVLM
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


ATTENTION, MLP = "attention", "mlp"  # the two sublayers of a decoder block (see :func:`sublayer`)
_MLP_PARTS = ("mlp", "ffn", "feed_forward", "feedforward", "moe", "experts", "shared_expert")  # substrings of a part


def sublayer(name: str) -> str | None:
    """Whether a block's prunable layer belongs to its attention or its MLP sublayer, from its name relative to the
    block (the keys of :meth:`Adapter.linears`).

    The dotted parts are read left to right; the first that names a sublayer decides: a part containing ``attn`` or
    ``attention`` is :data:`ATTENTION` (LLaMA / Mistral / Qwen / Gemma / Phi ``self_attn.*``, OPT ``self_attn.*``,
    GPT-2 / MPT ``attn.*``, GPT-NeoX ``attention.*``, Falcon / BLOOM ``self_attention.*``); a part containing one of
    ``mlp``, ``ffn``, ``feed_forward``, ``moe``, ``experts``, ``shared_expert`` or equal to ``fc1`` / ``fc2`` is
    :data:`MLP` (``mlp.*`` of most families, mixture-of-experts ``mlp.experts.<e>.*``, OPT's top-level ``fc1`` /
    ``fc2``, MPT ``ffn.*``).

    Returns:
        ``"attention"``, ``"mlp"``, or None for a layer that names neither (e.g. a state-space mixer).
    """
    for part in name.lower().split("."):
        if "attn" in part or "attention" in part:
            return ATTENTION
        if part in ("fc1", "fc2") or any(key in part for key in _MLP_PARTS):
            return MLP
    return None


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
