"""Physically smaller transformers models: MLP channels and attention KV groups removed from the weight matrices.

Families (transformers decoder classes whose blocks hold ``mlp.{gate,up,down}_proj`` and
``self_attn.{q,k,v,o}_proj`` with a ``head_dim`` attribute, and whose attention reshapes by ``-1`` heads): llama,
mistral, qwen2, qwen3, gemma2, gemma3 (text). Removing a whole KV group with its query heads keeps
``num_heads / num_kv_heads``, so the attention modules run unchanged with fewer heads.

Saved checkpoints. The config of those families has one ``intermediate_size`` and one head count for all layers, so:

- equal widths in every block (a uniform allocation): ``config.json`` gets the new ``intermediate_size``,
  ``num_attention_heads``, ``num_key_value_heads`` (and an explicit ``head_dim``); the folder is an ordinary
  checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads;
- per-block widths (ATP, OWL, ...): transformers has no per-layer width for these families (only Gemma 3n's config
  takes a per-layer ``intermediate_size`` list), so ``config.json`` keeps the widest block's sizes and records every
  block's in ``atprune_widths``; :func:`load_shrunk` builds the transformers model and resizes its modules before
  loading the weights.

A compensation bias (FLAP) on ``down_proj`` / ``o_proj`` needs a bias the config can express: llama's ``mlp_bias`` /
``attention_bias`` (which also give ``gate/up`` and ``q/k/v`` zero biases).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from atprune.errors import ConfigError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text")
BIAS_FLAGS = {"llama": {"channels": "mlp_bias", "heads": "attention_bias"}}
WIDTHS_KEY = "atprune_widths"


def check_family(config, structure: str, bias: bool) -> None:
    """Raise ConfigError (one line) if ``structure`` (channels, heads or both), with a compensation bias when
    ``bias``, cannot be expressed for this model's family."""
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise ConfigError(f"structured width pruning supports {', '.join(FAMILIES[:-1])}; model type {kind!r} is not "
                          "one of them")
    if bias:
        for part in (("channels", "heads") if structure == "both" else (structure,)):
            if part not in BIAS_FLAGS.get(kind, {}):
                raise ConfigError(f"flap's compensation bias on the {part} cannot be expressed in a {kind} config "
                                  f"(only {', '.join(BIAS_FLAGS)}); use --method wanda-sp")


def _slice(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        w = lin.weight
        if rows is not None:
            w = w[rows.to(w.device)]
            if lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias[rows.to(w.device)].clone())
            lin.out_features = w.shape[0]
        if cols is not None:
            w = w[:, cols.to(w.device)]
            lin.in_features = w.shape[1]
        lin.weight = nn.Parameter(w.clone().contiguous())


def _add_bias(lin: nn.Linear, extra: torch.Tensor | None) -> None:
    """Give ``lin`` a bias (zeros if it had none) and add ``extra`` (``[out]``) to it."""
    with torch.no_grad():
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
        if extra is not None:
            lin.bias += extra.to(lin.bias.dtype).to(lin.bias.device)


def shrink_mlp(block: nn.Module, keep: torch.Tensor, compensation: torch.Tensor | None = None) -> None:
    """Keep MLP channels ``keep`` (sorted int64): rows of ``gate_proj``/``up_proj``, columns of ``down_proj``.

    Args:
        compensation: ``[hidden]`` bias added to ``down_proj`` (``gate``/``up`` get zero biases), or None.
    """
    mlp = block.mlp
    _slice(mlp.gate_proj, rows=keep)
    _slice(mlp.up_proj, rows=keep)
    _slice(mlp.down_proj, cols=keep)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(keep.numel())
    if compensation is not None:
        _add_bias(mlp.gate_proj, None)
        _add_bias(mlp.up_proj, None)
        _add_bias(mlp.down_proj, compensation)


def attention_shape(block: nn.Module) -> tuple[int, int, int]:
    """``(num_heads, num_kv_heads, head_dim)`` of a block's attention, from its projections."""
    attn = block.self_attn
    hd = attn.head_dim
    return attn.q_proj.out_features // hd, attn.k_proj.out_features // hd, hd


