"""One device's round: load the shared base, train per the preset's schedule, return only the shared delta.

Plain module, no Flower: ``client/app.py`` unpacks messages and calls this. The final
evaluation is ``client/evaluation.py``'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from fedpgen.client.runtime import Runtime
from fedpgen.shared.accelerator import autocast_dtype
from fedpgen.shared.adapters import active, get_arrays, get_tensors, set_arrays, set_tensors
from fedpgen.shared.config import RunConfig
from fedpgen.shared.locking import exclusive
from fedpgen.shared.presets import PERSONAL, PERSONALIZE, SHARED, Phase
from fedpgen.shared.privacy.accounting import compose, epsilon
from fedpgen.shared.privacy.ledger import PrivacyEvent, PrivacyLedger
from fedpgen.shared.privacy.mechanism import NoPrivacy, RecordDP
from fedpgen.shared.privacy.plan import BudgetExhaustedError, DPPlan, check_stored_budget, check_user_plan
from fedpgen.shared.privacy.user_level import add_noise_share, clip_delta, noise_survivors, server_view_multiplier
from fedpgen.shared.sealing import TamperedStateError
from fedpgen.shared.store import DeviceStore, device_sealer
from fedpgen.shared.tasks import NoUsableDataError, get_task
from fedpgen.shared.training import TrainResult, mean_loss, train, train_cross_validated
from fedpgen.shared.wire import (
    BUDGET_EXHAUSTED,
    NO_USABLE_DATA,
    STATE_TAMPERED,
    encode_refusal,
    keys_digest,
)

log = logging.getLogger(__name__)

BOTH = [SHARED, PERSONAL]
Mechanism = NoPrivacy | RecordDP


def verify_state(store: DeviceStore, ledger: PrivacyLedger) -> None:
    """Open every sealed file of the state-dir; raise ``TamperedStateError`` if one fails authentication."""
    store.load_personal()
    store.load_meta()
    ledger.events()  # the chain, and the event count recorded with the accountant state
    ledger.plan()


def check_usable(cfg: RunConfig, user_dir: Path, store: DeviceStore) -> None:
    """Raise ``NoUsableDataError`` if this device's folder cannot train (no model built).

    A device that already trained is known to be usable; otherwise its folder is read once."""
    if int(store.load_meta().get("rounds_trained", 0)) > 0:
        return
    task = get_task(cfg.task)
    task.read_user(Path(user_dir), cfg, base_path=task.base_model_path(cfg))


def preflight(cfg: RunConfig, *, user_dir: Path, state_dir: Path, key_file: Path | None = None) -> None:
    """Can this device take part in a round? Cheap: no model is built.

    Raises ``TamperedStateError`` (a sealed state file fails authentication),
    ``BudgetExhaustedError`` (the stored plan cannot afford another round) or
    ``NoUsableDataError`` (the folder cannot train) — the refusals of ``REFUSING``.
    """
    sealer = device_sealer(state_dir, key_file)  # one key load for all checks
    store, ledger = DeviceStore(state_dir, sealer), PrivacyLedger(state_dir, sealer)
    with exclusive(state_dir, what="device state-dir"):  # never read half an append
        verify_state(store, ledger)
        check_stored_budget(cfg, ledger)
        check_usable(cfg, user_dir, store)


REFUSING = (BudgetExhaustedError, NoUsableDataError, TamperedStateError)


def refusal_text(exc: BaseException, node: int | None = None) -> str:
    """What a refusing device sends (``shared/wire.py``): the reason code, the node id when
    known, and ε figures for a spent budget. Other details name the user's folder and local
    paths: they go to the device's log, not the wire."""
    if isinstance(exc, BudgetExhaustedError):
        return encode_refusal(BUDGET_EXHAUSTED, node=node, detail=str(exc))
    reason = NO_USABLE_DATA if isinstance(exc, NoUsableDataError) else STATE_TAMPERED
    log.error("refusing (%s): %s", reason, exc)
    return encode_refusal(reason, node=node)


