"""Unit tests of the trainer's parts on small real tensors: metrics, the DACS pieces, the model, the schedule."""

from __future__ import annotations

import math

import pytest
import torch

from dreamshard.config import TrainModelConfig, UDAConfig
from dreamshard.datasets.labels import SYNTHIA16
from dreamshard.trainer.loop import lr_factor
from dreamshard.trainer.methods import DACS, Gradients, class_mix_masks, downscale_labels, mask_blocks, strong_augment, weighted_ce
from dreamshard.trainer.metrics import confusion_metric, per_class_iou, summarize
from dreamshard.trainer.model import Segmenter, head_parameter_groups


def test_iou_from_torchmetrics_confmat_ignores_255_and_skips_absent_classes():
    metric = confusion_metric(3)
    target = torch.tensor([[0, 0, 1, 1, 255, 255]])
    preds = torch.tensor([[0, 1, 1, 1, 2, 0]])  # the two 255 pixels must not count, whatever is predicted
    metric.update(preds, target)
    confmat = metric.compute()
    assert confmat.sum() == 4
    iou = per_class_iou(confmat)
    assert iou[0].item() == pytest.approx(1 / 2)  # tp 1, fp 0, fn 1
    assert iou[1].item() == pytest.approx(2 / 3)  # tp 2, fp 1, fn 0
    assert math.isnan(iou[2].item())  # absent from prediction and ground truth (after ignoring)
    summary = summarize(confmat, ["a", "b", "c"])
    assert summary["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)  # percent; not divided by 3
    assert summary["aAcc"] == pytest.approx(75.0)
    assert summary["per_class"]["c"]["iou"] is None


def test_miou16_averages_the_synthia_classes_only():
    confmat = torch.zeros(19, 19, dtype=torch.long)
    for c in range(19):
        confmat[c, c] = 10
    for c in (9, 14, 16):  # the three classes SYNTHIA lacks: all wrong
        confmat[c, c] = 0
        confmat[c, 0] = 10
    summary = summarize(confmat, [f"c{i}" for i in range(19)])
    iou = per_class_iou(confmat)
    assert summary["mIoU16"] == pytest.approx(100 * iou[list(SYNTHIA16)].mean().item())
    assert summary["mIoU"] < summary["mIoU16"]


def test_class_mix_takes_half_of_each_images_classes_rounded_up_and_never_ignore():
    torch.manual_seed(0)
    labels = torch.tensor([[0, 1, 2, 255] * 4, [3, 3, 255, 255] * 4]).view(2, 4, 4)
    for _ in range(20):
        masks = class_mix_masks(labels)
        chosen0 = labels[0][masks[0].bool()].unique().tolist()
        chosen1 = labels[1][masks[1].bool()].unique().tolist()
        assert len(chosen0) == 2 and 255 not in chosen0  # ceil(3 / 2)
        assert chosen1 == [3]
        assert not masks[0][labels[0] == 255].any()


def test_pseudo_label_quality_weight_and_ignore_margins():
    model = Segmenter(TrainModelConfig(backbone="test_resnet", pretrained="none", decoder="segformer", embed_dim=16, num_classes=4))
    dacs = DACS(model, UDAConfig(pseudo_threshold=0.0, ignore_top=2, ignore_bottom=3), num_classes=4)
    label, weight, quality = dacs.pseudo_label(torch.rand(2, 3, 32, 32))
    assert label.shape == (2, 32, 32) and label.max() < 4
    assert quality == 1.0  # every pixel reaches a 0.0 threshold
    assert (weight[:, :2] == 0).all() and (weight[:, -3:] == 0).all() and (weight[:, 2:-3] == 1).all()
    dacs.config.pseudo_threshold = 1.01  # nothing is that confident: q = 0, and the hard mask is all zero
    _, weight, quality = dacs.pseudo_label(torch.rand(2, 3, 32, 32))
    assert quality == 0.0 and weight.sum() == 0


def test_ema_teacher_copies_then_follows_alpha_t():
    model = Segmenter(TrainModelConfig(backbone="test_resnet", pretrained="none", decoder="segformer", embed_dim=16, num_classes=4))
    dacs = DACS(model, UDAConfig(alpha=0.999), num_classes=4)
    student_param = next(model.parameters())
    with torch.no_grad():
        student_param.add_(1.0)
    dacs.begin_iteration(0)  # iteration 0: exact copy
    teacher_param = next(dacs.teacher.parameters())
    assert torch.equal(teacher_param, student_param)
    before = teacher_param.clone()
    with torch.no_grad():
        student_param.add_(2.0)
    dacs.begin_iteration(1)  # alpha_1 = min(1 - 1/2, 0.999) = 0.5
    assert torch.allclose(teacher_param, 0.5 * before + 0.5 * student_param)
    assert not teacher_param.requires_grad


def test_weighted_ce_counts_ignored_pixels_in_the_mean():
    logits = torch.zeros(1, 2, 2, 2)
    labels = torch.tensor([[[0, 1], [255, 255]]])
    loss = weighted_ce(logits, labels, torch.ones(1, 2, 2))
    assert loss.item() == pytest.approx(math.log(2) * 2 / 4)


def test_strong_augment_and_masking_keep_shape_and_range():
    torch.manual_seed(1)
    images = torch.rand(3, 3, 40, 40)
    out = strong_augment(images, UDAConfig(color_jitter_p=1.0))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, images)
    fill = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    masked = mask_blocks(images, ratio=0.7, block=8, fill=fill)
    kept = (masked == images).all(dim=1).float().mean().item()
    assert 0.05 < kept < 0.6  # about 30% of the blocks stay visible


