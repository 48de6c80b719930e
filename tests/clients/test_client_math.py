"""Pure client-side functions: projection, partitions, perturbation, the local CMA-ES loop."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from fed_clients.data import Example
from fed_clients.local_search import cma_seed, local_search
from fed_clients.partition import dirichlet_partition, few_shot, iid_partition, partition, train_val_split
from fed_clients.perturb import corpus_words, perturb_examples
from fed_clients.tasks import TASKS, get_task
from fedbpt_wire.projection import Projection, initial_prompt, initial_token_ids, projection_matrix, projection_std


def test_projection_is_seeded_and_scaled():
    a1 = projection_matrix(7, 50, 4, 32, 0.1)
    np.testing.assert_array_equal(a1, projection_matrix(7, 50, 4, 32, 0.1))
    assert not np.array_equal(a1, projection_matrix(8, 50, 4, 32, 0.1))
    assert a1.shape == (50, 128) and a1.dtype == np.float32
    assert a1.std() == pytest.approx(0.1, rel=0.02)
    # BBT's scale: std_e / (sqrt(d) * sigma0).
    assert projection_std(0.2, 400, 2.0) == pytest.approx(0.2 / (20 * 2.0))
    proj = Projection(3, 400, 5, 64, embedding_std=0.2, sigma0=1.0)
    z = np.random.default_rng(0).standard_normal((3000, 400))
    # A z with the CMA-ES start distribution gives prompt entries about as spread as word embeddings.
    assert (proj(z) - proj.offset).std() == pytest.approx(0.2, rel=0.05)


# Written down once (NumPy 2.4.6, 2025) from `projection_matrix(11, 20, 3, 8, 0.5)`, `initial_prompt(11, 3, 8, 0.02)`
# and `initial_token_ids(11, 5, 50_000)`, printed with float() of each float32. Clients on different machines
# and NumPy versions must draw the same A and P0 from a seed: a change of generator, dtype, draw order or scaling
# changes these numbers.
PINNED_A_FIRST_ROW = [0.08009058237075806, 0.04063282534480095, 0.5450631380081177, 0.40036696195602417]
PINNED_A_LAST_ROW_END = [0.029266513884067535, -0.439483642578125, 0.2892986536026001]
PINNED_A_SUM = 8.425011954881484  # float64 sum of all 20 x 24 entries
PINNED_P0_FIRST = [0.008610944263637066, -0.003961818292737007, 0.01036377064883709, -0.035875629633665085]
PINNED_P0_LAST = [0.015880953520536423, 0.0210155937820673]
PINNED_TOKEN_IDS = [6660, 44866, 34436, 19807, 49919]


def test_projection_and_initial_prompt_match_pinned_values():
    a = projection_matrix(11, 20, 3, 8, 0.5)
    assert a[0, :4].tolist() == PINNED_A_FIRST_ROW
    assert a[19, -3:].tolist() == PINNED_A_LAST_ROW_END
    assert float(a.astype(np.float64).sum()) == pytest.approx(PINNED_A_SUM, rel=1e-12)
    p0 = initial_prompt(11, 3, 8, 0.02)
    assert p0.dtype == np.float32 and p0[0, :4].tolist() == PINNED_P0_FIRST and p0[2, -2:].tolist() == PINNED_P0_LAST
    assert initial_token_ids(11, 5, 50_000).tolist() == PINNED_TOKEN_IDS


def test_projection_is_p0_plus_a_z_computed_from_scratch():
    """P = P0 + A z, with A and P0 drawn here straight from PCG64 streams of the seed, not through the module."""
    d, L, D, emb_std, sigma0 = 6, 2, 5, 0.3, 0.7
    z = np.random.default_rng(5).standard_normal((4, d))
    a = np.random.Generator(np.random.PCG64(9)).standard_normal((d, L * D), dtype=np.float32)
    a *= np.float32(emb_std / (math.sqrt(d) * sigma0))
    p0 = np.random.Generator(np.random.PCG64([9, 1])).standard_normal((L, D), dtype=np.float32) * np.float32(emb_std)
    expected = np.einsum("pd,dk->pk", z.astype(np.float32).astype(np.float64), a.astype(np.float64)).reshape(4, L, D)
    got = Projection(9, d, L, D, emb_std, sigma0)(z)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected + p0, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(Projection(9, d, L, D, emb_std, sigma0, init="zeros")(z), expected, rtol=1e-6, atol=1e-7)


def test_client_package_never_imports_torch():
    code = (
        "import sys, fed_clients.runner, fed_clients.client, fed_clients.aggregator_client; "
        "import fedbpt.demo; print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False False"


def test_few_shot_takes_k_per_class():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 3)
    idx = few_shot(labels, 10, seed=1)
    assert np.bincount(labels[idx]).tolist() == [10, 10, 3]
    np.testing.assert_array_equal(idx, few_shot(labels, 10, seed=1))
    assert not np.array_equal(idx, few_shot(labels, 10, seed=2))


def test_iid_partition_covers_everything_once():
    parts = iid_partition(103, 10, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert {len(p) for p in parts} == {10, 11}


def test_dirichlet_partition_sizes_skew_and_seed():
    labels = np.repeat([0, 1], 500)
    parts = dirichlet_partition(labels, 10, alpha=0.1, seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    assert min(len(p) for p in parts) >= 2
    skew = lambda ps: np.mean([abs(labels[p].mean() - 0.5) for p in ps])  # noqa: E731
    iid = partition(labels, 10, None, seed=3)
    mild = dirichlet_partition(labels, 10, alpha=100.0, seed=3)
    # Smaller alpha, stronger label skew: alpha 0.1 leaves most clients nearly one-class.
    assert skew(parts) > 0.3 > 0.1 > skew(mild) and skew(iid) < 0.1
    for a, b in zip(parts, dirichlet_partition(labels, 10, alpha=0.1, seed=3)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        dirichlet_partition(labels[:5], 10, alpha=1.0, seed=0)


def test_train_val_split_keeps_both_sides():
    train, val = train_val_split(np.arange(10, 20), 0.25, seed=0)
    assert len(val) == 2 and len(train) == 8 and set(train) | set(val) == set(range(10, 20))
    train, val = train_val_split(np.array([4, 5]), 0.1, seed=0)
    assert len(train) == 1 and len(val) == 1


def test_perturbation_rate_and_determinism():
    examples = [Example({"text": " ".join(f"w{i}" for i in range(200))}, 1)]
    words = ["X"]
    out = perturb_examples(examples, 0.5, words, seed=[1, 2])
    swapped = out[0].fields["text"].split().count("X")
    assert 70 < swapped < 130 and out[0].label == 1
    assert perturb_examples(examples, 0.5, words, seed=[1, 2]) == out
    assert perturb_examples(examples, 0.0, words, seed=0) == examples
    assert corpus_words(examples)[:2] == ["w0", "w1"]


def test_local_search_minimises_with_one_call_per_iteration():
    calls = []

    def sphere(z, it):
        calls.append((it, z.shape))
        return ((z - 1.0) ** 2).sum(axis=1)

    result = local_search(sphere, np.zeros(10), 0.5, popsize=8, iterations=60, seed=cma_seed(1, 2, 3))
    assert len(calls) == 60 and all(shape == (8, 10) for _, shape in calls)
    assert np.abs(result.mean - 1.0).max() < 0.1
    assert len(result.sigmas) == 60 and result.evaluations == 480
    again = local_search(sphere, np.zeros(10), 0.5, popsize=8, iterations=60, seed=cma_seed(1, 2, 3))
    np.testing.assert_array_equal(result.mean, again.mean)
    assert cma_seed(0) >= 1


def test_tasks_render_with_one_slot():
    for task in TASKS.values():
        for kind in ("causal", "masked"):
            text = task.render({f: "a {b} c" for f in task.fields}, kind)
            assert text.count("{mask}") == 1
            if kind == "causal":
                assert text.endswith("{mask}")
    assert get_task("rotten_tomatoes").render({"text": "nice {mask} film"}, "causal").count("{mask}") == 1
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")


def test_mirrored_local_search_asks_antithetic_pairs():
    from fed_clients.local_search import local_search

    asked = []

    def sphere(candidates, iteration):
        asked.append(np.asarray(candidates))
        return (np.asarray(candidates) ** 2).sum(axis=1)

    result = local_search(sphere, np.full(5, 3.0), 1.0, 6, 4, 7, mirrored=True)
    for candidates, mean in zip(asked, [np.full(5, 3.0)]):
        offsets = candidates - mean
        assert np.allclose(offsets[0::2] + offsets[1::2], 0)  # each pair reflected through the mean
    assert np.linalg.norm(result.mean) < np.linalg.norm(np.full(5, 3.0))