class Device:
    """A user's device: its raw context, its personal part and its store never leave it."""

    def __init__(self, cfg: RunConfig, *, user_dir: Path, state_dir: Path, client_index: int = -1,
                 key_file: Path | None = None, device: str = "cpu", micro_batch: int = 0,
                 create_key: bool = True, runtime: Runtime | None = None) -> None:
        """``runtime``: a resident model, already reset for this device (``client/runtime.py``);
        without one the device builds its own."""
        self.cfg = cfg
        self.client_index = client_index
        runtime = runtime or Runtime(cfg, device)
        self.device = runtime.device
        self.dtype = autocast_dtype(self.device)  # evaluation and non-DP phases; DP-SGD stays fp32
        self.micro_batch = micro_batch
        built = runtime.built
        self.task, self.preset, self.base_path = built.task, built.preset, built.base_path
        self.model, self.sets = built.model, built.sets
        self.init_send = get_arrays(self.model, self.sets.send)
        self.init_keep = get_tensors(self.model, self.sets.keep)
        self._trainable = {SHARED: self.sets.shared_trainable, PERSONAL: self.sets.personal_trainable}
        # Everything in the state-dir is sealed with the device key (readers pass create_key=False).
        sealer = device_sealer(state_dir, key_file, create=create_key)
        self.store = DeviceStore(state_dir, sealer)
        self.ledger = PrivacyLedger(state_dir, sealer)
        self.data = self.task.read_user(Path(user_dir), cfg, base_path=self.base_path,
                                        bindings=self.store.load_meta().get("bindings"))
        # Training records stay on the CPU (batches move in micro-batches); evaluation ones move once.
        self.data.val, self.data.heldout = self.data.val.to(self.device), self.data.heldout.to(self.device)
        self.key = Path(user_dir).name
        self._prior: torch.Tensor | None = None
        self._prior_made = False

    def generator(self, purpose: str, server_round: int) -> torch.Generator:
        digest = hashlib.sha256(f"{self.cfg.seed}/{self.key}/{purpose}/{server_round}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def run_phase(self, phase: Phase, gen: torch.Generator, privacy: Mechanism, *, final: bool = False) -> TrainResult:
        """One phase of the schedule: a private phase under ``privacy``, the others without DP;
        early stopping on validation only without DP (selection is not private). ``final``: the
        personal part's last fit (``personalize``, local-only's alike), whose step
        ``personal-folds`` chooses by cross-validation; a round's fits stop on the validation split."""
        cfg = self.cfg
        mechanism = privacy if phase.private else NoPrivacy()
        names = tuple(n for part in phase.trains for n in self._trainable[part])
        val = self.data.val if phase.early_stopping and not mechanism.private else None
        records, memory, prior = self.data.train, None, None
        if not phase.private and phase.trains == (PERSONAL,):  # the personal part alone, without DP
            prior = self.prior_records()
            records = records if prior is None else torch.cat([records, prior])
            memory = self.fit_memory()
        common = dict(task=self.task, steps=phase.num_steps(cfg), batch_size=phase.batch_size(cfg),
                      lr=phase.learning_rate(cfg), names=names, eval_every=cfg.personal_eval_every,
                      micro_batch=self.micro_batch, dtype=self.dtype)
        with active(self.model, list(phase.adapters), names) as params:
            if final and phase.early_stopping and not mechanism.private and self._cross_validates(common["steps"]):
                # personal-folds: the user's training and validation records, every one scored once
                pool = torch.cat([self.data.train, self.data.val.to(self.data.train.device)])
                return train_cross_validated(self.model, params, pool, folds=cfg.personal_folds, gen=gen,
                                             extra=prior, **common)
            return train(self.model, params, records, gen=gen, privacy=mechanism, val=val, memory=memory, **common)

    def _cross_validates(self, steps: int) -> bool:
        """``personal-folds >= 2`` selects the personal fit's step by cross-validation, given at
        least two records to fold and a step to take (otherwise the single validation split)."""
        n = self.data.train.shape[0] + self.data.val.shape[0]
        return self.cfg.personal_folds >= 2 and n >= 2 and steps > 0

    def fit_memory(self) -> torch.Tensor | None:
        """What the personal fit's loss consults besides the model (``history-mix-fit``: the
        user's item counts); None: the model alone."""
        return self.data.memory if self.cfg.history_mix_fit else None

    def prior_records(self) -> torch.Tensor | None:
        """The task's prior-preservation records (generated by the frozen base), made once per
        Device: they train the personal part only, never a private phase (they are not the
        user's records: DP's sampling and accounting stay over the user's own)."""
        if not self._prior_made:
            self._prior, self._prior_made = self.task.prior_records(self.model, self.data, self.cfg), True
        return self._prior

    def train_round(self, gen: torch.Generator, privacy: Mechanism = NoPrivacy()) -> tuple[TrainResult, TrainResult]:
        """Train this round: the preset's schedule, phase by phase (``shared/presets.py``).

        Returns the results of the (last) phase training the shared part and of the phase
        training the personal part alone (a NaN loss if none)."""
        self.preset.check_pattern()
        schedule = self.preset.schedule
        results = [self.run_phase(phase, gen, privacy) for phase in schedule]
        shared = [r for p, r in zip(schedule, results, strict=True) if SHARED in p.trains]
        personal = [r for p, r in zip(schedule, results, strict=True) if p.trains == (PERSONAL,)]
        return shared[-1], (personal[-1] if personal else TrainResult(mean_loss=float("nan")))

    def _privacy(self) -> tuple[Mechanism, DPPlan | None]:
        """The record-level mechanism from validated config, σ planned once for the run and stored."""
        cfg = self.cfg
        if not cfg.record_dp:
            return NoPrivacy(), None
        stored = self.ledger.plan()
        if stored:
            plan = DPPlan(**stored)
            plan.check_config(cfg)
        else:
            plan = DPPlan.make(cfg, self.preset, num_records=self.data.num_train)
            self.ledger.save_plan(dataclasses.asdict(plan))
        return RecordDP(noise_multiplier=plan.noise_multiplier, clip=cfg.dp_clip, accountant=cfg.dp_accountant,
                        history=self.ledger.history()), plan

    def personalize(self, gen: torch.Generator) -> None:
        """Fit the personal part to the final shared base (it never leaves the device).

        ``personal-refit = "continue"`` (the default) starts from the better, on validation, of
        the stored personal part and none at all (the fresh init, i.e. shared-only); ``"fresh"``
        starts from the fresh init, so the final shared base is the fit's prior and early
        stopping decides how far the user's records move it. Then it trains with early
        stopping. Without validation records (``val-fraction = 0``) it continues from the
        stored part (docs/architecture.md, "Early stopping of the personal part").
        """
        stored = self.store.load_personal()
        candidates = [c for c in (stored, self.init_keep) if c is not None]
        if self.data.val.shape[0] == 0:
            set_tensors(self.model, candidates[0])
        elif self.cfg.personal_refit == "fresh":
            set_tensors(self.model, self.init_keep)
        else:
            losses = []
            for i, cand in enumerate(candidates):
                set_tensors(self.model, cand)
                losses.append((self._val_loss(memory=self.fit_memory()), i))
            set_tensors(self.model, candidates[min(losses)[1]])
        self.run_phase(PERSONALIZE, gen, NoPrivacy(), final=True)

    def load_personal(self) -> None:
        stored = self.store.load_personal()
        set_tensors(self.model, stored if stored is not None else self.init_keep)

    def _val_loss(self, memory: torch.Tensor | None = None) -> float:
        """The model's mean validation loss (the wire metrics' ``val-loss-*``), or with ``memory``
        the personal fit's (``fit_memory``: the personal part's selection, never sent)."""
        if self.data.val.shape[0] == 0:
            return float("nan")
        with active(self.model, BOTH, ()):
            return mean_loss(self.model, self.data.val, task=self.task, dtype=self.dtype, memory=memory)

    def fit(self, shared: list[np.ndarray], *, server_round: int,
            sampled_clients: int = 1) -> tuple[list[np.ndarray], int, dict[str, object]]:
        """One federated round; returns (shared delta, number of training records, wire metrics).

        Holds the state-dir exclusively: a second process on it stops at once (``FolderLockedError``)."""
        with exclusive(self.store.dir, what="device state-dir"):
            return self._fit(shared, server_round=server_round, sampled_clients=sampled_clients)

    def _fit(self, shared: list[np.ndarray], *, server_round: int,
             sampled_clients: int) -> tuple[list[np.ndarray], int, dict[str, object]]:
        cfg = self.cfg
        privacy, plan = self._privacy()
        check_user_plan(cfg, self.ledger, save=True)  # user-level: its parameters fixed, its cap held here
        if plan is not None:  # refuse before touching anything: never exceed a budget silently
            plan.check_budget(self.ledger.history(), spent=len(self.ledger.events("record")), delta=cfg.dp_delta,
                              accountant=cfg.dp_accountant, budget=cfg.dp_epsilon)
        set_arrays(self.model, self.sets.send, shared)
        self.load_personal()
        # Validation losses are wire metrics only of runs that are not private: under DP they are not computed.
        before = self._val_loss() if not privacy.private else math.nan
        gen = self.generator("fit", server_round)
        # Non-private randomness only (e.g. a diffusion loss's timesteps): reproducible. DP noise
        # and Poisson sampling never come from here (shared/privacy/mechanism.py: secret_generator).
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        started = time.perf_counter()
        shared_res, personal_res = self.train_round(gen, privacy)
        train_seconds = time.perf_counter() - started
        after = self._val_loss() if not privacy.private else math.nan
        delta = [new - old for new, old in zip(get_arrays(self.model, self.sets.send), shared, strict=True)]
        if cfg.user_dp != "off":  # DP-FedAvg: bound this user's influence, add a noise share if distributed
            delta = clip_delta(delta, cfg.user_clip)
            if cfg.user_dp == "distributed":  # sized for the survivors the server must see (else it refuses)
                delta = add_noise_share(delta, std=cfg.user_noise_multiplier * cfg.user_clip,
                                        num_clients=noise_survivors(sampled_clients, cfg.user_noise_dropouts),
                                        rng=np.random.default_rng())
        # Every element within the clipping range C: the server holds every device to it (server/bounds.py:
        # without SecAgg+ it clips, with SecAgg+ it refuses an aggregate whose mean leaves [-C, C]).
        bound = cfg.secagg_clipping_range
        delta = [np.clip(d, -bound, bound).astype(d.dtype) for d in delta]
        # Account first (the noise is spent even if the reply is lost), then save the personal
        # part and the bookkeeping, all BEFORE anything is sent.
        event = self._ledger_event(server_round, privacy, plan, sampled_clients)
        self.store.save_personal(get_tensors(self.model, self.sets.keep))
        meta = self.store.load_meta()
        meta["rounds_trained"] = int(meta.get("rounds_trained", 0)) + 1
        meta["last_round"] = server_round
        meta["bindings"] = self.data.bindings  # e.g. which subject trained which token: fixed from now on
        self.store.save_meta(meta)
        metrics: dict[str, object] = {
            "client-index": self.client_index, "keys-digest": keys_digest(self.sets.send),
            "train-seconds": train_seconds, **self.skipped(), **event.wire(),
        }
        if not privacy.private:  # data-dependent scalars: sent only by runs that are not private anyway
            metrics.update({"train-loss": shared_res.mean_loss, "val-loss-before": before, "val-loss-after": after,
                            "personal-best-step": personal_res.best_step})
        return delta, self._weight(), metrics

    def skipped(self) -> dict[str, int]:
        """The data-quality report: bad inputs skipped on this device, counted by reason."""
        return {f"skipped-{reason}": count for reason, count in self.data.skipped.items()}

    def _weight(self) -> int:
        """The aggregation weight sent as ``num_examples``: uniform under user-level DP (its
        sensitivity needs it), capped at SecAgg+'s ``max_weight`` under secure aggregation."""
        if self.cfg.user_dp != "off":
            return 1
        if self.cfg.secure_aggregation:
            return min(self.data.num_train, int(self.cfg.secagg_max_weight))
        return self.data.num_train

    def _ledger_event(self, server_round: int, privacy: Mechanism, plan: DPPlan | None,
                      sampled_clients: int) -> PrivacyEvent:
        """Append this round's privacy events to the on-device ledger (before anything is sent):
        record level (DP-SGD, or "none" where no unit protects the user), user level (DP-FedAvg).
        Returns the record-level one, whose fields go on the wire (appended or not).

        A round this device already spent (the server crashed before checkpointing it and
        runs it again) is charged again, as a further attempt: the noise was spent both times."""
        cfg = self.cfg
        events = self.ledger.events()
        attempt = {unit: 1 + sum(e.round == server_round and e.unit == unit for e in events)
                   for unit in ("record", "user")}
        kept = cfg.user_dp == "off" or cfg.record_dp  # else the wire's "none" event is not a participation's
        event = self._record_event(server_round, privacy, plan, attempt["record" if kept else "user"])
        if kept:
            self.ledger.append(event)
        if cfg.user_dp != "off":
            self.ledger.append(self._user_event(server_round, sampled_clients, attempt["user"]))
        return event

    def _record_event(self, server_round: int, privacy: Mechanism, plan: DPPlan | None,
                      attempt: int) -> PrivacyEvent:
        cfg = self.cfg
        if isinstance(privacy, RecordDP) and plan is not None:
            if any((s, q) != (plan.noise_multiplier, plan.sample_rate) for s, q, _ in privacy.spent):
                raise RuntimeError(f"DP steps taken at {privacy.spent}, not at the planned (σ, q) of {plan}")
            steps = sum(n for _, _, n in privacy.spent)
            if steps != plan.steps_per_round:  # the schedule and the plan disagree: ε would be misstated
                raise RuntimeError(f"this round took {steps} DP steps; the plan calibrated σ for "
                                   f"{plan.steps_per_round} per round")
            return PrivacyEvent(
                round=server_round, unit="record", mechanism="DP-SGD (Opacus, Poisson sampling, Gaussian)",
                noise_multiplier=plan.noise_multiplier, clip=cfg.dp_clip, sample_rate=plan.sample_rate,
                steps=steps, delta=cfg.dp_delta,
                epsilon=epsilon(compose(self.ledger.history(), sigma=plan.noise_multiplier,
                                        sample_rate=plan.sample_rate, steps=steps),
                                delta=cfg.dp_delta, accountant=cfg.dp_accountant),
                accountant=cfg.dp_accountant, private=True, attempt=attempt)
        return PrivacyEvent(round=server_round, unit="record", mechanism="none", noise_multiplier=0.0,
                            clip=0.0, sample_rate=0.0, steps=0, delta=cfg.dp_delta, epsilon=math.inf,
                            accountant="none", private=False, attempt=attempt)

    def _user_event(self, server_round: int, sampled_clients: int, attempt: int) -> PrivacyEvent:
        """This participation in DP-FedAvg as the server sees it: it drew the cohort, so no
        amplification holds against it (q = 1): a Gaussian at z under SecAgg+ with distributed
        noise, at z/√t without SecAgg+ (the lone share), none with central noise (it adds the
        noise itself). ε: composed over this device's participations, what it can prove alone;
        the amplified ε against everyone else is the server's (docs/privacy.md)."""
        cfg = self.cfg
        seen = server_view_multiplier(mode=cfg.user_dp, secure_aggregation=cfg.secure_aggregation,
                                      noise_multiplier=cfg.user_noise_multiplier,
                                      survivors=noise_survivors(sampled_clients, cfg.user_noise_dropouts))
        how = {"central": "central noise, added by the server", "distributed": "distributed noise shares"}
        mechanism = (f"DP-FedAvg ({how[cfg.user_dp]}{', SecAgg+' if cfg.secure_aggregation else ''}), "
                     "as the server sees it")
        history = self.ledger.history("user")
        eps = (epsilon(compose(history, sigma=seen, sample_rate=1.0, steps=1), delta=cfg.dp_delta,
                       accountant=cfg.dp_accountant) if seen > 0 else math.inf)
        return PrivacyEvent(round=server_round, unit="user", mechanism=mechanism, noise_multiplier=seen,
                            clip=cfg.user_clip, sample_rate=1.0, steps=1, delta=cfg.dp_delta, epsilon=eps,
                            accountant=cfg.dp_accountant, private=seen > 0, attempt=attempt)

    def evaluate(self, shared: list[np.ndarray], *, four_way: bool = True) -> dict[str, object]:
        """Held-out metrics (``client/evaluation.py``): what this device has, and with ``four_way``
        also a personal part re-fitted to ``shared`` and a local-only baseline."""
        from fedpgen.client.evaluation import final_evaluation

        with exclusive(self.store.dir, what="device state-dir"):
            return final_evaluation(self, shared, four_way=four_way)