def query_columns(keep_groups: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """int64 indices of the q_proj rows / o_proj columns of the query heads of KV groups ``keep_groups`` (query head h
    attends with KV head ``h // (num_heads / num_kv_heads)``, as transformers' ``repeat_kv`` lays them out)."""
    per = num_heads // num_kv_heads
    q_heads = (keep_groups.unsqueeze(1) * per + torch.arange(per)).reshape(-1)
    return (q_heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)


def shrink_heads(block: nn.Module, keep_groups: torch.Tensor, compensation: torch.Tensor | None = None) -> None:
    """Keep KV groups ``keep_groups`` (sorted int64) with their query heads: rows of q/k/v, columns of o_proj.

    Args:
        compensation: ``[hidden]`` bias added to ``o_proj`` (q/k/v get zero biases), or None.
    """
    attn = block.self_attn
    heads, kv, hd = attention_shape(block)
    q_cols = query_columns(keep_groups, heads, kv, hd)
    kv_cols = (keep_groups.unsqueeze(1) * hd + torch.arange(hd)).reshape(-1)
    _slice(attn.q_proj, rows=q_cols)
    _slice(attn.k_proj, rows=kv_cols)
    _slice(attn.v_proj, rows=kv_cols)
    _slice(attn.o_proj, cols=q_cols)
    for name, value in (("num_heads", q_cols.numel() // hd), ("num_key_value_heads", keep_groups.numel())):
        if hasattr(attn, name):
            setattr(attn, name, int(value))
    if compensation is not None:
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            _add_bias(lin, None)
        _add_bias(attn.o_proj, compensation)


def block_widths(blocks) -> list[dict]:
    """Per block: ``intermediate_size``, ``num_heads``, ``num_kv_heads`` as the modules now are."""
    out = []
    for b in blocks:
        heads, kv, _ = attention_shape(b)
        out.append({"intermediate_size": b.mlp.down_proj.in_features, "num_heads": heads, "num_kv_heads": kv})
    return out


def update_config(model, widths: list[dict], biases: set[str] = frozenset()) -> bool:
    """Write the blocks' widths into ``model.config`` (module docstring); returns True when they are all equal (an
    ordinary checkpoint). ``biases``: structures given a compensation bias (``channels``, ``heads``)."""
    config = model.config.get_text_config()
    config.head_dim = attention_shape(next(iter(_blocks(model))))[2]
    for part in biases:
        setattr(config, BIAS_FLAGS[config.model_type][part], True)
    uniform = all(w == widths[0] for w in widths)
    ref = widths[0] if uniform else {k: max(w[k] for w in widths) for k in widths[0]}
    config.intermediate_size = ref["intermediate_size"]
    config.num_attention_heads = ref["num_heads"]
    config.num_key_value_heads = ref["num_kv_heads"]
    if uniform:
        if hasattr(config, WIDTHS_KEY):
            delattr(config, WIDTHS_KEY)
    else:
        setattr(config, WIDTHS_KEY, widths)
    return uniform


def _blocks(model):
    from atprune.models.adapter import Adapter

    return Adapter.for_model(model).blocks


def load_shrunk(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Load a checkpoint written from a shrunk model: plain ``from_pretrained`` for equal widths; with per-block
    widths (``atprune_widths`` in ``config.json``), the transformers model built from the config with each block's
    modules resized, then the weights loaded strictly.

    Raises:
        RuntimeError: a weight is missing or has an unexpected shape (a damaged checkpoint).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    widths = json.loads((folder / "config.json").read_text()).get(WIDTHS_KEY)
    if not widths:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for block, w in zip(_blocks(model), widths):
        shrink_mlp(block, torch.arange(w["intermediate_size"]))
        shrink_heads(block, torch.arange(w["num_kv_heads"]))
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(path)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{folder}: checkpoint does not match its widths (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]})")
    model.tie_weights()
    return model.eval()