def test_strong_augment_has_daformers_kornia_semantics_by_hand():
    """kornia 0.5.8 as DAFormer uses it: brightness adds (b - 1), contrast multiplies (no mean), the order is
    drawn, hue turns by a fraction of the colour circle, saturation scales HSV's S; the blur kernel is
    ceil(0.1 d), one less when even."""
    from dreamshard.trainer.methods import blur_kernel_size, jitter

    grey = torch.full((3, 2, 2), 0.5)
    assert torch.allclose(jitter(grey, (1.1, 1.0, 1.0, 0.0), [0]), torch.full_like(grey, 0.6))  # torchvision: 0.55
    assert torch.allclose(jitter(grey, (1.1, 1.2, 1.0, 0.0), [0, 1]), torch.full_like(grey, 0.72))
    assert torch.allclose(jitter(grey, (1.1, 1.2, 1.0, 0.0), [1, 0]), torch.full_like(grey, 0.7))
    assert torch.allclose(jitter(torch.full((3, 1, 1), 0.9), (1.0, 1.2, 1.0, 0.0), [1]), torch.ones(3, 1, 1))  # clamped
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    assert torch.allclose(jitter(red, (1.0, 1.0, 1.0, 0.5), [3]), torch.tensor([0.0, 1.0, 1.0]).view(3, 1, 1), atol=1e-5)  # half a turn: cyan
    assert torch.allclose(jitter(red, (1.0, 1.0, 0.0, 0.0), [2]), torch.ones(3, 1, 1), atol=1e-5)  # no saturation: V grey
    assert [blur_kernel_size(d) for d in (512, 1024, 64, 40)] == [51, 103, 7, 3]  # ceil: 52 → 51, 103, 7, 4 → 3


def test_downscale_labels_takes_majority_or_ignore():
    labels = torch.tensor([[[1, 1, 2, 3], [1, 1, 255, 255]]])
    small = downscale_labels(labels, 2, 0.75, num_classes=4)
    assert small.tolist() == [[[1, 255]]]


@pytest.mark.parametrize("decoder", ["daformer", "segformer"])
def test_segmenter_outputs_stride4_logits_and_head_gets_10x_lr(decoder):
    model = Segmenter(TrainModelConfig(backbone="test_resnet", pretrained="none", decoder=decoder, embed_dim=16, num_classes=5))
    logits, features = model(torch.rand(2, 3, 64, 64), with_features=True)
    assert logits.shape == (2, 5, 16, 16) and len(features) == 4
    groups = head_parameter_groups(model, lr=1e-3, head_lr_mult=10, weight_decay=0.01)
    head_ids = {id(p) for p in model.decode_head.parameters()}
    for group in groups:
        is_head = id(group["params"][0]) in head_ids
        assert group["lr"] == pytest.approx(1e-2 if is_head else 1e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_decode_head_starts_as_daformers_with_head_init_daformer():
    """Hand-computed spreads: BN-ReLU convs kaiming-normal with fan_out (std √(2 / (out x k x k))), the
    classifier N(0, 0.01), the embeddings PyTorch's default U(±1/√fan_in) (std 1/√(3 fan_in))."""
    torch.manual_seed(0)
    config = TrainModelConfig(backbone="test_resnet", pretrained="none", decoder="daformer", embed_dim=32, num_classes=19, head_init="daformer")
    head = Segmenter(config).decode_head
    fuse = head.fuse[0].weight  # 3x3, 4 x 32 → 32
    assert fuse.std().item() == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.05)
    pointwise = head.aspp[1][1][0].weight  # a separable branch's 1x1: 128 → 32
    assert pointwise.std().item() == pytest.approx(math.sqrt(2 / 32), rel=0.05)
    assert head.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1) and not head.classifier.bias.any()
    embed = head.embed[3].weight  # 1x1 from the last level's channels
    assert embed.std().item() == pytest.approx(1 / math.sqrt(3 * embed.shape[1]), rel=0.1)


