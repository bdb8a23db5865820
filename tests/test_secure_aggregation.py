"""Secure aggregation (Flower SecAgg+): right aggregate, dropout-tolerant, useless alone, loud on failure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
from conftest import error_bound, server_received
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import bytes_to_ndarray, ndarray_to_bytes, parameters_to_ndarrays, serde
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedpgen.server import checkpoint
from fedpgen.shared.adapters import get_arrays
from fedpgen.shared.config import RunConfig
from fedpgen.shared.model import build_model
from fedpgen.shared.privacy.ledger import PrivacyLedger
from fedpgen.simulate import RunFailedError, simulate

pytestmark = pytest.mark.slow
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the mods below run in Ray workers


class Dropout:
    """A device that disappears at a given SecAgg+ stage (raises: Flower sees a failed reply)."""

    def __init__(self, partitions: set[int], stage: str) -> None:
        self.partitions, self.stage = partitions, stage

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        here = int(ctxt.node_config["partition-id"])
        if configs is not None and configs.get(Key.STAGE) == self.stage and here in self.partitions:
            raise ConnectionError(f"device {ctxt.node_config['partition-id']} dropped at {self.stage}")
        return call_next(msg, ctxt)


class RecordPlainDelta:
    """Test instrumentation inside SecAgg+: writes each device's plain delta, as the device knows it."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        out = call_next(msg, ctxt)
        if msg.metadata.message_type == "train" and out.has_content():
            res = compat.recorddict_to_fitres(out.content, keep_input=True)
            arrays = parameters_to_ndarrays(res.parameters)
            np.savez(Path(self.folder) / f"{msg.metadata.dst_node_id}.npz", *arrays, weight=res.num_examples)
        return out


