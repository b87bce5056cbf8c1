"""``Segmenter``: a dense-prediction network in segmentation-models-pytorch's three parts.

An encoder (any fvlab or timm model, through timm's feature API ``forward_intermediates``: the
per-stage maps at strides 4-32), a decoder from segmentation-models-pytorch, and its
``SegmentationHead`` (a 1x1 conv to class logits, upsampled 4x to the input). Decoders:

- ``mlp``: SegFormer's all-MLP decoder (a 1x1 projection of every stage, bilinear upsampling to
  stride 4, a 1x1 fusion): it mixes nothing spatially, so whatever crosses windows crossed them
  in the encoder;
- ``fpn``: the feature pyramid (top-down 2x upsampling plus lateral 1x1 convs, 3x3 conv blocks):
  its 3x3 convs at stride 32 reach far, so it is the stronger decoder and the weaker probe.

The encoder keeps its own methods (geometry checks, idle carrier-token weights, BatchNorm
fusion), which the segmenter passes on, so profiling and ONNX export treat it as a model.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Segmenter", "DECODERS", "padded_size", "receptive_field"]

DECODERS = ("mlp", "fpn")
# Every encoder stage is a stride-2 step from stride 4 to stride 32: a side divisible by 32
# gives maps that the FPN's 2x upsampling lines up with, so other sides are padded to it.
STRIDE = 32


def padded_size(image_size: int | Sequence[int]) -> int | tuple[int, ...]:
    """``image_size`` rounded up to whole stride-32 cells, as ``Segmenter.forward`` pads its input."""
    if isinstance(image_size, int):
        return -(-image_size // STRIDE) * STRIDE
    return tuple(-(-side // STRIDE) * STRIDE for side in image_size)


def _decoder(name: str, channels: Sequence[int], width: int) -> nn.Module:
    """smp's decoder over maps of ``channels`` at strides 4-32, ``width`` channels out."""
    # smp's decoders take the list a timm universal encoder returns: the image, an empty
    # stride-2 map, then strides 4 to 32.
    encoder_channels = [0, 0, *channels]
    if name == "mlp":
        from segmentation_models_pytorch.decoders.segformer.decoder import SegformerDecoder

        return SegformerDecoder(encoder_channels, encoder_depth=5, segmentation_channels=width)
    if name == "fpn":
        from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder

        return FPNDecoder(encoder_channels, encoder_depth=5, pyramid_channels=width,
                          segmentation_channels=width, dropout=0.0, merge_policy="add")
    raise ValueError(f"model.decoder must be one of {', '.join(DECODERS)}, got {name!r}")


