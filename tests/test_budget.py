"""The time budget's arithmetic (pipeline.train.budget, pipeline.evaluate.run.fit_images): what fits,
the recipe's cap, the floor, the widened last round. The budget measured on a real cluster is in
test_train_e2e.py."""

import re

import pytest

from pipeline.evaluate.run import EVAL_END_S, fit_images
from pipeline.train.budget import ENSEMBLE_S, REPLICA_S, VAL_COST, plan_epoch, round_widths


@pytest.mark.parametrize("replicas,slots,cpu_fit,memory_fit,widen,widths", [
    (7, 2, [2], None, True, (1, 2)),          # the demo on 2 cores: the 7th replica alone, on both
    (7, 2, [1, 1], None, True, (1, 1)),       # two 1-CPU nodes: no node holds a 2-slot worker
    (6, 2, [2], None, True, (1, 1)),          # no partial round
    (7, 4, [4], None, True, (1, 1)),          # 3 left on 4 slots: 4 // 3 = 1
    (5, 4, [4], None, True, (1, 4)),          # 1 left on 4 slots
    (7, 2, [2], None, False, (1, 1)),         # ensemble.widen_tail false
    (2, 2, [4], None, True, (2, 2)),          # fewer replicas than slots: 2 CPUs each
    (7, 7, [16], None, True, (2, 2)),         # 7 on 16 cores: 2 each (2 idle: 16 // 7)
    (7, 4, [16], [4], True, (4, 5)),          # memory holds 4 workers of 16 slots: 4 CPUs each, the last 3 on 5
    (7, 4, [8, 8], [2, 2], True, (4, 4)),     # two nodes of 8 slots and memory for 2 each
    (3, 3, [5, 1], None, True, (1, 1)),       # 6 slots for 3, but no way to place three 2-slot workers
])
def test_cpu_slots_left_idle_go_to_the_replicas_that_run(replicas, slots, cpu_fit, memory_fit, widen, widths):
    assert round_widths(replicas, slots, cpu_fit, memory_fit, widen) == widths


def plan(budget_s, **kw):
    args = dict(budget_s=budget_s, elapsed_s=40, replicas=7, slots=2, width=2, slot_rate=250.0, tail_rate=350.0,
                epochs=6, limit_val=1000, batch=64, cap=6000, min_images=30000)
    args.update(kw)
    return plan_epoch(**args)


def test_an_epoch_is_sized_to_the_budget_in_whole_batches_between_floor_and_cap():
    p = plan(820)
    assert p.floor == 5056 and p.cap == 6000  # 30,000 / 6 epochs rounded up to whole batches
    per_image = 3 * 6 / 250 + 6 / 350  # three full rounds of two, the 7th alone at its own rate
    fixed = 40 + ENSEMBLE_S + 4 * REPLICA_S + per_image * 1000 * VAL_COST
    expect = int((820 - fixed) / per_image) // 64 * 64
    assert p.floor <= expect < p.cap
    assert p.limit_train == expect and p.fits and p.limit_train % 64 == 0
    assert p.estimate_s <= 820 < p.estimate_s + per_image * 64  # the most whole batches that fit
    # never past the recipe, and when it fits, its value as written (6,000 at batch 64 trains 93 batches, as
    # without a budget: the same settings digest)
    assert plan(10_000).limit_train == 6000 and "the recipe's 6,000 images per epoch fit" in plan(10_000).reason


def test_a_budget_too_short_says_so_and_trains_the_floor():
    p = plan(120)
    assert not p.fits and p.limit_train == p.floor == 5056
    assert p.reason.startswith("TOO SLOW") and "30,336 images per replica" in p.reason
    assert p.estimate_s > 120


def test_an_unwidened_partial_round_costs_a_full_round():
    narrow, wide = plan(10_000, width=1, tail_rate=None), plan(10_000)
    assert narrow.estimate_s > wide.estimate_s
    per_image = 4 * 6 / 250
    fixed = 40 + ENSEMBLE_S + 4 * REPLICA_S + per_image * 1000 * VAL_COST
    assert narrow.estimate_s == pytest.approx(fixed + per_image * 5952)


def test_the_evaluation_scores_what_fits_never_below_its_floor():
    rate = 8.0
    assert fit_images(300, 30, 10, rate, 3000, 2000) == (2000, False)  # 240 s - 20 s of logging: 1,760 fit
    assert fit_images(450, 30, 10, rate, 5000, 2000) == (int((450 - 30 - 10 - EVAL_END_S) * rate) // 100 * 100, True)
    assert fit_images(450, 30, 10, rate, 5000, 2000)[0] == 3100  # whole hundreds
    assert fit_images(3600, 30, 10, rate, 3000, 2000) == (3000, True)  # never more than asked
    assert fit_images(10, 30, 10, rate, 500, 2000) == (500, False)  # asked for fewer than the floor: those


def test_rounds_are_widened_only_when_the_driver_paces_them():
    from pipeline.config import EnsembleConfig
    from pipeline.train.budget import widens

    assert widens(EnsembleConfig(max_concurrent=2))
    assert widens(EnsembleConfig(max_concurrent="auto"))
    assert not widens(EnsembleConfig(max_concurrent=None))  # every replica submitted at once: Ray queues them
    assert not widens(EnsembleConfig(max_concurrent=2, widen_tail=False))
    assert not widens(EnsembleConfig(max_concurrent=2, gpus_per_worker=0.5))
    assert not widens(EnsembleConfig(max_concurrent=2, workers_per_replica=2))


def test_an_epoch_that_fits_is_flagged_so_the_recipe_value_stays_as_written():
    assert plan(10_000).at_cap and not plan(820).at_cap and not plan(120).at_cap


@pytest.mark.parametrize("sets,message", [
    (["ensemble.budget_minutes=0"], "ensemble.budget_minutes: value 0.0 is out of range"),
    (["ensemble.budget_minutes=-5"], "ensemble.budget_minutes: value -5.0 is out of range"),
    (["ensemble.budget_minutes=10", "ensemble.workers_per_replica=2"], "the warm-up measures one-worker replicas"),
    (["ensemble.budget_min_images=0"], "ensemble.budget_min_images: must be a positive integer"),
    (["ensemble.budget_minutes=soon"], "ensemble.budget_minutes: expected float or null"),
])
def test_a_bad_budget_is_refused_naming_the_field(sets, message):
    from pipeline.config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe("demo", sets)
