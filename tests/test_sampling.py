"""The seven sampling presets: names, lookup, scaling."""

import pytest

from pipeline.data.sampling import INTERPOLATIONS, get_strategy, list_strategies, strategy_for_replica


def test_seven_named_presets_in_replica_order():
    names = list_strategies()
    assert names == ["inception", "inception-photometric", "inception-large", "scale-jitter",
                     "scale-jitter-narrow", "inception-wide-aspect", "inception-random-interp"]
    assert [strategy_for_replica(i).name for i in range(9)] == names + names[:2]
    assert all(get_strategy(n).cite for n in names)


def test_paper_ranges():
    s = get_strategy("inception")
    assert (s.kind, s.area, s.aspect, s.flip, s.photometric) == ("area", (0.08, 1.0), (3 / 4, 4 / 3), True, False)
    assert get_strategy("inception-photometric").photometric
    assert get_strategy("inception-large").area == (0.35, 1.0)
    assert get_strategy("inception-wide-aspect").aspect == (0.5, 2.0)
    assert get_strategy("inception-random-interp").interpolations == INTERPOLATIONS
    only_photometric = [n for n in list_strategies() if get_strategy(n).photometric]
    assert only_photometric == ["inception-photometric"]


def test_sizes_scale_with_input_size():
    assert get_strategy("scale-jitter").shorter_side == (256, 512)
    assert get_strategy("scale-jitter", input_size=112).shorter_side == (128, 256)
    assert get_strategy("scale-jitter-narrow", input_size=32).shorter_side == (37, 55)
    assert get_strategy("inception", input_size=32).area == (0.08, 1.0)  # fractions do not scale


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: inception, inception-photometric"):
        get_strategy("random-erasing")
    with pytest.raises(ValueError, match="input_size"):
        get_strategy("inception", input_size=8)


def test_presets_fit_the_source():
    # ImageNet-like photos: unchanged
    for name in list_strategies():
        assert get_strategy(name, 224).for_source(375, 3) == get_strategy(name, 224)
    # Fashion-MNIST at input 32: 28 px grayscale
    sj, narrow = get_strategy("scale-jitter", 32), get_strategy("scale-jitter-narrow", 32)
    assert sj.shorter_side == (37, 73) and sj.for_source(28, 1).shorter_side == (37, 52)  # 37 * sqrt(73/37)
    assert narrow.for_source(28, 1).shorter_side == (37, 45)
    photo = get_strategy("inception-photometric", 32)
    assert photo.color and not photo.for_source(28, 1).color and photo.for_source(28, 3).color
    assert get_strategy("inception", 32).for_source(28, 1) == get_strategy("inception", 32)  # area: fractions


def test_strategies_are_configuration_checked_and_fingerprinted():
    """ensemble.strategies names one strategy per replica (presets or ensemble.custom_strategies); the
    default is the paper's seven in order with the fingerprint of ensembles recorded before; a change of
    strategy changes it; bad lists and definitions are refused naming the field."""
    from pipeline.config import ConfigError, load_recipe, settings_diff, settings_digest

    default = load_recipe("demo")
    assert default.strategy_names() == list_strategies()
    assert "ensemble.strategies" not in default.result_settings()  # (the same digest as before they were settings)
    listed = load_recipe("demo", ["ensemble.strategies=" + str(list_strategies())])
    assert settings_digest(listed.result_settings()) == settings_digest(default.result_settings())
    swapped = load_recipe("demo", ["ensemble.strategies=" + str(list_strategies()[::-1])])
    assert settings_diff(default.result_settings(), swapped.result_settings())[0].startswith(
        "ensemble.strategies: <unset> -> ['inception-random-interp'")
    mine = ["ensemble.replicas=2", "ensemble.strategies=[inception, mine]"]
    a = load_recipe("demo", mine + ["ensemble.custom_strategies={mine: {kind: area, area: [0.3, 1.0]}}"])
    b = load_recipe("demo", mine + ["ensemble.custom_strategies={mine: {kind: area, area: [0.5, 1.0]}}"])
    assert settings_diff(a.result_settings(), b.result_settings()) == [
        "ensemble.custom_strategies.mine: {'kind': 'area', 'area': [0.3, 1.0]} -> {'kind': 'area', 'area': [0.5, 1.0]}"]
    # an unused definition changes nothing
    c = load_recipe("demo", ["ensemble.replicas=2", "ensemble.custom_strategies={unused: {kind: area}}"])
    assert settings_digest(c.result_settings()) == settings_digest(load_recipe("demo", ["ensemble.replicas=2"])
                                                                   .result_settings())

    bad = {
        "ensemble.strategies: 1 strategies for ensemble.replicas: 7": ["ensemble.strategies=[inception]"],
        "ensemble.replicas: 9 replicas but 7 preset strategies": ["ensemble.replicas=9"],
        "ensemble.strategies: inception named more than once": ["ensemble.replicas=2",
                                                                "ensemble.strategies=[inception, inception]"],
        "ensemble.strategies: unknown strategy 'zoom'": ["ensemble.replicas=1", "ensemble.strategies=[zoom]"],
        "ensemble.custom_strategies.m.area: [0, 2] is not": ["ensemble.replicas=1", "ensemble.strategies=[m]",
                                                             "ensemble.custom_strategies={m: {kind: area, area: [0, 2]}}"],
        "ensemble.custom_strategies.m.zoom: unknown field": ["ensemble.custom_strategies={m: {kind: area, zoom: 2}}"],
        "ensemble.custom_strategies.m.kind: missing": ["ensemble.custom_strategies={m: {area: [0.5, 1]}}"],
        "ensemble.custom_strategies.m.interpolations: ['bicubic'] is not": [
            "ensemble.custom_strategies={m: {kind: area, interpolations: [bicubic]}}"],
        "ensemble.custom_strategies.inception: 'inception' is a preset's name": [
            "ensemble.custom_strategies={inception: {kind: area}}"],
    }
    for message, sets in bad.items():
        with pytest.raises(ConfigError) as e:
            load_recipe("demo", sets)
        assert str(e.value).startswith(message), (message, str(e.value))
    # said: repeats and more replicas than presets
    assert load_recipe("demo", ["ensemble.replicas=9", "ensemble.allow_repeats=true"]).strategy_names()[7:] == \
        ["inception", "inception-photometric"]
    assert load_recipe("demo", ["ensemble.replicas=2", "ensemble.strategies=[inception, inception]",
                                "ensemble.allow_repeats=true"]).strategy_names() == ["inception", "inception"]