class Segmenter(nn.Module):
    """Encoder + smp decoder + smp segmentation head: (B, C, H, W) images to (B, classes, H, W) logits.

    Args:
        encoder: a model with timm's feature API (``forward_intermediates``, ``feature_info``),
            built without a classifier head.
        num_classes: classes to predict per pixel.
        decoder: ``mlp`` (SegFormer's all-MLP head) or ``fpn``.
        decoder_channels: the decoder's width.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, decoder: str = "mlp", decoder_channels: int = 64):
        super().__init__()
        from segmentation_models_pytorch.base import SegmentationHead

        if decoder not in DECODERS:
            raise ValueError(f"model.decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        channels = [info["num_chs"] for info in encoder.feature_info]
        reductions = [info["reduction"] for info in encoder.feature_info]
        if reductions != [4, 8, 16, 32]:
            raise ValueError(f"the encoder's stages have strides {reductions}; a segmenter needs four "
                             f"stages at strides 4, 8, 16 and 32")
        self.encoder = encoder
        self.decoder = _decoder(decoder, channels, decoder_channels)
        # 1x1: the head adds no spatial mixing of its own; both smp decoders end at stride 4.
        self.segmentation_head = SegmentationHead(decoder_channels, num_classes, kernel_size=1, upsampling=4)
        self.num_classes = num_classes
        self.decoder_name = decoder

    @property
    def in_chans(self) -> int:
        """Input channels (the encoder's)."""
        return self.encoder.in_chans

    @property
    def fused(self) -> bool:
        """Whether the encoder's BatchNorms are folded for inference (an encoder that cannot fold counts as folded)."""
        return getattr(self.encoder, "fused", True)

    def fuse(self) -> "Segmenter":
        """Fold the encoder's BatchNorms for inference (``FasterViT.fuse``); the decoder's stay."""
        if not self.fused:
            self.encoder.fuse()
        return self

    @property
    def dynamic_img_size(self) -> bool:
        """Whether the encoder takes any image size (timm's Swin: only its own)."""
        return getattr(self.encoder, "dynamic_img_size", True)

    @property
    def patch_embed(self) -> nn.Module:
        """The encoder's patch embedding (its ``img_size`` is the one size a fixed-size encoder takes)."""
        return self.encoder.patch_embed

    def window_geometry(self, image_size: int | Sequence[int]) -> list[Any]:
        """The encoder's window-attention stages at ``image_size`` (padded as the forward pads it)."""
        return self.encoder.window_geometry(padded_size(image_size))

    def idle_parameters(self, image_size: int | Sequence[int]) -> list[nn.Parameter]:
        """The encoder's weights an input of ``image_size`` never uses (carrier tokens of one-window stages)."""
        idle = getattr(self.encoder, "idle_parameters", None)
        return list(idle(padded_size(image_size))) if callable(idle) else []

    def check_image_size(self, image_size: int | Sequence[int]) -> None:
        """Raise ValueError unless the encoder takes images of ``image_size`` (padded to whole stride-32 cells)."""
        self.encoder.check_image_size(padded_size(image_size))

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer groups (layer-wise lr decay): the encoder's, then the decoder and head as the last."""
        own = self.encoder.group_matcher(coarse)

        def prefixed(rule: Any) -> Any:
            if isinstance(rule, str):
                return "^encoder\\." + rule.removeprefix("^")
            return [(prefixed(r), order) for r, order in rule]

        matcher = {name: prefixed(rule) for name, rule in own.items()}
        matcher["head"] = r"^(?:decoder|segmentation_head)\."
        return matcher

    def no_weight_decay(self) -> set[str]:
        """The encoder's parameters exempt from weight decay (timm's ``no_weight_decay``), under their prefix."""
        names = getattr(self.encoder, "no_weight_decay", lambda: set())()
        return {f"encoder.{name}" for name in names}

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's four maps, strides 4-32 (NCHW; the last one normalised as in classification)."""
        return self.encoder.forward_intermediates(x, indices=4, norm=True, intermediates_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits at the input's size."""
        height, width = x.shape[-2:]
        # Padded on the bottom and right to whole stride-32 cells (often by nothing), cropped back.
        padded = F.pad(x, (0, (-width) % STRIDE, 0, (-height) % STRIDE))
        features = self.forward_features(padded)
        logits = self.segmentation_head(self.decoder([padded, padded[:, :0], *features]))
        return logits[..., :height, :width]


@torch.no_grad()
def _eval_copy(network: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(network).float().cpu().eval()


def receptive_field(network: nn.Module, image_size: int, pixels: Sequence[tuple[int, int]],
                    in_chans: int | None = None, seed: int = 0) -> torch.Tensor:
    """Which input pixels each output pixel of ``pixels`` (y, x) depends on: (len(pixels), H, W) bool.

    Measured, not derived: the gradient of the output logits at a pixel with respect to a random
    input, in eval mode (BatchNorm then mixes no pixels). A zero gradient at an input pixel means
    the network has no path from it, whatever the weights; random weights and inputs make an
    accidental zero on a path vanishingly unlikely.
    """
    model = _eval_copy(network)
    in_chans = in_chans or getattr(model, "in_chans", 3)
    generator = torch.Generator().manual_seed(seed)
    result = []
    for y, x in pixels:
        image = torch.randn(1, in_chans, image_size, image_size, generator=generator).requires_grad_(True)
        logits = model(image)
        # A sum of squares: a plain sum of the logits can cancel under a softmax-invariant head.
        logits[0, :, y, x].pow(2).sum().backward()
        result.append(image.grad[0].abs().sum(0) > 0)
    return torch.stack(result)
