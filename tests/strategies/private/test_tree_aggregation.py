"""Tree aggregation: the noise of every prefix sum, against a slow reference that keeps the whole tree."""

from __future__ import annotations

import math

import numpy as np
import pytest

from strategies.private.mechanisms import insecure_seeded_generator
from strategies.private.tree_aggregation import TreeNoise, tree_depth


def reference_prefix_noise(steps: int, size: int, std: float, seed: int) -> list[np.ndarray]:
    """Every node of the tree, drawn in the order their last leaf arrives (node ``(l, j)`` covers
    leaves ``[j 2^l, (j + 1) 2^l)`` and is complete at leaf ``(j + 1) 2^l - 1``), then each prefix
    ``[0, t + 1)`` as the sum of the nodes of its dyadic decomposition, from the largest down."""
    rng = insecure_seeded_generator(seed)
    nodes: dict[tuple[int, int], np.ndarray] = {}
    out = []
    for t in range(steps):
        level = max(lv for lv in range(t.bit_length() + 1) if (t + 1) % 2**lv == 0)  # the node leaf t completes
        nodes[(level, (t + 1) // 2**level - 1)] = rng.standard_normal(size, dtype=np.float32) * np.float32(std)
        total = np.zeros(size, np.float64)
        start = 0
        for level in reversed(range((t + 1).bit_length())):
            if (t + 1) >> level & 1:
                total += nodes[(level, start // 2**level)]
                start += 2**level
        assert start == t + 1
        out.append(total.astype(np.float32))
    return out


def test_prefix_noise_equals_the_sum_of_the_tree_nodes_of_each_prefix():
    steps, size, std = 37, 5, 0.7
    tree = TreeNoise(size, std, insecure_seeded_generator(3))
    fast = [tree.next() for _ in range(steps)]
    for t, (got, want) in enumerate(zip(fast, reference_prefix_noise(steps, size, std, 3))):
        np.testing.assert_array_equal(got, want, err_msg=f"prefix {t}")
        assert tree.steps == steps


def test_memory_is_one_noise_vector_per_set_bit_of_the_step_count():
    tree = TreeNoise(3, 1.0, insecure_seeded_generator(0))
    for t in range(1, 300):
        tree.next()
        assert tree.levels == [level for level in range(t.bit_length()) if t >> level & 1]
        assert len(tree.state_dict()["nodes"]) <= math.floor(math.log2(t)) + 1


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 8])
def test_prefix_noise_variance_is_popcount_times_sigma_squared(steps):
    std = 2.0
    tree = TreeNoise(200_000, std, insecure_seeded_generator(steps))
    for _ in range(steps):
        noise = tree.next()
    nodes = bin(steps).count("1")
    assert np.var(noise.astype(np.float64)) == pytest.approx(nodes * std**2, rel=0.02)


def test_restart_begins_a_new_tree_with_fresh_noise():
    tree = TreeNoise(100_000, 1.0, insecure_seeded_generator(5))
    before = [tree.next() for _ in range(3)]
    tree.restart()
    assert tree.steps == 0 and tree.levels == [] and not tree.noise().any()
    after = tree.next()
    assert tree.levels == [0]
    assert np.var(after) == pytest.approx(1.0, rel=0.02)  # one node, not the three of prefix 3
    assert abs(np.corrcoef(after, before[-1])[0, 1]) < 0.02  # independent of the old tree


def test_state_round_trip_continues_the_same_tree():
    a = TreeNoise(4, 1.0, insecure_seeded_generator(9))
    for _ in range(5):
        a.next()
    b = TreeNoise(4, 1.0, insecure_seeded_generator(0))
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(b.noise(), a.noise())
    b.rng = insecure_seeded_generator(1)
    a.rng = insecure_seeded_generator(1)
    np.testing.assert_array_equal(b.next(), a.next())  # prefix 5: node (1, 2) is new, node (2, 0) is kept


def test_a_state_whose_levels_do_not_match_its_steps_is_refused():
    tree = TreeNoise(2, 1.0, insecure_seeded_generator(0))
    with pytest.raises(ValueError, match=r"levels \[0\] are not the set bits of steps = 2"):
        tree.load_state_dict({"steps": 2, "levels": [0], "nodes": np.zeros((1, 2), np.float32)})
    with pytest.raises(ValueError, match="nodes of size 3, the model has 2"):
        tree.load_state_dict({"steps": 1, "levels": [0], "nodes": np.zeros((1, 3), np.float32)})


def test_tree_depth_is_dp_accountings():
    assert [tree_depth(t) for t in (1, 2, 3, 4, 7, 8, 1023, 1024)] == [1, 2, 2, 3, 3, 4, 10, 11]
