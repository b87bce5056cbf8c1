"""Print the built-in FasterViT variants with their configurations and parameter counts."""

from __future__ import annotations

import torch

from fvlab.models.factory import create_model
from fvlab.models.fastervit import VARIANTS


def variant_table() -> str:
    """One line per variant: name, parameters (M), dims, depths, heads, window, carrier tokens."""
    lines = [f"{'variant':<16} {'params (M)':>10}  {'dim':>4}  {'depths':<14} {'heads':<15} "
             f"{'window':<7} {'ct_size':<8} {'hat stages'}"]
    for name, cfg in VARIANTS.items():
        with torch.device("meta"):  # FasterViT-6 has 1.36 B parameters: count without allocating
            model = create_model(name)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        hat_stages = [i + 1 for i, c in enumerate(model.ct_size) if c]
        lines.append(f"{name:<16} {params:>10.2f}  {cfg['dim']:>4}  {str(cfg['depths']):<14} "
                     f"{str(cfg['num_heads']):<15} {str(cfg['window_size']):<7} "
                     f"{str(cfg['ct_size']):<8} {hat_stages}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(variant_table())
