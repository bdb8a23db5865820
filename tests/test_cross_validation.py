"""The personal fit's cross-validated early stopping (``personal-folds``): every training and
validation record scored once by a fit that did not see it, held-out records never touched,
step 0 kept when no step helps, and never under DP."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedpgen.shared.adapters import active, get_tensors, set_tensors
from fedpgen.shared.presets import PERSONAL, PERSONALIZE, SHARED
from fedpgen.shared.privacy.mechanism import NoPrivacy
from fedpgen.shared.training import mean_loss, train_cross_validated

from conftest import device


def _personal_fit(d, **kwargs) -> tuple[object, dict[str, torch.Tensor]]:
    """Cross-validate the personal part alone on the device's training and validation records."""
    names = tuple(d.sets.personal_trainable)
    pool = torch.cat([d.data.train, d.data.val.cpu()])
    with active(d.model, [SHARED, PERSONAL], names) as params:
        res = train_cross_validated(d.model, params, pool, names=names, task=d.task, batch_size=8,
                                    gen=torch.Generator().manual_seed(7), **kwargs)
    return res, get_tensors(d.model, d.sets.keep)


def test_the_folds_score_every_record_once_and_the_chosen_step_is_the_curves_minimum(make_cfg) -> None:
    # Prepare
    d = device(make_cfg(dp="off"))
    pool = torch.cat([d.data.train, d.data.val.cpu()])
    with active(d.model, [SHARED, PERSONAL], ()):
        at_start = mean_loss(d.model, pool, task=d.task)
    # Execute
    res, _ = _personal_fit(d, folds=3, steps=6, eval_every=2, lr=0.003)
    curve = dict(res.val_curve)
    # Assert: step 0's cross-validated loss is the start's mean loss over the whole pool (the
    # folds partition it; each record weighs once), the grid is the validation grid, and the
    # step kept is the curve's minimum
    assert curve[0] == pytest.approx(at_start, rel=1e-5)
    assert sorted(curve) == [0, 2, 4, 6]
    assert res.best_step == min(curve, key=lambda s: (curve[s], s))
    # Extra records (prior preservation's) join every fit's training and are never scored
    set_tensors(d.model, d.init_keep)
    with_extra, _ = _personal_fit(d, folds=3, steps=6, eval_every=2, lr=0.003, extra=torch.roll(pool[:8], 3, dims=1))
    assert dict(with_extra.val_curve)[0] == pytest.approx(at_start, rel=1e-5)
    assert with_extra.val_curve[1:] != res.val_curve[1:], "the extra records were not trained on"


def test_a_fit_that_only_hurts_keeps_step_0_exactly(make_cfg) -> None:
    d = device(make_cfg(dp="off"))
    start = get_tensors(d.model, d.sets.keep)
    res, after = _personal_fit(d, folds=3, steps=4, eval_every=1, lr=5.0)  # a learning rate that wrecks every fold
    assert res.best_step == 0
    assert dict(res.val_curve)[0] < min(v for s, v in res.val_curve if s > 0)
    assert all(torch.equal(after[k], start[k]) for k in start)


def test_the_fit_trains_on_validation_records_and_never_reads_held_out_ones(make_cfg) -> None:
    # Prepare: the same user three times, the second with a validation record changed, the
    # third with a held-out record changed
    fits = []
    for change in (None, "val", "heldout"):
        d = device(make_cfg(dp="off"))
        if change is not None:
            records = getattr(d.data, change).clone()
            records[0] = torch.roll(records[0], 1)
            d.data = dataclasses.replace(d.data, **{change: records})
        # Execute: the device's own final fit (personal-folds from config), as personalize runs it
        d.cfg = make_cfg(dp="off", personal_folds=3, personal_refit="fresh", personal_lr=0.01,
                         personal_max_steps=6, personal_eval_every=2)
        res = d.run_phase(PERSONALIZE, torch.Generator().manual_seed(3), NoPrivacy(), final=True)
        assert res.best_step > 0, "no step kept: the test would not tell what the fit trained on"
        fits.append(get_tensors(d.model, d.sets.keep))
    base, val_changed, held_changed = fits
    # Assert
    assert any(not torch.equal(base[k], val_changed[k]) for k in base), "validation records not trained on"
    assert all(torch.equal(base[k], held_changed[k]) for k in base), "a held-out record changed the fit"


