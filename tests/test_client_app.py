"""Issue 17: the ClientApp only packs and unpacks — the run config parsed once, refusals encoded in shared/wire.py."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from rich.console import Console

from fedpgen.client.app import run_config
from fedpgen.client.device import refusal_text
from fedpgen.shared.config import RunConfig
from fedpgen.shared.privacy.plan import BudgetExhaustedError
from fedpgen.shared.sealing import TamperedStateError
from fedpgen.shared.tasks import NoUsableDataError
from fedpgen.shared.wire import BUDGET_EXHAUSTED, NO_USABLE_DATA, STATE_TAMPERED, decode_refusal, encode_refusal


def context(run: dict) -> Context:  # type: ignore[type-arg]
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config=run)


def test_the_run_config_is_parsed_once_per_run_not_per_message(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = RunConfig.from_mapping.__func__  # type: ignore[attr-defined]

    def counting(cls, overrides=None):  # type: ignore[no-untyped-def]
        calls.append(dict(overrides or {}))
        return original(cls, overrides)

    monkeypatch.setattr(RunConfig, "from_mapping", classmethod(counting))
    first = run_config(context({"lr": 0.0123, "seed": 41}), {"local-steps": 2})
    for _ in range(5):  # five more messages of the same run: the same parsed object
        assert run_config(context({"seed": 41, "lr": 0.0123}), {"local-steps": 2}) is first
    assert len(calls) == 1 and first.lr == 0.0123 and first.local_steps == 2
    other = run_config(context({"lr": 0.0123, "seed": 42}), {"local-steps": 2})  # another run: parsed anew
    assert other.seed == 42 and len(calls) == 2
    with pytest.raises(ValueError, match="'lr'"):
        run_config(context({"lr": -1}), None)


@pytest.mark.parametrize(("exc", "reason"), [(BudgetExhaustedError("ε spent 7.9, next 8.3 > budget 8"), BUDGET_EXHAUSTED),
                                              (NoUsableDataError("user /home/ada/private: 1 usable record"),
                                               NO_USABLE_DATA),
                                              (TamperedStateError("/home/ada/state/ledger.jsonl.sealed"),
                                               STATE_TAMPERED)])
def test_a_refusal_the_device_encodes_is_the_one_the_server_decodes(exc: Exception, reason: str) -> None:
    text = refusal_text(exc, node=12345)
    assert decode_refusal(text) == (reason, 12345)
    # Flower wraps a failed message's error in its own words: found anywhere, with the node
    assert decode_refusal(f"ClientAppException: {type(exc).__name__}: {text}", anywhere=True) == (reason, 12345)
    assert decode_refusal(f"wrapped: {text}") is None  # a status text starts with the refusal
    if reason == BUDGET_EXHAUSTED:
        assert "8.3" in text  # ε figures only
    else:
        assert "/home/ada" not in text  # paths and the user's folder stay in the device's log
    assert decode_refusal(refusal_text(exc)) == (reason, None)
    with pytest.raises(ValueError, match="unknown refusal"):
        encode_refusal("tired")


def test_a_deployed_device_evaluates_what_it_has_and_the_summary_says_so(tmp_path: Path) -> None:
    from fedpgen.client.app import DeviceClient
    from fedpgen.client.node import NodeSettings
    from fedpgen.server.plots import plot_run
    from fedpgen.server.results import RunRecorder
    from fedpgen.server.summary import print_summary

    simulated, deployed = NodeSettings(tmp_path, tmp_path, client_index=0), NodeSettings(tmp_path, tmp_path)
    auto, asked = RunConfig.from_mapping({}), RunConfig.from_mapping({"evaluation": "four-way"})
    assert DeviceClient(auto, simulated).four_way and not DeviceClient(auto, deployed).four_way
    assert DeviceClient(asked, deployed).four_way
    assert not DeviceClient(RunConfig.from_mapping({"evaluation": "device"}), simulated).four_way
    # A run whose devices reported base, shared and personal only
    cfg = RunConfig.from_mapping({"run-dir": str(tmp_path / "run"), "dp": "off", "num-server-rounds": 1})
    rec = RunRecorder(tmp_path / "run", cfg)
    rec.round({"round": 1, "bytes-down-mean": 1024.0, "delta-norm": 0.1, "seconds": 1.0})
    rec.final_clients([{"client-index": i, "num-heldout": 3, **{f"{v}-{m}": 10.0 - i - 2 * (v != "base")
                                                                  for v in ("base", "shared", "personal")
                                                                  for m in ("ppl", "acc")}}
                       for i in range(2)])
    out = io.StringIO()
    summary = print_summary(tmp_path / "run", console=Console(file=out, width=200))
    assert summary["variants"] == ["base", "shared", "personal"] and summary["median-ppl"]["personal"] == 7.5
    assert summary["personal-beats-local"] is None and summary["median-federation-gain"] is None
    assert "no local-only baseline" in out.getvalue() and "local-only" not in out.getvalue().split("no local")[0]
    assert (tmp_path / "run" / "personalization.png") in plot_run(tmp_path / "run")
