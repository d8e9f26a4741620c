"""Generation modes are objects chosen from one registry: the config's mode names are the registry's, and
what each mode says of itself drives the checks that used to compare mode names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dreamshard.config import MODES, GenerateConfig
from dreamshard.engine.conditioned import check_settings
from dreamshard.engine.modes import REGISTRY, mode_for
from dreamshard.errors import UserError

PACKAGE = Path(__file__).resolve().parents[1] / "dreamshard"


def test_the_config_accepts_exactly_the_registered_modes():
    assert set(MODES) == set(REGISTRY)
    assert all(mode.name == name for name, mode in REGISTRY.items())
    with pytest.raises(UserError, match="unknown generation mode 'inpaint'; choose one of txt2img, img2img"):
        mode_for("inpaint")


def test_what_each_mode_says_of_itself():
    table = {name: (mode.keeps_label, mode.needs_strength, mode.supports_inversion, mode.loads_depth, mode.shows_label_map) for name, mode in REGISTRY.items()}
    assert table == {
        "txt2img": (False, False, False, False, False),
        "img2img": (True, True, True, False, False),
        "controlnet_seg": (True, False, True, False, True),
        "depth2img": (True, True, False, True, False),
    }


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"mode": "txt2img", "prompts": {"pair_items_with": "domain", "styles": {"domain": ["a"]}}},
            "needs a conditioned mode (img2img, controlnet_seg, depth2img)",
        ),
        (
            {"mode": "depth2img", "condition": {"init_noise": "stochastic_inversion", "strength": 0.5}},
            "works in modes img2img and controlnet_seg, not depth2img",
        ),
        ({"mode": "controlnet_seg"}, "needs model.controlnet"),
        ({"mode": "img2img"}, "mode img2img needs condition.strength"),
    ],
)
def test_settings_a_mode_needs_are_checked_from_the_mode_object(settings, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_settings(GenerateConfig.model_validate(settings))


def test_no_mode_name_is_compared_outside_the_registry():
    """Adding a mode is one module in engine/modes plus one registry line: no other code branches on a mode's
    name (a string literal compared with ==, !=, in or not in)."""
    names = set(MODES)
    found = []
    for path in PACKAGE.rglob("*.py"):
        if "modes" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                constants = [c for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in names]
                found += [f"{path.relative_to(PACKAGE)}:{node.lineno}" for _ in constants]
    assert not found, found
