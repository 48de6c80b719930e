"""Pure client-side functions: projection, partitions, perturbation, the local CMA-ES loop."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fed_clients.data import Example
from fed_clients.local_search import cma_seed, local_search
from fed_clients.partition import dirichlet_partition, few_shot, iid_partition, partition, train_val_split
from fed_clients.perturb import corpus_words, perturb_examples
from fedbpt_wire.projection import Projection, project, projection_matrix, projection_std
from fed_clients.tasks import TASKS, get_task


def test_projection_is_seeded_and_scaled():
    a1 = projection_matrix(7, 50, 4, 32, 0.1)
    a2 = projection_matrix(7, 50, 4, 32, 0.1)
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, projection_matrix(8, 50, 4, 32, 0.1))
    assert a1.shape == (50, 128) and a1.dtype == np.float32
    assert a1.std() == pytest.approx(0.1, rel=0.02)
    # BBT's scale: std_e / (sqrt(d) * sigma0).
    assert projection_std(0.2, 400, 2.0) == pytest.approx(0.2 / (20 * 2.0))
    proj = Projection(3, 400, 5, 64, embedding_std=0.2, sigma0=1.0)
    z = np.random.default_rng(0).standard_normal((3000, 400))
    prompts = proj(z)
    assert prompts.shape == (3000, 5, 64)
    # A z with the CMA-ES start distribution gives prompt entries about as spread as word embeddings.
    assert (prompts - proj.offset).std() == pytest.approx(0.2, rel=0.05)
    np.testing.assert_allclose(project(z[0], proj.matrix, 5, 64)[0] + proj.offset, prompts[0], rtol=1e-4, atol=1e-5)


def test_initial_prompt_is_seeded_embedding_like_and_optional():
    random_init = Projection(3, 40, 5, 64, embedding_std=0.2, sigma0=1.0)
    p0 = random_init(np.zeros(40))[0]
    np.testing.assert_array_equal(p0, random_init.offset)
    assert p0.std() == pytest.approx(0.2, rel=0.1)
    np.testing.assert_array_equal(p0, Projection(3, 40, 5, 64, 0.2, 1.0).offset)
    assert not np.array_equal(p0, Projection(4, 40, 5, 64, 0.2, 1.0).offset)
    zeros = Projection(3, 40, 5, 64, 0.2, 1.0, init="zeros")
    assert not zeros(np.zeros(40)).any()
    with pytest.raises(ValueError, match="prompt init"):
        Projection(3, 40, 5, 64, 0.2, 1.0, init="vocab")


def test_projection_is_stable_across_processes():
    code = "from fedbpt_wire.projection import projection_matrix as m; print(repr(float(m(11, 20, 3, 8, 0.5).sum())))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert float(out) == float(projection_matrix(11, 20, 3, 8, 0.5).sum())


def test_client_package_never_imports_torch():
    code = ("import sys, fed_clients.runner, fed_clients.client, fed_clients.aggregator_client; "
            "import fedbpt.demo; print('torch' in sys.modules, 'transformers' in sys.modules)")
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
