"""A search space in Hydra's override grammar, as Optuna's distributions."""

import warnings

import pytest
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)

from hydra_plugins.cifar_cnn_search.resumable_optuna import _meaning
from hydra_plugins.cifar_cnn_search.search_space import search_space


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("a=choice(32, 64, 128)", CategoricalDistribution([32, 64, 128])),
        ("a=choice(adam, 'sgd nesterov')", CategoricalDistribution(["adam", "sgd nesterov"])),
        ("a=range(1, 5)", IntDistribution(1, 4)),  # Python's range: 1, 2, 3, 4
        ("a=range(0, 10, 3)", IntDistribution(0, 9, step=3)),
        ("a=range(0.0, 1.0, 0.25)", FloatDistribution(0.0, 0.75, step=0.25)),
        ("a=interval(0.0, 0.5)", FloatDistribution(0.0, 0.5)),
        ("a=interval(1, 8)", FloatDistribution(1.0, 8.0)),  # Hydra's intervals are floats
        ("a=tag(log, interval(1e-4, 1e-2))", FloatDistribution(1e-4, 1e-2, log=True)),
        ("a=shuffle(range(3))", CategoricalDistribution([0, 1, 2])),
    ],
)
def test_each_sweep_becomes_the_distribution_of_its_values(override: str, expected: object) -> None:
    distributions, fixed = search_space([override])
    assert fixed == {}
    if isinstance(expected, CategoricalDistribution) and "shuffle" in override:
        assert sorted(distributions["a"].choices) == sorted(expected.choices)
    else:
        assert distributions == {"a": expected}


def test_other_overrides_are_fixed_values() -> None:
    distributions, fixed = search_space(["+trainer.max_epochs=3", "model.net.dropout=0.1"])
    assert distributions == {}
    assert fixed == {"+trainer.max_epochs": "3", "model.net.dropout": "0.1"}


def test_a_space_recorded_by_optuna_2_means_the_same_distributions() -> None:
    """Its study recorded LogUniformDistribution where Optuna now writes FloatDistribution."""
    old = '{"name": "LogUniformDistribution", "attributes": {"low": 0.0001, "high": 0.01}}'
    new = distribution_to_json(FloatDistribution(1e-4, 1e-2, log=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old names' deprecation stays quiet
        assert _meaning("space", old) == _meaning("space", new)
    assert _meaning("space", old) != _meaning(
        "space", distribution_to_json(FloatDistribution(0, 1))
    )
