"""Pure PyTorch FasterViT, the HAT mechanism, HAT in timm's Swin, a weight-sharing FasterViT supernet:
no Lightning, no Optuna."""

from fvlab.models.checkpoint import (CheckpointMismatchError, UntrustedCheckpointError, read_checkpoint,
                                     trusted_checkpoints)
from fvlab.models.config import ArchConfig
from fvlab.models.factory import create_model, list_variants, load_checkpoint, variant_config
from fvlab.models.fastervit import VARIANTS, FasterViT, checkpoint_filter_fn
from fvlab.models.supernet import FasterViTSupernet, extract_subnet, recalibrate_batchnorm
from fvlab.models.swin import HatSwinTransformer, load_swin_weights

__all__ = ["ArchConfig", "FasterViT", "FasterViTSupernet", "extract_subnet", "recalibrate_batchnorm",
           "HatSwinTransformer", "load_swin_weights", "VARIANTS", "CheckpointMismatchError",
           "UntrustedCheckpointError", "checkpoint_filter_fn", "create_model", "list_variants", "load_checkpoint",
           "read_checkpoint", "trusted_checkpoints", "variant_config"]
