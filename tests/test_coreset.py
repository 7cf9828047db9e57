import pytest
import torch

from anomalygpt.coreset import greedy_coreset


def test_greedy_coreset_picks_the_farthest_point_each_time():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 6.0], [10.0, 10.0], [5.0, 5.1]])
    # From (0, 0): (10, 10) is farthest (14.1); then (10, 0) (10 from both); then (5, 5.1) (7.0 from (0, 0));
    # then (0, 6) (5.08 from (5, 5.1)); (1, 0) last (1 from (0, 0)).
    for block in (1, 2, 4, 4096):
        assert greedy_coreset(points, 6, first=0, block=block).tolist() == [0, 4, 2, 5, 3, 1]
    # From (1, 0): (10, 10) at 13.5; then (10, 0), 9 from (1, 0) against 6.5 for (5, 5.1) and 6.1 for (0, 6).
    assert greedy_coreset(points, 3, first=1, block=2).tolist() == [1, 4, 2]


def naive_greedy(points: torch.Tensor, n_select: int, first: int) -> list[int]:
    chosen, nearest = [first], (points - points[first]).norm(dim=1)
    for _ in range(n_select - 1):
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, (points - points[chosen[-1]]).norm(dim=1))
    return chosen


@pytest.mark.parametrize("block", [7, 64, 1000])
def test_lazy_greedy_coreset_equals_the_plain_algorithm(block):
    points = torch.randn(600, 16, generator=torch.Generator().manual_seed(3))
    assert greedy_coreset(points, 60, first=5, block=block).tolist() == naive_greedy(points, 60, first=5)