class RecordSetup:
    """Test instrumentation outside SecAgg+: writes the shares and threshold each device was told."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        if configs is not None and configs.get(Key.STAGE) == Stage.SETUP:
            (Path(self.folder) / f"{msg.metadata.dst_node_id}.json").write_text(json.dumps(
                {"shares": int(configs[Key.SHARE_NUMBER]), "threshold": int(configs[Key.THRESHOLD])}))
        return call_next(msg, ctxt)


def secagg_mods(tmp_path: Path, dropout: Dropout | None = None) -> tuple[list, list]:
    """Outer mods see the protocol (dropouts, the setup each device gets); inner ones sit between
    SecAgg+ and the app (recorder)."""
    for sub in ("plain", "setup"):
        (tmp_path / sub).mkdir(exist_ok=True)
    outer = [m for m in (dropout, RecordSetup(str(tmp_path / "setup"))) if m]
    return outer, [RecordPlainDelta(str(tmp_path / "plain"))]


def masked_uploads(run_dir: Path) -> dict[int, list[np.ndarray]]:
    """The masked vectors the server received (stage 2), by node id, from its wire transcript."""
    got = {}
    for entry in server_received(run_dir):
        cfg = serde.recorddict_from_proto(ProtoRecordDict.FromString(entry.blob)).config_records.get(RECORD_KEY_CONFIGS)
        if cfg is not None and Key.MASKED_PARAMETERS in cfg:
            got[entry.src] = [bytes_to_ndarray(b) for b in cfg[Key.MASKED_PARAMETERS]]
    return got


def theta_before_after(cfg: RunConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    built = build_model(cfg)
    ckpt = checkpoint.latest(Path(cfg.run_dir) / "checkpoints", config_hash=cfg.model_hash(), names=built.sets.send)
    return get_arrays(built.model, built.sets.send), ckpt.theta if ckpt else []


def plain_mean(folder: Path) -> tuple[list[np.ndarray], list[float], float]:
    files = sorted(folder.glob("*.npz"))
    loaded = [np.load(f) for f in files]
    deltas = [[z[f"arr_{i}"] for i in range(len(z.files) - 1)] for z in loaded]
    weights = [float(z["weight"]) for z in loaded]
    mean = [sum(w * d[i] for d, w in zip(deltas, weights)) / sum(weights) for i in range(len(deltas[0]))]
    return mean, weights, max(float(np.abs(a).max()) for d in deltas for a in d)


def test_config_rejects_even_shares_and_a_threshold_above_the_shares() -> None:
    with pytest.raises(ValueError, match="'secagg-num-shares'.*even integer"):
        RunConfig.from_mapping({"secagg-num-shares": 4})
    with pytest.raises(ValueError, match="'secagg-threshold'"):
        RunConfig.from_mapping({"secagg-num-shares": 5, "secagg-threshold": 7})
    RunConfig.from_mapping({"secagg-num-shares": 5, "secagg-threshold": 3})
    with pytest.raises(ValueError, match="'secagg-max-shares'.*odd"):
        RunConfig.from_mapping({"secagg-max-shares": 30})
    with pytest.raises(ValueError, match="'secagg-threshold'.*below secagg-max-shares"):
        RunConfig.from_mapping({"secagg-max-shares": 5, "secagg-threshold": 5})


def test_a_device_shamir_shares_its_private_key_as_the_48_byte_scalar_not_its_pem() -> None:
    """Flower's mod shares sk1 in 16-byte chunks: the scalar takes 4 chunks, Flower's PEM 20.
    The server rebuilds the same key from threshold shares (the same ECDH masks follow), takes a
    stock Flower device's PEM too, and refuses anything else."""
    import importlib

    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.supercore.primitives import asymmetric as flower_keys

    import fedpgen.client.secure_aggregation  # noqa: F401  (installs the device side)
    import fedpgen.server.secure_aggregation  # noqa: F401  (installs the server side)

    # Prepare: the functions Flower's own device and server code now call
    device = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    server = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")
    sk1, _ = flower_keys.generate_key_pairs()
    _, neighbour_pk = flower_keys.generate_key_pairs()
    # Execute
    secret = device.private_key_to_bytes(sk1)
    shares = create_shares(secret, 3, 5)
    rebuilt = server.bytes_to_private_key(combine_shares([shares[4], shares[0], shares[2]]))
    # Assert
    assert len(secret) == 48 and len(shares[0]) == 4 + 4 * 16  # index + 4 chunks
    assert len(create_shares(flower_keys.private_key_to_bytes(sk1), 3, 5)[0]) == 4 + 20 * 16  # Flower's PEM
    assert rebuilt.private_numbers() == sk1.private_numbers()
    assert (device.generate_shared_key(rebuilt, neighbour_pk) == device.generate_shared_key(sk1, neighbour_pk))
    assert server.bytes_to_private_key(flower_keys.private_key_to_bytes(sk1)).private_numbers() == \
        sk1.private_numbers()
    with pytest.raises(ValueError, match="48 bytes"):
        server.bytes_to_private_key(secret[:-1])


def _three_devices_share_keys() -> tuple[object, list[object], list[bytes]]:
    """Flower's own device code, stages 0 and 1, for three neighbours (threshold 2): the module,
    the devices' states and the shares of device 1's mask seed that each device ends up with."""
    import importlib

    import fedpgen.client.secure_aggregation  # noqa: F401  (installs the device side)

    mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    setup = {Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2, Key.CLIPPING_RANGE: 1.0,
             Key.TARGET_RANGE: 2**16, Key.MOD_RANGE: 2**24, Key.MAX_WEIGHT: 1000.0}
    states = [mod.SecAggPlusState(nid=nid) for nid in (1, 2, 3)]
    keys = {str(s.nid): list(mod._setup(s, setup).values()) for s in states}
    sent = {s.nid: mod._share_keys(s, keys) for s in states}
    seed_shares = [states[0].rd_seed_share_dict[1]]
    for s in states[1:]:  # what stage 2 does on each neighbour: decrypt device 1's shares
        ciphertext = sent[1][Key.CIPHERTEXT_LIST][sent[1][Key.DESTINATION_LIST].index(s.nid)]
        seed_shares.append(mod.share_keys_plaintext_separate(mod.decrypt(s.ss2_dict[1], ciphertext))[2])
    return mod, states, seed_shares


