"""CLOUDS' pieces: SAM refinement of pseudo-labels (components, prompts, the kept masks, the merge) on crafted
labels with a real tiny SAM, and the CLOUDS step (warm-up, EMA teacher head every ema_every iterations)."""

from __future__ import annotations

import pytest
import torch

from dreamshard.config import CLOUDSConfig, SAMConfig, TrainModelConfig, UDAConfig
from dreamshard.trainer.methods import CLOUDS, Gradients
from dreamshard.trainer.model import Segmenter
from dreamshard.trainer.sam import SAMRefiner, connected_components, merge_masks, prompts_for


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    from dreamshard.engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "sam", "tiny-sam")


def crafted_label() -> torch.Tensor:
    """20x20: class 1 in a 6x6 block and a 2x2 block, class 2 in a 5x4 block, 255 in a corner, 0 elsewhere."""
    label = torch.zeros(20, 20, dtype=torch.long)
    label[1:7, 1:7] = 1  # 36 px
    label[10:12, 10:12] = 1  # 4 px: below min_area
    label[12:17, 2:6] = 2  # 20 px
    label[17:, 17:] = 255
    return label


def test_components_are_4_connected():
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[0, 0] = mask[1, 1] = True  # touching diagonally only: two components
    mask[3:6, 2] = mask[5, 2:5] = mask[3:6, 4] = True  # a U: one component
    components = connected_components(mask)
    assert components[0, 0] != components[1, 1] and (components[~mask] == 0).all()
    assert len(torch.unique(components[3:6, 2:5][mask[3:6, 2:5]])) == 1 and len(torch.unique(components[mask])) == 3


def test_prompts_take_random_points_inside_each_large_component():
    label = crafted_label()
    prompts = prompts_for(label, min_area=10, points=5, generator=torch.Generator().manual_seed(0))
    assert sorted(cls for cls, _ in prompts) == [0, 1, 2]  # the background (0) is a class too; not the 4-pixel block
    for cls, points in prompts:
        assert points.shape == (5, 2) and len({tuple(p) for p in points.tolist()}) == 5  # without replacement
        assert all(label[y, x] == cls for x, y in points.tolist())  # (x, y) inside the class
    in_block = [points for cls, points in prompts if cls == 1][0]
    assert all(1 <= x < 7 and 1 <= y < 7 for x, y in in_block.tolist())  # the large block, never the small one


def test_merge_paints_classes_drops_overlaps_and_ignores_the_rest():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2, :3] = True
    masks[1, :2, 2:] = True  # overlaps mask 0 in column 2
    merged = merge_masks(masks, [5, 7])
    assert merged[:2, :2].eq(5).all() and merged[:2, 3].eq(7).all() and merged[:2, 2].eq(255).all() and merged[2:].eq(255).all()
    assert merge_masks(masks, [5, 7], remove_overlaps=False)[:2, 2].eq(7).all()  # the later prompt wins without the rule


def test_sam_refinement_keeps_the_best_rated_mask_per_component(tiny_sam):
    refiner = SAMRefiner(SAMConfig(model=str(tiny_sam), min_area=10, points=5), torch.device("cpu"))
    torch.manual_seed(0)
    image, label = torch.rand(3, 20, 20), crafted_label()
    refined = refiner.refine(image[None], label[None], torch.Generator().manual_seed(3))[0]
    # the same prompts (same generator seed), SAM called directly: the mask with the highest predicted IoU each
    prompts = prompts_for(label, 10, 5, torch.Generator().manual_seed(3))
    pixels = (image * 255).round().byte().permute(1, 2, 0).numpy()
    inputs = refiner.processor(images=pixels, input_points=[[p.tolist() for _, p in prompts]], return_tensors="pt")
    with torch.no_grad():
        out = refiner.model(**inputs, multimask_output=True)
    masks = refiner.processor.image_processor.post_process_masks(out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]
    best = masks[torch.arange(len(prompts)), out.iou_scores[0].argmax(1)]
    assert torch.equal(refined, merge_masks(best, [cls for cls, _ in prompts]))
    assert set(torch.unique(refined).tolist()) <= {cls for cls, _ in prompts} | {255}


def test_an_image_without_large_components_keeps_the_teachers_label(tiny_sam):
    refiner = SAMRefiner(SAMConfig(model=str(tiny_sam), min_area=1000), torch.device("cpu"))
    label = crafted_label()
    assert torch.equal(refiner.refine(torch.rand(1, 3, 20, 20), label[None], torch.Generator())[0], label)


def test_a_missing_sam_model_is_one_line():
    from dreamshard.errors import UserError

    with pytest.raises(UserError, match="clouds.sam.model /nowhere/sam: cannot load a SAM model"):
        SAMRefiner(SAMConfig(model="/nowhere/sam"), torch.device("cpu"))


def test_clouds_warms_up_on_the_source_then_trains_on_teacher_labels_with_a_slow_ema():
    torch.manual_seed(0)
    model = Segmenter(TrainModelConfig(backbone="test_resnet", pretrained="none", decoder="segformer", embed_dim=16, num_classes=4, freeze_backbone=True))
    assert all(not p.requires_grad for p in model.backbone.parameters()) and not model.train().backbone.training  # frozen, statistics kept
    method = CLOUDS(model, CLOUDSConfig(warmup_iters=2, ema_every=3, ema_alpha=0.5), UDAConfig(), torch.device("cpu"), seed=0)
    batch = {"source_image": torch.rand(2, 3, 32, 32), "source_label": torch.randint(0, 4, (2, 32, 32)), "target_image": torch.rand(2, 3, 32, 32)}

    def teacher() -> list[torch.Tensor]:
        return [p.detach().clone() for p in method.teacher_head.parameters()]

    for iteration in range(6):
        before = teacher()
        student = [p.detach().clone() for p in model.decode_head.parameters()]
        method.begin_iteration(iteration)
        if iteration in (1, 2, 4, 5):  # not a multiple of ema_every: the teacher stays
            assert all(torch.equal(a, b) for a, b in zip(before, teacher()))
        elif iteration == 3:  # an EMA step at alpha 0.5: halfway to the student's head
            assert all(torch.allclose(b, (a + s) / 2) for a, b, s in zip(before, teacher(), student))
        else:  # iteration 0: a copy
            assert all(torch.equal(b, s) for b, s in zip(teacher(), student))
        grads = Gradients(model)
        logs = method.step(batch, grads)
        assert grads.passes == (1 if iteration < 2 else 2) and ("loss_target" in logs) == (iteration >= 2)
        with torch.no_grad():  # what an optimiser step would do: move the student's head
            for p in model.decode_head.parameters():
                p.add_(0.1)
