"""Where the prunable parts of an image classifier are, as the block-by-block engine sees them.

The engine (:func:`atprune.engine.passes.sequential`) walks a list of blocks, feeding each one's outputs to the next,
and prunes the matrices that :meth:`VisionAdapter.linears` lists for a block. For image classifiers:

- ViT / DeiT (timm ``VisionTransformer`` and ``VisionTransformerDistilled``, transformers ``ViTForImageClassification``):
  the blocks are the transformer blocks; their inputs are the patch embedding with the class (and distillation)
  token and position embedding added, computed by the model itself up to block 0. Every ``nn.Linear`` of a block is
  pruned (attention qkv / q, k, v and output projection, MLP fc1 and fc2), as in Wanda's ``prune_vit`` /
  ``prune_deit`` (locuslab/wanda ``image_classifiers/prune_utils.py``); the patch embedding and the head are not.
- ConvNeXt (timm ``ConvNeXt``, transformers ``ConvNextForImageClassification``): the blocks are the ConvNeXt blocks of
  all stages in order. The downsampling layer in front of a stage sits outside its blocks: it runs, unpruned, as
  the first step of the stage's first block (:class:`WithDownsample`), so its output is the block's input. Only the
  block's pointwise layers are pruned (``nn.Linear``, or 1x1 ``Conv2d`` in timm's ``conv_mlp`` variants, seen as
  ``[out, in]`` matrices by :class:`PointwiseConv`); the 7x7 depthwise convolution and the norms are not, as in
  Wanda's ``prune_convnext`` (which prunes ``nn.Linear`` only). Wanda calibrates one ConvNeXt *stage* at a time;
  atprune goes one block at a time (one rate per block, the unit of ATP's allocation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from atprune.errors import ConfigError

FAMILIES = ("timm-vit", "timm-convnext", "hf-vit", "hf-convnext")


class PointwiseConv:
    """A 1x1 ``nn.Conv2d`` (weight ``[out, in, 1, 1]``, no groups) seen as an ``[out_features, in_features]`` matrix.

    ``weight`` is a view sharing storage with the parameter; :meth:`set_weight` stores a new ``[out, in]`` tensor;
    the pre-hook hands over the input as ``[batch, H, W, in_features]`` (channels last), the layout of
    ``nn.Linear`` inputs that :class:`atprune.engine.stats.InputStats` reads.
    """

    def __init__(self, module: nn.Conv2d):
        self.module = module
        self.out_features, self.in_features = module.weight.shape[:2]

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight.detach().view(self.out_features, self.in_features)

    def set_weight(self, weight: torch.Tensor) -> None:
        self.module.weight.data = weight.detach().reshape(self.module.weight.shape).contiguous()

    def register_forward_pre_hook(self, hook):
        """``hook(layer, (x,))`` with ``x`` ``[batch, H, W, in_features]`` before the convolution runs."""
        return self.module.register_forward_pre_hook(lambda mod, args: hook(self, (args[0].movedim(1, -1),)))

    def register_forward_hook(self, hook):
        return self.module.register_forward_hook(lambda mod, args, out: hook(self, (args[0].movedim(1, -1),), out))

    def __repr__(self) -> str:
        return f"PointwiseConv({self.module!r})"


def _is_pointwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
            and module.stride == (1, 1) and module.padding in ((0, 0), "valid"))


class WithDownsample(nn.Module):
    """The first block of a ConvNeXt stage preceded by the stage's downsampling layer (never pruned).

    ``forward(x)``: ``x`` ``[batch, C_prev, H, W]`` (the previous stage's output) -> ``block(downsample(x))``.
    The wrapper is the adapter's own object; the model's module tree is unchanged.
    """

    def __init__(self, downsample: nn.Module, block: nn.Module):
        super().__init__()
        self.downsample, self.block = downsample, block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.downsample(x))


@dataclass
class VisionAdapter:
    """The blocks of an image classifier, input side first, for :func:`atprune.engine.passes.sequential`.

    Attributes:
        model: the classifier (timm or transformers), ``model(images)`` -> logits ``[batch, classes]`` (or a
            transformers output with ``.logits``).
        family: one of :data:`FAMILIES`.
        blocks: ``nn.ModuleList`` of the blocks; the first block of each ConvNeXt stage after the first is a
            :class:`WithDownsample`.
        entry: the module whose input is block 0's input (the first block; ConvNeXt: stage 0, so its downsampling
            layer, if any, runs inside block 0).
        blocks_path: where the blocks are, for reports.
    """

    model: nn.Module
    family: str
    blocks: nn.ModuleList
    entry: nn.Module
    blocks_path: str

    @classmethod
    def for_model(cls, model: nn.Module) -> "VisionAdapter":
        """Recognise the model's family and list its blocks.

        Raises:
            ConfigError: the model is none of the supported image classifiers (the message lists them).
        """
        name = type(model).__name__
        module = type(model).__module__
        if module.startswith("timm.") and hasattr(model, "blocks") and hasattr(model, "patch_embed"):
            blocks = nn.ModuleList(list(model.blocks))
            return cls(model, "timm-vit", blocks, blocks[0], "blocks")
        if module.startswith("timm.") and name == "ConvNeXt":
            blocks = _convnext_blocks([(s.downsample, list(s.blocks)) for s in model.stages])
            return cls(model, "timm-convnext", blocks, model.stages[0], "stages.*.blocks")
        if name == "ViTForImageClassification":
            layers = getattr(model.vit, "layers", None)
            layers = layers if layers is not None else model.vit.encoder.layer
            return cls(model, "hf-vit", nn.ModuleList(list(layers)), layers[0], "vit.layers")
        if name == "ConvNextForImageClassification":
            stages = model.convnext.encoder.stages
            blocks = _convnext_blocks([(s.downsampling_layer, list(s.layers)) for s in stages])
            return cls(model, "hf-convnext", blocks, stages[0], "convnext.encoder.stages.*.layers")
        raise ConfigError(f"{name} is not an image classifier atprune can prune: supported are timm VisionTransformer "
                          "(ViT, DeiT) and ConvNeXt, transformers ViTForImageClassification and "
                          "ConvNextForImageClassification")

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def linears(self, block: nn.Module) -> dict[str, object]:
        """The prunable matrices of one block by name relative to the model's block (e.g. ``attn.qkv``,
        ``mlp.fc1``): ``nn.Linear`` modules and :class:`PointwiseConv` views (ConvNeXt ``conv_mlp``). A
        :class:`WithDownsample`'s downsampling layer is not included."""
        inner = block.block if isinstance(block, WithDownsample) else block
        out: dict[str, object] = {}
        for name, module in inner.named_modules():
            if isinstance(module, nn.Linear):
                out[name] = module
            elif _is_pointwise(module):
                out[name] = PointwiseConv(module)
        return out

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` ``[batch, channels, H, W]`` (preprocessed) -> logits ``[batch, classes]`` float."""
        out = self.model(images) if self.family.startswith("timm") else self.model(pixel_values=images)
        return getattr(out, "logits", out)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, classes]`` from the last block's output (``[batch, tokens, dim]`` for ViT,
        ``[batch, C, H, W]`` for ConvNeXt): what the model does after its blocks (final norm, pooling,
        classifier)."""
        m = self.model
        if self.family == "timm-vit":
            return m.forward_head(m.norm(hidden))
        if self.family == "timm-convnext":
            return m.forward_head(m.norm_pre(hidden))
        if self.family == "hf-vit":
            return m.classifier(m.vit.layernorm(hidden)[:, 0, :])
        return m.classifier(m.convnext.layernorm(hidden.mean([-2, -1])))


def _convnext_blocks(stages: list[tuple[nn.Module, list[nn.Module]]]) -> nn.ModuleList:
    """Flatten ``[(downsample, blocks)]`` per stage: the first block of a stage whose downsampling layer is not the
    identity is wrapped in :class:`WithDownsample`. Stage 0's downsampling layer (identity in timm's and transformers'
    ConvNeXt) runs before block 0's captured input is taken, inside the stage, so it is wrapped too."""
    flat = []
    for downsample, blocks in stages:
        if isinstance(downsample, nn.ModuleList):  # transformers: applied one after the other
            downsample = nn.Sequential(*downsample)
        has_downsample = not isinstance(downsample, nn.Identity) and any(True for _ in downsample.parameters())
        for j, block in enumerate(blocks):
            flat.append(WithDownsample(downsample, block) if j == 0 and has_downsample else block)
    return nn.ModuleList(flat)
