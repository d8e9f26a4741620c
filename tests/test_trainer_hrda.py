"""HRDA (trainer/hrda.py) against hand computations: the detail crop's grid, the fusion inside, at the border
of and outside the crop, the loss split, sliding-window inference, the attention head's learning rate, and a
refused grid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dreamshard.config import TrainModelConfig
from dreamshard.errors import UserError
from dreamshard.trainer.hrda import HRDASegmenter, build_segmenter, hrda_loss
from dreamshard.trainer.methods import weighted_ce
from dreamshard.trainer.model import Segmenter, head_parameter_groups


def model(**hrda) -> HRDASegmenter:
    torch.manual_seed(0)
    config = TrainModelConfig(
        backbone="test_resnet", pretrained="none", decoder="segformer", embed_dim=16, num_classes=3, hrda={"enabled": True, "hr_crop_size": (16, 16), **hrda}
    )
    return build_segmenter(config)


def test_detail_crops_sit_on_the_grid_and_never_at_the_last_step():
    hrda = model()
    boxes = {hrda.draw_box(32, 48) for _ in range(200)}
    assert {(top, left) for top, _, left, _ in boxes} == {(t, x) for t in (0, 8) for x in (0, 8, 16, 24)}  # HRDA: randint(0, (margin+1)//8)*8
    assert all(bottom - top == 16 and right - left == 16 for top, bottom, left, right in boxes)


def test_fusion_inside_at_the_border_of_and_outside_the_crop():
    """Context logits c (stride 8), detail logits d (stride 4) in the window rows/cols 8..24 of a 32x32 crop,
    attention a = 0.25: inside the crop a·d + (1-a)·c; the crop's first fine pixel sees 3/4 of a (the mask is
    applied before the bilinear upsampling), the pixel before it 1/4 of a on a zero detail; outside: c."""
    hrda = model(fixed_attention=0.25)
    c, d = 2.0, 10.0
    context = torch.full((1, 3, 4, 4), c)
    attention = torch.full((1, 1, 4, 4), 0.25)
    detail = torch.full((1, 3, 4, 4), d)
    fused = hrda.fuse(context, attention, detail, (8, 24, 8, 24), (32, 32))
    assert fused.shape == (1, 3, 8, 8)
    assert torch.allclose(fused[..., 3:5, 3:5], torch.tensor(0.25 * d + 0.75 * c))
    a = 0.25 * 0.75
    assert torch.allclose(fused[..., 2, 3], torch.tensor(a * d + (1 - a) * c))
    assert torch.allclose(fused[..., 1, 3], torch.tensor((1 - 0.25 * 0.25) * c))
    assert torch.allclose(fused[..., 0, 0], torch.tensor(c))


def test_loss_is_point_nine_fused_plus_point_one_detail_on_its_window():
    hrda = model()
    torch.manual_seed(3)
    images, labels = torch.rand(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    outputs = hrda(images, hr_crop=True)
    fused, detail, box, _ = outputs
    top, bottom, left, right = box.tolist()
    expected = 0.9 * weighted_ce(fused, labels) + 0.1 * weighted_ce(detail, labels[:, top:bottom, left:right])
    assert torch.allclose(hrda_loss(hrda, outputs, labels, None, weighted_ce), expected)
    assert fused.shape == (2, 3, 8, 8) and detail.shape == (2, 3, 4, 4)


def test_inference_averages_overlapping_detail_windows_and_fuses_everywhere():
    hrda = model().eval()
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        detail = hrda.slide_detail(images)
        windows = [hrda.decode_head(hrda.features(images[..., y : y + 16, x : x + 16])) for y in (0, 8, 16) for x in (0, 8, 16)]
        expected = torch.zeros(1, 3, 8, 8)
        count = torch.zeros(1, 1, 8, 8)
        for (y, x), logits in zip([(y, x) for y in (0, 8, 16) for x in (0, 8, 16)], windows):
            expected[..., y // 4 : y // 4 + 4, x // 4 : x // 4 + 4] += logits
            count[..., y // 4 : y // 4 + 4, x // 4 : x // 4 + 4] += 1
        assert torch.allclose(detail, expected / count, atol=1e-5)  # 3 x 3 windows at stride 8
        context_features = hrda.features(hrda.context_input(images))
        context, attention = hrda.decode_head(context_features), torch.sigmoid(hrda.scale_attention(context_features))
        up = lambda t: F.interpolate(t, size=(8, 8), mode="bilinear", align_corners=False)  # noqa: E731
        assert torch.allclose(hrda(images), up(attention) * detail + up((1 - attention) * context), atol=1e-5)


def test_attention_head_learns_at_the_head_rate_and_a_bad_grid_is_refused():
    hrda = model()
    head_ids = {id(p) for name, p in hrda.named_parameters() if name.startswith(("decode_head.", "scale_attention."))}
    for group in head_parameter_groups(hrda, lr=1e-3, head_lr_mult=10, weight_decay=0.01):
        assert group["lr"] == pytest.approx(1e-2 if id(group["params"][0]) in head_ids else 1e-3)
    assert any(name.startswith("scale_attention.") for name, _ in hrda.named_parameters())
    with pytest.raises(UserError, match="stride of 8 pixels.*crop_divisible \\(4\\)"):
        model(crop_divisible=4)
    plain = build_segmenter(TrainModelConfig(backbone="test_resnet", pretrained="none", decoder="segformer", embed_dim=16, num_classes=3))
    assert type(plain) is Segmenter