def test_lr_warmup_then_poly_decay():
    from dreamshard.config import OptimConfig

    factor = lr_factor(OptimConfig(lr=1e-3, warmup_iters=10, warmup_ratio=1e-6, power=1.0), max_iters=100)
    assert factor(0) == pytest.approx(1e-6, rel=1e-3)
    assert factor(5) < factor(10)
    assert factor(10) == pytest.approx(0.9)
    assert factor(50) == pytest.approx(0.5)
    assert factor(100) == pytest.approx(0.0)


def test_dacs_step_with_fd_and_mic_backpropagates_every_loss():
    torch.manual_seed(0)
    model = Segmenter(TrainModelConfig(backbone="test_resnet", pretrained="none", decoder="daformer", embed_dim=16, num_classes=4))
    config = UDAConfig(fd={"enabled": True, "thing_classes": [2, 3], "scale_min_ratio": 0.5}, mic={"enabled": True, "block_size": 8})
    dacs = DACS(model, config, num_classes=4)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, 32:, :32] = 2
    labels[:, :8] = 255
    batch = {"source_image": torch.rand(2, 3, 64, 64), "source_label": labels, "target_image": torch.rand(2, 3, 64, 64)}
    dacs.begin_iteration(0)
    grads = Gradients(model)
    logs = dacs.step(batch, grads)
    assert set(logs) == {"loss_source", "loss_fd", "loss_mix", "loss_mic", "pseudo_quality"}
    assert all(isinstance(value, torch.Tensor) and value.dim() == 0 for value in logs.values())  # device scalars: no host sync
    assert grads.passes == 3  # source(+FD), mix, MIC: one backward each, before one optimiser step
    assert logs["loss_fd"] >= 0  # the value itself is checked in test_feature_distance_* below
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in dacs.teacher.parameters()) and all(p.grad is None for p in dacs.imnet.parameters())


