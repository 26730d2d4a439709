"""Training losses, one family for all seven models so their comparison is fair.

Every model is trained with binary cross-entropy with logits (one output channel, binary target) or
cross-entropy (K + 1 channels, multi-class), as the paper trains OSS-Net: on sampled locations for the
occupancy networks, on every voxel for the U-Nets (no Dice term, which would give the baselines an
objective the occupancy networks do not get). OSS-Net C / D add the same loss for their auxiliary head
against the label max-pooled to the latent grid, weighted by AUX_WEIGHT.
"""

import torch
import torch.nn.functional as F
from torch import nn

# Weight of the auxiliary low-resolution loss (the authors' train script default).
AUX_WEIGHT = 0.1


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean loss of logits (B, K, ...) against class maps targets (B, ...) with values 0..K-1 (0..1 if K = 1).

    K = 1: BCE with logits of channel 0 against targets > 0; K > 1: cross-entropy over the K channels.
    The trailing axes are locations (N) or voxels (X, Y[, Z]).
    """
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0].float(), (targets > 0).float())
    return F.cross_entropy(logits.float(), targets.long())


def downscale_label(label: torch.Tensor, num_classes: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """The auxiliary head's target: label (X, Y, Z) class map 0..K -> (num_classes, *grid) float.

    A cell holds a class if any of its voxels does (adaptive max-pooling). Binary (num_classes 1): the
    one channel is label > 0 pooled. Multi-class (num_classes = K + 1): the classes present in the cell
    (background: none of the foreground classes), each with weight 1 / their number, the target
    distribution of a softmax head, which is how guided inference reads the head.
    """
    if num_classes == 1:
        return F.adaptive_max_pool3d((label > 0).float()[None, None], grid)[0]
    present = label[None] == torch.arange(1, num_classes, device=label.device)[:, None, None, None]
    pooled = F.adaptive_max_pool3d(present.float()[None], grid)[0]
    classes = torch.cat([1 - pooled.amax(0, keepdim=True), pooled])
    return classes / classes.sum(0, keepdim=True)


def aux_loss(aux_logits: torch.Tensor, aux_targets: torch.Tensor) -> torch.Tensor:
    """Loss of the auxiliary head (B, num_classes, *grid) against `downscale_label` targets: BCE with
    logits for one channel, cross-entropy with probability targets for several."""
    if aux_logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(aux_logits.float(), aux_targets.float())
    return F.cross_entropy(aux_logits.float(), aux_targets.float())


def step_losses(model: nn.Module, batch: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Forward one batch -> (segmentation loss, auxiliary loss or None, supervised locations / voxels)."""
    if "coords" in batch:
        logits, latents = model(batch["global_volume"], batch["coords"], batch.get("patches"))
        main = segmentation_loss(logits.transpose(1, 2), batch["targets"])
        aux = None if latents.aux_logits is None else aux_loss(latents.aux_logits, batch["aux_targets"])
        return main, aux, batch["targets"].numel()
    return segmentation_loss(model(batch["volume"]), batch["label"]), None, batch["label"].numel()
