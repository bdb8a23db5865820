"""The synthetic behavior population's story, stated as probabilities, and the ceiling built on it
(simulations/behavior_ceiling.py): what the generator draws is what ``Story.next_item`` says."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import simulation_script

from fedpgen.shared.data.synthetic_behavior import Story, World, iter_users, latent_tastes
from fedpgen.shared.tasks.behavior import split_sizes

def test_next_item_probabilities_are_what_the_generator_draws() -> None:
    # Prepare: one user with a long log, the story's probabilities for each of its events
    world, seed = World(), 5
    story = Story.of(world, seed)
    (taste,) = latent_tastes(num_users=1, seed=seed, world=world)
    ((_, (log, _)),) = iter_users(num_users=1, events_per_user=(40_000, 40_000), seed=seed, world=world)
    items = np.array([int(e["item"][1:]) for e in log])
    # Execute: per genre of the previous item, observed next-item frequencies against the story's
    gaps = []
    for g in np.unique(story.genres[items[:-1]]):
        after = items[1:][story.genres[items[:-1]] == g]
        if after.size < 3000:
            continue
        predicted = story.next_item(taste, int(np.flatnonzero(story.genres == g)[0]))
        observed = np.bincount(after, minlength=world.num_items) / after.size
        gaps.append(0.5 * np.abs(observed - predicted / predicted.sum()).sum())
    # Assert: total variation at sampling-noise level (a wrong term, e.g. no stickiness, is > 0.2)
    assert gaps and max(gaps) < 0.06, gaps
    # ... and the probabilities sum to one as given (no normalization hidden in callers)
    assert story.next_item(taste, int(items[0])).sum() == pytest.approx(1.0)


def test_latent_tastes_are_the_tastes_the_users_were_drawn_from() -> None:
    world, seed = World(), 2
    tastes = latent_tastes(num_users=6, seed=seed, world=world)
    users = iter_users(num_users=6, events_per_user=(400, 400), seed=seed, world=world)
    for taste, (_, (log, _)) in zip(tastes, users, strict=True):
        counts = Counter(int(e["item"][1:]) for e in log)
        # a favourite is re-played ~ 400 * 0.3 / 8 = 15 times (P(< 5) ~ 2e-4), together ~ 120 times
        assert min(counts[f] for f in taste.favourites) >= 5
        assert sum(counts[f] for f in set(taste.favourites)) >= 0.75 * 400 * world.p_favourite
        assert taste.mix.sum() == pytest.approx(1.0) and len(taste.favourites) == world.num_favourites


def test_the_ceiling_orders_what_each_estimator_knows() -> None:
    ceiling = simulation_script("behavior_ceiling")
    res = ceiling.estimates(num_users=24, events=(240, 360), seed=0, heldout_fraction=0.1, val_fraction=0.1)
    median_nll = {name: statistics.median(r[1] for r in rows) for name, rows in res.items()}
    median_hr = {name: statistics.median(r[0] for r in rows) for name, rows in res.items()}
    truth, alone = "truth", "own events, last season's popularity"
    federated = "own events + the population's popularity"
    # the truth is the best predictor in expectation (log-loss is proper): lowest NLL of all
    assert median_nll[truth] == min(median_nll.values())
    # the population's popularity is worth something to a device that counts its own events
    wins = sum(f[1] < a[1] for f, a in zip(res[federated], res[alone], strict=True))
    assert wins >= 20 and median_hr[federated] > median_hr[alone]
    # and the held-out events are the ones a run evaluates
    n_train, first = ceiling.split(300, 0.1, 0.1)
    assert (n_train, first) == (243, 270) and split_sizes(300, 0.1, 0.1) == (243, 27, 30)


def test_the_sweep_table_compares_users_on_the_tie_free_metric_too(tmp_path: Path) -> None:
    # Prepare: a behavior run where HR@10 ties for every user but the NLL tells them apart
    sweep = simulation_script("dp_sweep")
    run = tmp_path / "eps-8"
    run.mkdir()
    (run / "config.json").write_text('{"task": "behavior"}')
    nll = [(4.0, 4.5), (4.0, 4.5), (4.2, 4.1), (4.3, 4.3)]  # (personal, local): 2 wins, 1 loss, 1 tie
    lines = ["personal-hr10,local-hr10,shared-hr10,personal-nll,local-nll,shared-nll"]
    lines += [f"0.5,0.5,0.4,{p},{loc},5.0" for p, loc in nll]
    (run / "clients.csv").write_text("\n".join(lines) + "\n")
    row = {"epsilon": 8.0, "spent": 8.0, "unit": "user", "metric": "hr10", "higher-is-better": True,
           "median": {"personal": 0.5, "local": 0.5}, "wall-seconds": 60.0, "run-dir": str(run)}
    # Execute
    sweep.render([row], "test", tmp_path)
    # Assert: HR@10 says all tie with local-only, the NLL column says 2/1/1
    table = (tmp_path / "dp_sweep.md").read_text().splitlines()[-1]
    assert "| 4/0/0 | 0/4/0 | 2/1/1 (nll) |" in table
    assert sweep.tie_free(run) == ("nll", False)