def test_a_device_draws_a_12_byte_mask_seed_shared_in_one_chunk_and_flowers_masks_use_32_bits_of_any_seed() -> None:
    """The self-mask seed is 12 bytes (1 chunk of Shamir shares, where 32 bytes took 3) and loses
    nothing: Flower's mask generator folds every seed to 32 bits — if it ever used the whole seed,
    the last assertion fails and the seed length must be revisited (shared/secagg_keys.py)."""
    import inspect
    import os

    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    # Execute: Flower's own stages 0 and 1 on three devices
    mod, states, shares = _three_devices_share_keys()
    # Assert: the seed, its shares (index + one 16-byte chunk), and the server gets it back
    seed = states[0].rd_seed
    assert len(seed) == 12
    assert all(len(share) == 4 + 16 for share in shares)
    assert combine_shares(shares[1:]) == seed
    assert len(states[0].sk1_share_dict[1]) == 4 + 4 * 16  # the key's scalar: unchanged
    assert "os.urandom(32)" in inspect.getsource(mod) and inspect.getsource(mod).count("os.") == 1
    with pytest.raises(ValueError, match="only its 32-byte mask seed"):
        mod.os.urandom(16)
    long_seed = os.urandom(32)
    folded = int.from_bytes(long_seed[:4], "little")
    for i in range(4, 32, 4):
        folded ^= int.from_bytes(long_seed[i:i + 4], "little")
    dims = [(7,), (3, 2)]
    short_seed = folded.to_bytes(4, "little")
    for a, b in zip(pseudo_rand_gen(long_seed, 2**24, dims), pseudo_rand_gen(short_seed, 2**24, dims), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_device_derives_each_private_key_once_per_message_and_keeps_none_after_it(monkeypatch) -> None:
    """Flower's mod rebuilds sk1/sk2 from bytes for every neighbour; inside one message each is
    derived once, and no derived key outlives the message (one process serves many devices)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedpgen.shared import secagg_keys

    # Prepare
    derived: list[int] = []
    real = ec.derive_private_key
    monkeypatch.setattr(ec, "derive_private_key", lambda v, c: derived.append(v) or real(v, c))
    sk = secagg_keys.private_key_to_bytes(ec.generate_private_key(ec.SECP384R1()))
    # Execute / Assert
    with secagg_keys.message_scope():
        first = secagg_keys.bytes_to_private_key(sk)
        for _ in range(30):
            assert secagg_keys.bytes_to_private_key(sk) is first
    assert len(derived) == 1
    assert secagg_keys._message_keys is None  # dropped with the message
    assert secagg_keys.bytes_to_private_key(sk) is not first and len(derived) == 2  # outside: never kept


def test_the_server_reconstructs_each_secret_from_threshold_shares_and_gets_it() -> None:
    import os
    import time

    from flwr.app import ConfigRecord, Error, Metadata, RecordDict
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

    from fedpgen.server.secure_aggregation import keep_threshold_shares

    # Prepare: 4 devices' secrets, each split into k = 5 shares with threshold 3 (Flower's own
    # sharing); neighbour j returns share j of every device, except that nobody returns device
    # 3's shares but neighbours 0 and 1 (too few: Flower must still see and refuse that).
    secrets = {owner: os.urandom(32) for owner in range(4)}
    split = {owner: create_shares(secret, 3, 5) for owner, secret in secrets.items()}
    replies = []
    for j in range(5):
        owners = [o for o in secrets if o != 3 or j < 2]
        record = ConfigRecord({Key.NODE_ID_LIST: owners, Key.SHARE_LIST: [split[o][j] for o in owners]})
        meta = Metadata(run_id=1, message_id=f"m{j}", src_node_id=10 + j, dst_node_id=1, reply_to_message_id="q",
                        group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
        replies.append(Message(content=RecordDict({RECORD_KEY_CONFIGS: record}), metadata=meta))
    replies.insert(2, Message(error=Error(code=0, reason="dropped"), metadata=meta))  # a dropout: skipped
    # A hostile neighbour (node 14), first in line, returns device 0's share 1 twice, a forged one at
    # index 1, and shares of a device that is not its neighbour (5) and of one that does not exist (99);
    # a node outside every neighbourhood (66) returns a forged share of device 1
    forged = split[0][1][:4] + os.urandom(len(split[0][1]) - 4)
    record = ConfigRecord({Key.NODE_ID_LIST: [0, 0, 0, 5, 99],
                           Key.SHARE_LIST: [split[0][1], split[0][1], forged, forged, forged]})
    replies.insert(0, Message(content=RecordDict({RECORD_KEY_CONFIGS: record}), metadata=meta))
    outsider = Metadata(run_id=1, message_id="x", src_node_id=66, dst_node_id=1, reply_to_message_id="q",
                        group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    record = ConfigRecord({Key.NODE_ID_LIST: [1], Key.SHARE_LIST: [split[1][0][:4] + os.urandom(len(split[1][0]) - 4)]})
    replies.insert(0, Message(content=RecordDict({RECORD_KEY_CONFIGS: record}), metadata=outsider))
    neighbours = {10 + j: {0, 1, 2, 3} for j in range(5)} | {5: {5}}
    # Execute
    dropped, hostile = keep_threshold_shares(replies, threshold=3, neighbours=neighbours)
    # Assert: exactly 3 shares of each device are left (2 of device 3), and they give its secret
    collected: dict[int, list[bytes]] = {o: [] for o in secrets}
    for msg in (m for m in replies if not m.has_error()):
        record = msg.content.config_records[RECORD_KEY_CONFIGS]
        for owner, share in zip(record[Key.NODE_ID_LIST], record[Key.SHARE_LIST], strict=True):
            collected[owner].append(share)  # a share of 5 or 99 left in would fail here (no such key)
    assert {o: len(v) for o, v in collected.items()} == {0: 3, 1: 3, 2: 3, 3: 2}
    assert (dropped, hostile) == (3 * 2, 3 + 2 + 1)  # node 14's genuine first share is one of device 0's 3
    for owner in (0, 1, 2):
        assert combine_shares(collected[owner]) == secrets[owner]
        assert combine_shares(split[owner]) == secrets[owner]  # all 5: what Flower combined before
    try:  # fewer than the threshold: not the secret (Shamir's guarantee, not a choice of ours)
        assert combine_shares(collected[3]) != secrets[3]
    except ValueError:
        pass


def test_the_server_reconstructs_many_secrets_in_parallel_processes_and_gets_each(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At the unmask stage the secrets are rebuilt in a pool of processes (Flower's own
    ``combine_shares``), keyed by the very share list Flower's loop then asks for; a list that
    cannot be combined is left to Flower's loop, which fails on it as before."""
    import os
    import time

    from flwr.app import ConfigRecord, Metadata, RecordDict
    from flwr.common.secure_aggregation.crypto.shamir import create_shares
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    from fedpgen.server import unmasking
    from fedpgen.server.secure_aggregation import _flower_workflow, _ThresholdShares, collected_shares, reconstructed

    # Prepare: 70 devices, k = 5 shares, threshold 3; neighbour j returns share j of each device
    # (too little work for the pool to pay off: the test lowers the bar, and restores it below)
    real_min = unmasking.MIN_SERIAL_SECONDS
    monkeypatch.setattr(unmasking, "MIN_SERIAL_SECONDS", 0.0)
    secrets = {owner: os.urandom(32) for owner in range(70)}
    split = {owner: create_shares(secret, 3, 5) for owner, secret in secrets.items()}
    replies = []
    for j in range(5):
        record = ConfigRecord({Key.NODE_ID_LIST: list(secrets), Key.SHARE_LIST: [split[o][j] for o in secrets]})
        meta = Metadata(run_id=1, message_id=f"m{j}", src_node_id=100 + j, dst_node_id=1,
                        reply_to_message_id="q", group_id="1", created_at=time.time(), ttl=60.0,
                        message_type="train")
        replies.append(Message(content=RecordDict({RECORD_KEY_CONFIGS: record}), metadata=meta))

    class Grid:
        def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN202
            return replies

    state = WorkflowState()
    state.sampled_node_ids, state.threshold = set(secrets), 3
    state.nid_to_neighbours = {100 + j: set(secrets) for j in range(5)}
    wrapped = _ThresholdShares(Grid(), state)
    # Execute: as _SecAggPlus.unmask_stage does, Flower's loop runs inside reconstructed()
    with reconstructed(wrapped.secrets):
        wrapped.send_and_receive([])
        lists = collected_shares(replies, state.sampled_node_ids)
        pooled = dict(wrapped.secrets)
        combined = {o: _flower_workflow.combine_shares(lists[o]) for o in secrets}
    # Assert: one secret per device, under the exact list Flower's loop builds (threshold shares),
    # each taken from the pool's results by Flower's loop (none left over)
    assert all(len(shares) == 3 for shares in lists.values())
    assert combined == secrets
    assert unmasking.workers() < 2 or (pooled == {tuple(lists[o]): secrets[o] for o in secrets}
                                       and not wrapped.secrets)
    # Flower's unmask stage, inside reconstructed(), takes a known list's secret from there once
    # (a marker proves it was not recomputed) and combines any other list itself; afterwards
    # Flower's own function is back
    flower = _flower_workflow.combine_shares
    known = {tuple(lists[0]): b"from the pool"}
    with reconstructed(known):
        assert _flower_workflow.combine_shares(lists[0]) == b"from the pool" and not known
        assert _flower_workflow.combine_shares(lists[1]) == secrets[1]
    assert _flower_workflow.combine_shares is flower
    assert unmasking.combine_all(list(lists.values()), processes=2) == {tuple(lists[o]): secrets[o] for o in secrets}
    assert unmasking.combine_all(list(lists.values()), processes=1) == {}
    # the pool only where it pays off: these 70 lists are ~0.06 CPU s of work, 1,000 of 19
    # shares of a 1-chunk seed ~11 s
    monkeypatch.setattr(unmasking, "MIN_SERIAL_SECONDS", real_min)
    assert unmasking.combine_all(list(lists.values()), processes=2) == {}
    assert unmasking.serial_seconds([[bytes(4 + 16)] * 19] * 1000) == pytest.approx(10.83)  # 1,000 x 19² x 3e-5
    assert unmasking.serial_seconds([[bytes(4 + 16)] * 7] * 100) < unmasking.MIN_SERIAL_SECONDS
    assert unmasking._combine([lists[0][0], lists[0][0]]) is None  # pycryptodome refuses: Flower's loop will

    def no_pool(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError("no /dev/shm")

    monkeypatch.setattr(unmasking, "ProcessPoolExecutor", no_pool)
    monkeypatch.setattr(unmasking, "MIN_SERIAL_SECONDS", 0.0)
    assert unmasking.combine_all(list(lists.values()), processes=2) == {}  # Flower's loop does them all


@pytest.mark.parametrize(("num_shares", "cohort", "cap", "expected"), [
    (0.1, 1000, 31, 31),      # the default fraction at 1,000 devices: 101 shares, capped
    (0.1, 100, 31, 0.1),      # 11 shares: under the cap, Flower derives them as before
    (0.1, 1000, 0, 0.1),      # no cap
    (1.0, 5, 3, 3),           # every device would hold shares of every other: capped
    (1.0, 3, 3, 1.0),         # the cap is the cohort itself: nothing to cap
    (15, 1000, 3, 15),        # an explicit integer is the operator's choice: never changed
])
def test_a_fraction_of_shares_is_capped(num_shares: float, cohort: int, cap: int, expected: float) -> None:
    from fedpgen.server.secure_aggregation import capped_shares, flower_shares

    # Flower 1.42's own rule: round, then odd; <= 2 means everyone
    assert (flower_shares(0.1, 1000), flower_shares(0.1, 20), flower_shares(0.1, 14)) == (101, 3, 14)
    got = capped_shares(num_shares, cohort, cap)
    assert got == expected and type(got) is type(expected)


def test_secure_aggregate_equals_plain_weighted_fedavg_within_the_quantization_bound(make_cfg, tmp_path: Path) -> None:
    # The plain weighted FedAvg of the very deltas the devices masked (recorded by a mod before
    # masking; the plain path's own arithmetic: tests/test_aggregation.py), without DP.
    # Five devices, each holding shares of all others (num-shares 1.0) but for the cap of 3.
    cfg = make_cfg(num_users=5, num_server_rounds=1, min_fit_clients=2, run_dir=str(tmp_path / "secure"), dp="off",
                   secagg_num_shares=1.0, secagg_max_shares=3)
    simulate(cfg, client_mods=secagg_mods(tmp_path))
    told = [json.loads(f.read_text()) for f in sorted((tmp_path / "setup").glob("*.json"))]
    assert told == [{"shares": 3, "threshold": 2}] * 5  # round(0.6 * 3) = 2 of 3, not 5 shares
    theta0, secure = theta_before_after(cfg)
    expected, weights, max_abs = plain_mean(tmp_path / "plain")
    bound = error_bound(num_clients=len(weights), weights=weights, clipping_range=cfg.secagg_clipping_range,
                        quantization_range=cfg.secagg_quantization, max_weight=cfg.secagg_max_weight,
                        max_abs_delta=max_abs)
    assert len(weights) == 5
    for t0, s, e in zip(theta0, secure, expected):
        assert float(np.abs((s - t0) - e).max()) <= bound
    assert max(float(np.abs(s - t0).max()) for t0, s in zip(theta0, secure)) > 10 * bound, "a real update"


@pytest.mark.parametrize(("stage", "dropped"), [(Stage.UNMASK, {1, 3}),
                                               # after sharing keys: the server rebuilds its sk1
                                               (Stage.COLLECT_MASKED_VECTORS, {1}),
                                               pytest.param(Stage.SHARE_KEYS, {2}, marks=pytest.mark.long)])
def test_the_round_completes_with_the_survivors_aggregate(make_cfg, tmp_path: Path, stage: str,
                                                          dropped: set[int]) -> None:
    cfg = make_cfg(num_users=5, num_server_rounds=1, min_fit_clients=2, run_dir=str(tmp_path / "run"), dp="sigma",
                   dp_noise_multiplier=1.0, dp_epsilon=1000.0, wire_transcript=True)
    simulate(cfg, client_mods=secagg_mods(tmp_path, Dropout(dropped, stage)))
    theta0, theta1 = theta_before_after(cfg)
    expected, weights, max_abs = plain_mean(tmp_path / "plain")
    # Dropping after the masked vectors: their vectors still count; before sharing keys: they are out.
    assert len(weights) == (5 if stage == Stage.UNMASK else 5 - len(dropped))
    bound = error_bound(num_clients=len(weights), weights=weights, clipping_range=cfg.secagg_clipping_range,
                        quantization_range=cfg.secagg_quantization, max_weight=cfg.secagg_max_weight,
                        max_abs_delta=max_abs)
    for t0, t1, e in zip(theta0, theta1, expected):
        assert float(np.abs((t1 - t0) - e).max()) <= bound
    if stage == Stage.UNMASK:  # one device's masked upload, alone, says nothing about its delta
        uploads = masked_uploads(Path(cfg.run_dir))
        node = next(iter(uploads))
        z = np.load(tmp_path / "plain" / f"{node}.npz")
        delta = np.concatenate([z[f"arr_{i}"].ravel() for i in range(len(z.files) - 1)])
        masked = np.concatenate([m.ravel() for m in uploads[node]]).astype(np.float64)[-delta.size:]
        assert abs(np.corrcoef(masked, delta)[0, 1]) < 0.05
        ratio = float(z["weight"]) / cfg.secagg_max_weight
        decoded = np.concatenate([d.ravel() for d in dequantize(
            [m % cfg.secagg_quantization for m in uploads[node]], cfg.secagg_clipping_range,
            cfg.secagg_quantization)])[-delta.size:] / ratio
        assert np.linalg.norm(decoded - delta) > 10 * np.linalg.norm(delta)  # measured: about 66x


@pytest.mark.long  # CI: test_flwr_run.py halts SecAgg+ the same way, through the CLI, and checks the same
def test_too_many_dropouts_fail_loudly_instead_of_keeping_the_old_base(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(num_users=5, num_server_rounds=1, min_fit_clients=2, run_dir=str(tmp_path / "run"))
    with pytest.raises(RunFailedError, match="secure aggregation halted"):
        simulate(cfg, client_mods=secagg_mods(tmp_path, Dropout({0, 1, 2}, Stage.SHARE_KEYS)))
    assert not list((tmp_path / "run" / "checkpoints").glob("*.safetensors"))


@pytest.mark.long  # CI: the budget-exhaustion run of test_budget_integrity.py (plain FedAvg)
def test_devices_out_of_budget_refuse_inside_secagg_and_training_stops_cleanly(make_cfg, tmp_path: Path) -> None:
    from fedpgen.client.device import Device
    from fedpgen.shared.population import ensure_population
    from fedpgen.shared.privacy.accounting import epsilon, poisson_sample_rate

    probe = make_cfg(run_dir=str(tmp_path / "run"))
    rates = [poisson_sample_rate(Device(probe, user_dir=u, state_dir=tmp_path / "probe" / u.name).data.num_train, 8)
             for u in ensure_population(probe)]
    one = max(epsilon([(1.0, q, 3)], delta=1e-5, accountant="prv") for q in rates)
    two = min(epsilon([(1.0, q, 6)], delta=1e-5, accountant="prv") for q in rates)
    assert one < two
    cfg = make_cfg(num_server_rounds=3, min_fit_clients=2, run_dir=str(tmp_path / "run"), dp="sigma",
                   dp_noise_multiplier=1.0, dp_epsilon=(one + two) / 2, local_steps=3)
    summary = simulate(cfg)  # no exception: the run stops training and still evaluates
    rounds = [json.loads(x) for x in (Path(cfg.run_dir) / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["round"] == 1 and "stopped" in rounds[-1] and rounds[-1]["budget-exhausted"] == 3
    assert any("refused" in line for line in summary["privacy"])
    for device_dir in (Path(cfg.run_dir) / "devices").iterdir():
        if device_dir.is_dir():
            events = PrivacyLedger(device_dir).events()
            assert len(events) == 1 and events[0].epsilon <= cfg.dp_epsilon


class MaliciousDevice:
    """A device that tampers with its own masked vector after SecAgg+ built it (what it controls).

    Masks are additive mod 2^32, so what it adds to its masked vector is added to the unmasked
    sum. Round 1: its weight level pushed by 2^31 (the total weight Flower divides by is then
    mostly its own) and its elements shifted by Q/2. Round 2: one array fewer than the schema.
    """

    def __init__(self, partition: int, modulus: int = 2**32, levels: int = 4194304) -> None:
        self.partition, self.modulus, self.levels = partition, modulus, levels

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        stage = configs.get(Key.STAGE) if configs is not None else None  # read first: SecAgg+ pops it
        r = int(compat.recorddict_to_fitins(msg.content, keep_input=True).config["server-round"]) \
            if stage == Stage.COLLECT_MASKED_VECTORS else 0
        out = call_next(msg, ctxt)
        if not r or int(ctxt.node_config["partition-id"]) != self.partition:
            return out
        reply = out.content.config_records[RECORD_KEY_CONFIGS]
        vec = [bytes_to_ndarray(b).astype(np.int64) for b in reply[Key.MASKED_PARAMETERS]]
        if r == 1:
            vec = [(vec[0] + 2**31) % self.modulus] + [(v + self.levels // 2) % self.modulus for v in vec[1:]]
        else:
            vec = vec[:-1]
        reply[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(v) for v in vec]
        return out


def test_finding2_a_malicious_device_under_secagg_is_refused_and_the_run_goes_on(make_cfg, tmp_path: Path) -> None:
    # Prepare: a real SecAgg+ simulation; device 0 tampers with its masked vector in both rounds
    cfg = make_cfg(num_users=3, num_server_rounds=2, min_fit_clients=2, run_dir=str(tmp_path / "run"))
    # Execute
    summary = simulate(cfg, client_mods=([MaliciousDevice(0)], []))
    # Assert: round 1's aggregate is out of bounds: refused, no checkpoint, named in the summary;
    # round 2's malformed vector is dropped before the sum (a dropout) and the others aggregate
    rounds = [json.loads(x) for x in (Path(cfg.run_dir) / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["round"] == 1 and "out of bounds" in rounds[0]["out-of-bounds"]
    assert rounds[1]["round"] == 2 and rounds[1]["clients"] == 2 and rounds[1]["rejected"] == 1
    names = sorted(p.name for p in (Path(cfg.run_dir) / "checkpoints").iterdir())
    assert names == ["round_0002.safetensors"]
    theta0, theta2 = theta_before_after(cfg)
    change = max(float(np.abs(b - a).max()) for a, b in zip(theta0, theta2, strict=True))
    assert 0 < change <= cfg.secagg_clipping_range  # the honest update, within the bound
    assert summary["out-of-bounds-rounds"] == [1]
    assert any("round 1 REFUSED" in line for line in summary["privacy"])
