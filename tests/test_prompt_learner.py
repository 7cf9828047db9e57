"""PromptLearner and ImageProjection: widths from the caller, cell order, map normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalygpt.prompt_learner import ImageProjection, PromptLearner, PromptLearnerConfig, normalised_map


@pytest.mark.parametrize(("hidden", "grid", "base"), [(32, 3, 9), (48, 2, 5), (20, 1, 0)])
def test_prompt_shapes_follow_the_config_and_the_hidden_size(hidden: int, grid: int, base: int) -> None:
    cfg = PromptLearnerConfig(grid=grid, base_prompts=base, map_size=32, channels=(4, 8))
    learner = PromptLearner(cfg, hidden)
    prompts = learner(torch.rand(3, 1, 32, 32))
    assert prompts.shape == (3, grid * grid + base, hidden) == (3, learner.n_tokens, hidden)
    assert cfg.n_tokens == grid * grid + base
    # the base prompts are the same learned vectors for every image
    assert torch.equal(prompts[0, grid * grid :], prompts[2, grid * grid :])
    assert torch.equal(prompts[1, grid * grid :], learner.base)


def test_default_config_gives_nine_map_and_nine_base_prompts() -> None:
    cfg = PromptLearnerConfig()
    assert (cfg.grid, cfg.base_prompts, cfg.n_tokens) == (3, 9, 18)


def test_map_prompts_are_row_major_cells_top_left_first() -> None:
    torch.manual_seed(0)
    learner = PromptLearner(PromptLearnerConfig(), hidden_size=16).eval()
    flat = torch.zeros(1, 1, 96, 96)
    spot = flat.clone()
    spot[..., 80:90, 80:90] = 5.0  # deep inside the bottom-right cell, beyond the convs' reach of other cells
    with torch.no_grad():
        before, after = learner(flat)[0], learner(spot)[0]
    changed = [i for i in range(18) if not torch.allclose(before[i], after[i])]
    assert changed == [8]  # cell (row 2, column 2) = "bottom right"; base prompts untouched


def test_image_projection_gives_one_token_at_the_llm_width() -> None:
    projection = ImageProjection(embed_dim=40, hidden_size=24)
    embedding = torch.rand(5, 40)
    tokens = projection(embedding)
    assert tokens.shape == (5, 1, 24)
    expected = embedding @ projection.linear.weight.T + projection.linear.bias
    assert torch.allclose(tokens[:, 0], expected, atol=1e-6)


def test_normalised_map_puts_normal_mean_at_0_and_threshold_at_1() -> None:
    cfg = PromptLearnerConfig(map_size=8, clip=4.0)
    mean, threshold = 0.2, 0.7
    pattern = np.zeros((64, 64), np.float32)
    pattern[:, 32:] = 1.0  # right half at the threshold, left half at the normal mean
    values = normalised_map(mean + (threshold - mean) * pattern, mean, threshold, cfg)
    assert values.shape == (1, 8, 8) and values.dtype == torch.float32
    assert torch.allclose(values[0, :, :3], torch.zeros(8, 3), atol=1e-6)
    assert torch.allclose(values[0, :, 5:], torch.ones(8, 3), atol=1e-6)
    far = normalised_map(np.full((16, 16), 100.0, np.float32), mean, threshold, cfg)
    assert torch.all(far == 4.0)  # clipped at cfg.clip
    below = normalised_map(np.full((16, 16), -100.0, np.float32), mean, threshold, cfg)
    assert torch.all(below == -4.0)


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="grid >= 1"):
        PromptLearner(PromptLearnerConfig(grid=0), 8)
    with pytest.raises(ValueError, match="conv widths"):
        PromptLearner(PromptLearnerConfig(channels=()), 8)
