"""The search space: only valid geometries are ever proposed, by random search and by Optuna."""

import pytest
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.variant_generator import generate_variants

from jobs.runtime import UsageError
from jobs.tune import geometry_choices, make_search, param_space
from trainables.config import HyperParams, SearchSpace, SweepConfig
from trainables.model import geometry_error
from trainables.trial import trial_hparams

WIDE = SearchSpace(dilations=(1, 2, 3, 4), paddings=(0, 1, 2))


def test_impossible_pairs_are_dropped_from_a_cross_product():
    choices = geometry_choices(WIDE)
    assert "3:0" not in choices and "4:0" not in choices and "1:0" in choices
    for choice in choices:
        dilation, padding = map(int, choice.split(":"))
        assert geometry_error(dilation, padding) is None


def test_an_explicit_impossible_pair_is_refused():
    with pytest.raises(UsageError, match="dilation=3, padding=0"):
        geometry_choices(SearchSpace(dilations=(3,), paddings=(0,)))


def test_random_search_samples_only_valid_trials():
    seen = set()
    for seed in range(30):
        for _, config in generate_variants(param_space(WIDE), random_state=seed):
            hp = trial_hparams(HyperParams(), config)
            assert geometry_error(hp.dilation, hp.padding) is None
            seen.add((hp.dilation, hp.padding))
    assert len(seen) > 3  # it really explores the space


def test_optuna_proposes_valid_trials():
    searcher = make_search(SweepConfig(search="optuna"))
    assert isinstance(searcher, OptunaSearch)
    searcher.set_search_properties("val_acc", "max", param_space(WIDE))
    for i in range(20):
        config = searcher.suggest(f"t{i}")
        hp = trial_hparams(HyperParams(), config)
        assert geometry_error(hp.dilation, hp.padding) is None
        assert WIDE.lr[0] <= hp.lr <= WIDE.lr[1]
        assert hp.batch_size in WIDE.batch_sizes


def test_trial_hparams_keep_the_base_for_unsampled_fields():
    hp = trial_hparams(HyperParams(epochs=7, weight_decay=0.01), {"lr": 0.1, "geometry": "2:1"})
    assert (hp.lr, hp.dilation, hp.padding, hp.epochs, hp.weight_decay) == (0.1, 2, 1, 7, 0.01)


def test_random_search_carries_the_concurrency_limit():
    """Tune ignores TuneConfig.max_concurrent_trials for random search: the generator must hold it,
    or every TorchTrainer trial's driver (which holds no CPU) would start at once."""
    assert make_search(SweepConfig(), concurrency=2).max_concurrent == 2
