"""A search space in Hydra's override grammar, as Optuna's distributions.

`hydra.sweeper.params` and the command line's sweep overrides are parsed by Hydra's own
parser; each sweep becomes the distribution of the values Hydra gives it:
- `choice(a, b, ...)` and `shuffle(range(...))`: a categorical distribution;
- `range(start, stop, step)`: the values of Python's range, as an int (or float) distribution
  with that step;
- `interval(low, high)`: a float distribution (Hydra's intervals are floats), and
  `tag(log, interval(low, high))` its log scale.
Anything else is a fixed override, passed to every trial as it is.
"""

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)


def search_space(overrides: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """The distributions of the sweep overrides, and the fixed overrides (key: value)."""
    distributions, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(overrides):
        name = override.get_key_element()
        if override.is_sweep_override():
            distributions[name] = distribution(override)
        else:
            fixed[name] = override.get_value_element_as_str()
    return distributions, fixed


def distribution(override: Override) -> BaseDistribution:
    """Optuna's distribution for one sweep override."""
    sweep = override.value()
    if isinstance(sweep, IntervalSweep):
        return FloatDistribution(sweep.start, sweep.end, log="log" in sweep.tags)
    if isinstance(sweep, RangeSweep) and not sweep.shuffle:
        numbers: list[Any] = list(override.sweep_iterator())
        if all(isinstance(number, int) for number in numbers):
            return IntDistribution(numbers[0], numbers[-1], step=int(sweep.step))
        return FloatDistribution(numbers[0], numbers[-1], step=sweep.step)
    # choice, or a shuffled range
    return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