def test_feature_distance_is_weighted_mean_l2_over_thing_pixels():
    torch.manual_seed(0)
    model = Segmenter(TrainModelConfig(backbone="test_resnet", pretrained="none", decoder="daformer", embed_dim=16, num_classes=4)).eval()
    config = UDAConfig(fd={"enabled": True, "thing_classes": [2], "scale_min_ratio": 0.75, "weight": 0.5})
    dacs = DACS(model, config, num_classes=4)
    images = torch.rand(2, 3, 64, 64)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, 32:, :32] = 2  # a thing region, block-aligned with the stride-32 feature grid
    # The student still equals the frozen copy and both run in eval mode: no distance at all.
    _, features = model(images, with_features=True)
    assert dacs.feature_distance(features[-1], images, labels).item() == 0
    # Moved away from it: λ · mean over thing cells of the L2 norm of the feature difference, by hand.
    with torch.no_grad():
        for param in model.backbone.parameters():
            param.add_(0.05 * torch.randn_like(param))
    _, features = model(images, with_features=True)
    student, frozen = features[-1], dacs.imnet((images - model.mean) / model.std)[-1]
    cells = student.shape[-1]
    thing_cells = labels[:, :: 64 // cells, :: 64 // cells] == 2  # each cell is all-thing or all-background here
    expected = 0.5 * torch.norm(student - frozen, dim=1)[thing_cells].mean()
    assert thing_cells.any() and not thing_cells.all()
    assert dacs.feature_distance(student, images, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    # No thing pixel in the batch: no FD term.
    assert dacs.feature_distance(student, images, torch.zeros_like(labels)).item() == 0


def test_one_gradient_all_reduce_per_dacs_iteration():
    """A DDP communication hook counts the gradient all-reduces (rounds over the buckets; gloo, one rank, in
    this process): a DACS iteration with MIC (three backward passes) over two accumulation micro-steps
    all-reduces once; a step that synced every backward would all-reduce three times per micro-step."""
    import contextlib

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = Segmenter(TrainModelConfig(backbone="test_resnet", pretrained="none", decoder="segformer", embed_dim=16, num_classes=4))
        ddp = DistributedDataParallel(model)
        rounds = []

        def counting(state, bucket):
            if bucket.is_last():  # a round's last bucket: one all-reduce of the whole gradient is done
                rounds.append(bucket.index())
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting)
        labels = torch.randint(0, 4, (2, 32, 32))
        batch = {"source_image": torch.rand(2, 3, 32, 32), "source_label": labels, "target_image": torch.rand(2, 3, 32, 32)}
        dacs = DACS(ddp, UDAConfig(mic={"enabled": True, "block_size": 8}), num_classes=4)
        for iteration in range(3):
            rounds.clear()
            dacs.begin_iteration(iteration)
            for micro in range(2):
                grads = Gradients(ddp, accum=2, last_micro=micro == 1)
                dacs.step(batch, grads)
                assert grads.passes == 3
            assert len(rounds) == 1, iteration

        class SyncEveryPass(Gradients):
            def sync(self, final: bool):
                return contextlib.nullcontext()

        rounds.clear()
        dacs.step(batch, SyncEveryPass(ddp))
        assert len(rounds) == 3  # the counter sees what it should
    finally:
        dist.destroy_process_group()


def test_torchvision_jitter_multiplies_brightness():
    from dreamshard.trainer.methods import torchvision_jitter

    grey = torch.full((3, 2, 2), 0.5)
    assert torch.allclose(torchvision_jitter(grey, (1.1, 1.0, 1.0, 0.0), [0, 1, 2, 3]), torch.full_like(grey, 0.55))


def test_zodi_loss_is_ce_on_both_plus_the_pooled_cosine_of_real_and_twin():
    from dreamshard.config import ZoDiConfig
    from dreamshard.trainer.methods import ZoDi

    torch.manual_seed(0)
    model = Segmenter(TrainModelConfig(backbone="test_resnet", pretrained="none", decoder="deeplabv3plus", embed_dim=16, num_classes=4))
    real, labels = torch.rand(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    twin = torch.rand(2, 3, 32, 32)
    method = ZoDi(model, ZoDiConfig())
    grads = Gradients(model)
    torch.manual_seed(1)  # the head's dropout draws the same masks in both forwards
    logs = method.step({"source_image": real, "source_label": labels, "target_image": twin, "target_label": labels}, grads)
    assert grads.passes == 1 and all(p.grad is not None for p in model.parameters())
    with torch.no_grad():  # by hand: CE over both halves, then ZoDi's pooled, normalised layer4 similarity
        torch.manual_seed(1)
        logits, levels = model(torch.cat([real, twin]), with_features=True)
        ce = weighted_ce(logits, torch.cat([labels, labels]))
        q, z = (torch.nn.functional.normalize(half.mean(dim=(2, 3)), dim=1) for half in levels[-1].chunk(2))
    # BatchNorm in train mode normalises with the batch's statistics: the same batch, the same values
    assert logs["loss_ce"] == pytest.approx(ce.item(), rel=1e-5) and logs["loss_sim"] == pytest.approx(-(q * z).sum(1).mean().item(), rel=1e-5)
    model.eval()  # no dropout: an image and its copy give the same decoder features
    same = ZoDi(model, ZoDiConfig(features="decoder", pool=False)).step({"source_image": real, "source_label": labels, "target_image": real}, Gradients(model))
    assert same["loss_sim"] == pytest.approx(-1.0, abs=1e-5)  # an image and itself: every pixel's cosine is 1


def test_sgd_is_the_optimiser_when_asked(tmp_path):
    from dreamshard.config import TrainConfig
    from dreamshard.trainer.loop import build_state
    from dreamshard.trainer.runtime import runtime

    config = TrainConfig.model_validate(
        {"method": "source_only", "output": {"path": str(tmp_path)}, "data": {"source": {"folder": {"root": str(tmp_path)}}},
         "model": {"backbone": "test_resnet", "pretrained": "none", "decoder": "deeplabv3plus", "num_classes": 4},
         "optim": {"optimizer": "sgd", "momentum": 0.9, "lr": 1e-3, "head_lr_mult": 1, "weight_decay": 1e-4}}
    )  # fmt: skip
    state, _ = build_state(config, runtime(config), tmp_path)
    assert isinstance(state.optimizer, torch.optim.SGD) and {g["momentum"] for g in state.optimizer.param_groups} == {0.9}
    assert {g["initial_lr"] for g in state.optimizer.param_groups} == {1e-3} and {g["weight_decay"] for g in state.optimizer.param_groups} == {1e-4, 0.0}