def test_a_rounds_personal_fit_stops_on_the_validation_split_and_only_the_final_fit_cross_validates(make_cfg) -> None:
    # Prepare: the same user with personal-folds = 3 and = 0 (K + 1 fits in every round would
    # multiply a round's cost; the final fit, done once, is the one the user keeps)
    kept = {}
    for folds in (3, 0):
        for final in (False, True):
            d = device(make_cfg(dp="off"))
            d.cfg = make_cfg(dp="off", personal_folds=folds, personal_refit="fresh", personal_lr=0.01,
                             personal_max_steps=6, personal_eval_every=2)
            # Execute
            res = d.run_phase(PERSONALIZE, torch.Generator().manual_seed(3), NoPrivacy(), final=final)
            kept[folds, final] = (res.best_step, get_tensors(d.model, d.sets.keep))
    # Assert: in a round the key changes nothing, bit for bit; in the final fit it does
    (step_r3, round3), (step_r0, round0) = kept[3, False], kept[0, False]
    assert step_r3 == step_r0 and all(torch.equal(round3[k], round0[k]) for k in round0)
    final3, final0 = kept[3, True][1], kept[0, True][1]
    assert all(torch.equal(final0[k], round0[k]) for k in round0), "folds = 0: the final fit is a round's fit"
    assert any(not torch.equal(final3[k], final0[k]) for k in final0), "the final fit did not cross-validate"


def test_local_only_gets_the_same_cross_validated_final_fit(make_cfg, monkeypatch) -> None:
    from fedpgen.client.evaluation import _local_only

    # Prepare: observe every phase local-only runs, and with which kind of early stopping
    d = device(make_cfg(dp="off", personal_folds=3, personal_refit="fresh", personal_max_steps=2,
                        personal_eval_every=1))
    calls, real = [], d.run_phase
    monkeypatch.setattr(d, "run_phase", lambda phase, gen, privacy=NoPrivacy(), final=False:
                        (calls.append(final), real(phase, gen, privacy, final=final))[1])
    # Execute
    _local_only(d)
    # Assert: its round (one: the device trained none) stops on the split, its last fit cross-validates
    assert calls == [False] * len(d.preset.schedule) + [True]


def test_cross_validation_is_refused_under_dp_and_with_the_users_memory(make_cfg) -> None:
    from fedpgen.shared.privacy.mechanism import RecordDP

    d = device(make_cfg())
    private = RecordDP(noise_multiplier=1.0, clip=1.0, accountant="rdp", history=[])
    with pytest.raises(ValueError, match="not differentially private"):
        _personal_fit(d, folds=3, steps=2, eval_every=1, lr=0.003, privacy=private)
    with pytest.raises(ValueError, match="no user memory"):
        _personal_fit(d, folds=3, steps=2, eval_every=1, lr=0.003, memory=torch.zeros(3))


@pytest.mark.parametrize(("values", "message"), [
    ({"personal-folds": 1}, "at least 2 folds"),
    ({"personal-folds": -2}, "at least 2 folds"),
    ({"task": "behavior", "history-mix": 0.3, "history-mix-fit": True, "personal-folds": 3,
      "personal-refit": "fresh"}, "history-mix-fit"),
    # a stored personal part has trained on the records the folds hold out: their scores would flatter it
    ({"personal-folds": 3, "personal-refit": "continue"}, "personal-refit"),
])
def test_bad_fold_settings_are_refused(make_cfg, values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_cfg(**{k.replace("-", "_"): v for k, v in values.items()})


def test_the_key_at_its_default_leaves_older_runs_checkpoints_theirs(make_cfg) -> None:
    """A run made before ``personal-folds`` existed hashed its config without it: at 0 the hash
    is that one (its checkpoints resume and re-evaluate), at 3 it is another model."""
    import hashlib
    import json

    from fedpgen.shared.config import _LATER_KEYS, _RESUMABLE_KEYS

    cfg = make_cfg()  # before personal-folds, and before the keys added after it (user-noise-dropouts)
    before = {k: v for k, v in cfg.to_toml_dict().items() if k not in _RESUMABLE_KEYS and k not in _LATER_KEYS}
    assert cfg.model_hash() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert make_cfg(personal_folds=3, personal_refit="fresh").model_hash() != cfg.model_hash()
