"""The seed's SimpleResNet: exact size, the plain variant, depth and width parameters."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
from torch import nn

from cifar_pipeline.model import SimpleResNet, count_parameters


def additions(model: nn.Module) -> int:
    """How many tensor additions the traced forward pass makes (the shortcut sums)."""
    graph = torch.fx.symbolic_trace(model).graph
    return sum(1 for node in graph.nodes if node.op == "call_function" and node.target in (operator.add, torch.add))


def convolutions(model: nn.Module, kernel: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(m.weight.shape)) for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (kernel, kernel)]


def test_default_model_is_the_seeds_size():
    assert count_parameters(SimpleResNet()) == 175_258


def test_residual_model_adds_one_shortcut_per_block():
    assert additions(SimpleResNet()) == 6
    assert additions(SimpleResNet(blocks_per_stage=(3, 3, 3))) == 9


def test_plain_variant_has_no_shortcuts_and_the_same_convolutions():
    residual, plain = SimpleResNet(residual=True), SimpleResNet(residual=False)
    assert additions(plain) == 0
    assert convolutions(plain, 3) == convolutions(residual, 3)
    assert convolutions(plain, 1) == []  # the projections went with the shortcuts
    assert len(convolutions(residual, 1)) == 2  # where the width doubles: stages 2 and 3
    projection_params = sum(p.numel() for name, p in residual.named_parameters() if "shortcut" in name)
    assert count_parameters(plain) == count_parameters(residual) - projection_params


@pytest.mark.parametrize("blocks, widths, residual", [((1, 1), (8, 16), True), ((3, 3, 3), (16, 32, 64), False)])
def test_depth_and_width_are_parameters(blocks, widths, residual):
    model = SimpleResNet(blocks, widths, residual, num_classes=10).eval()
    assert len(model.stages) == len(blocks)
    assert [len(model.stage(i)) for i in range(len(blocks))] == list(blocks)
    assert model.stage(-1)[-1].conv2.out_channels == widths[-1]
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_mismatched_stages_are_rejected():
    with pytest.raises(ValueError):
        SimpleResNet(blocks_per_stage=(2, 2), widths=(16, 32, 64))
