"""Pseudo-label refinement with the Segment Anything Model, CLOUDS' rule (yasserben/CLOUDS `clouds.py`,
`my_utils/mask_utils.py`): for each class of a teacher's pseudo-label, each 4-connected component larger
than `min_area` pixels becomes one SAM prompt of `points` random positive points inside it; SAM answers three
masks per prompt and the one with the highest predicted IoU is kept; pixels claimed by more than one kept
mask are dropped from all of them (`remove_overlaps`); the refined label is each kept mask painted with its
component's class. An image with no component above `min_area` keeps the teacher's label unchanged.

Differences from CLOUDS' code: SAM comes from `transformers` (SamModel, e.g. facebook/sam-vit-base or -huge in
the Hugging Face cache, or a local directory; the `tiny-sam` preset in tests) where CLOUDS defaults to
MobileSAM (vit_t); pixels no kept mask covers are `ignore` (255) for the per-pixel cross-entropy here, where
CLOUDS' set-based Mask2Former loss counts them as negatives of every matched query."""

from __future__ import annotations

from pathlib import Path

import torch

from dreamshard.config import SAMConfig
from dreamshard.datasets.labels import IGNORE_INDEX
from dreamshard.errors import UserError, one_line


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) bool → (H, W) int64: 0 outside the mask, and one id per 4-connected component (the largest flat
    index + 1 of its pixels). Max-propagation to the four neighbours with pointer jumping, on any device."""
    h, w = mask.shape
    labels = torch.arange(1, h * w + 1, device=mask.device).view(h, w) * mask
    while True:
        grown = labels.clone()
        grown[1:] = torch.maximum(grown[1:], labels[:-1])
        grown[:-1] = torch.maximum(grown[:-1], labels[1:])
        grown[:, 1:] = torch.maximum(grown[:, 1:], labels[:, :-1])
        grown[:, :-1] = torch.maximum(grown[:, :-1], labels[:, 1:])
        grown = grown * mask
        flat = grown.view(-1)
        jumped = torch.where(mask, flat[(grown - 1).clamp(min=0)].view(h, w), grown)  # an id is a pixel of its component
        grown = torch.maximum(grown, jumped)
        if torch.equal(grown, labels):
            return labels
        labels = grown


def prompts_for(label: torch.Tensor, min_area: int, points: int, generator: torch.Generator) -> list[tuple[int, torch.Tensor]]:
    """(class, (points, 2) xy points) per component of more than `min_area` pixels, the points drawn
    uniformly without replacement from its pixels (all of them when it has fewer)."""
    found = []
    for cls in torch.unique(label).tolist():
        if cls == IGNORE_INDEX:
            continue
        components = connected_components(label == cls)
        ids, areas = torch.unique(components[components > 0], return_counts=True)
        for component in ids[areas > min_area].tolist():
            ys, xs = torch.nonzero(components == component, as_tuple=True)
            chosen = torch.randperm(len(ys), generator=generator)[:points].to(ys.device)
            found.append((cls, torch.stack([xs[chosen], ys[chosen]], dim=1)))
    return found


def merge_masks(masks: torch.Tensor, classes: list[int], remove_overlaps: bool = True) -> torch.Tensor:
    """(P, H, W) bool kept masks and their classes → the refined (H, W) label: each mask painted with its
    class, pixels of more than one mask dropped (with `remove_overlaps`; else the later prompt wins), 255
    where no mask is."""
    if remove_overlaps:
        masks = masks & (masks.sum(0, keepdim=True) == 1)
    refined = torch.full(masks.shape[1:], IGNORE_INDEX, dtype=torch.long, device=masks.device)
    for mask, cls in zip(masks, classes):
        refined[mask] = cls
    return refined


class SAMRefiner:
    """A SAM model and processor, loaded once; `refine` applies CLOUDS' rule to a batch of pseudo-labels."""

    def __init__(self, config: SAMConfig, device: torch.device):
        from transformers import SamModel, SamProcessor

        self.config, self.device = config, device
        source = str(Path(config.model).expanduser()) if Path(config.model).expanduser().exists() else config.model
        try:
            self.model = SamModel.from_pretrained(source, local_files_only=config.local_files_only).to(device).eval()
            self.processor = SamProcessor.from_pretrained(source, local_files_only=config.local_files_only)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"clouds.sam.model {config.model}: cannot load a SAM model and processor ({one_line(exc, limit=160)}); give a transformers SAM directory "
                "or a hub id in the Hugging Face cache (e.g. facebook/sam-vit-base), or `none` to skip the refinement"
            ) from None
        for param in self.model.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def refine(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1], labels (B, H, W) → refined labels (B, H, W)."""
        return torch.stack([self.refine_one(image, label, generator) for image, label in zip(images, labels)])

    def refine_one(self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        prompts = prompts_for(label, self.config.min_area, self.config.points, generator)
        if not prompts:
            return label
        pixels = (image.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        points = [[point.tolist() for _, point in prompts]]  # one image, one prompt of several points per component
        inputs = self.processor(images=pixels, input_points=points, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs, multimask_output=True)
        masks = self.processor.image_processor.post_process_masks(
            outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
        )[0]
        best = outputs.iou_scores[0].argmax(dim=1).cpu()  # per prompt, the mask SAM rates highest
        kept = masks[torch.arange(len(prompts)), best].to(label.device)
        return merge_masks(kept, [cls for cls, _ in prompts], self.config.remove_overlaps)
