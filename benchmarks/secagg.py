"""Secure aggregation cost: round time and bytes uploaded per device, with and without SecAgg+.

For 10, 50 and 100 devices at the text task's shared-adapter size, measured in one run
(both modes per size, back to back). With ``--bytes``, also the bytes of the serialized
replies each device sent in the training round (all four SecAgg+ stages, or the one plain
reply), read from the server's wire transcript in a second, untimed run per mode.
Training is kept short (2 DP-free local steps) so the protocol's own cost shows; the ratio
with full local training is smaller. Prints a table, then the SecAgg+ round by stage (wall
seconds of each of Flower's four exchanges, from the run's ``progress.jsonl``, and the rest:
the server's unmasking and aggregation); asserts nothing.

    python benchmarks/secagg.py [--sizes 10 50 100] [--set secagg-num-shares=0.2] [--bytes] [--keep DIR]
    python benchmarks/secagg.py --shamir 11 15 31 101   # Flower's secret sharing alone, per device

``--shamir``: the CPU cost of what SecAgg+ does per device and per round with Shamir's secret
sharing (Flower's ``create_shares`` / ``combine_shares``, pycryptodome underneath), for
neighbourhoods of k shares at the default threshold (0.6 k): each device splits two secrets
(its pairwise private key and its self-mask seed) into k shares — as stock Flower does (the
key as PEM, 306 bytes, 20 chunks of 16; a 32-byte seed, 3 chunks) and as FedPGen does (the
key's 48-byte scalar, 4 chunks; a 12-byte seed, 1 chunk; ``shared/secagg_keys.py``), side by
side; the server combines each surviving device's seed: Flower 1.42's unmask stage from every
share it collected, all k; FedPGen's from threshold of them (``server/secure_aggregation.py``,
``keep_threshold_shares``). Split grows about as k × threshold × chunks, combine as
(shares combined)² × chunks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(users: int, secure: bool, out: Path, extra: dict[str, str], *, count_bytes: bool) -> dict[str, float]:
    """One training round; its time, and with ``count_bytes`` the bytes each device sent in it
    (from the server's wire transcript, which a second, untimed run records)."""
    from rich.console import Console

    from fedpgen.server.progress import EVENTS_FILE
    from fedpgen.server.results import read_jsonl
    from fedpgen.shared.config import RunConfig
    from fedpgen.shared.wire_transcript import RUN_TRANSCRIPT_DIR, SERVER_STEM, UPLINK, read_transcript
    from fedpgen.simulate import simulate

    def once(name: str, transcript: bool) -> RunConfig:
        cfg = RunConfig.from_mapping({
            "data": "synthetic", "num-users": users, "min-records": 30, "num-server-rounds": 1, "local-steps": 2,
            "personal-max-steps": 0, "dp": "off", "eval-fraction": min(1.0, 2 / users),
            "secure-aggregation": secure, "wire-transcript": transcript,
            "run-dir": str(out / f"{users}-{'secagg' if secure else 'plain'}{name}"), **extra})
        simulate(cfg, fresh=True, console=Console(file=open(os.devnull, "w")))  # noqa: SIM115
        return cfg

    cfg = once("", False)
    got = {"seconds": float(read_jsonl(Path(cfg.run_dir) / "rounds.jsonl")[0]["seconds"]), "bytes": math.nan}
    for event in read_jsonl(Path(cfg.run_dir) / EVENTS_FILE):  # each stage's wall time, as the server saw it
        if event.get("event") == "finished" and event.get("round") == 1 and str(event["stage"]).startswith("fit"):
            got[str(event["stage"])] = float(event["seconds"])
    if count_bytes:
        cfg = once("-bytes", True)
        sent: dict[int, int] = defaultdict(int)
        for e in read_transcript(Path(cfg.run_dir) / RUN_TRANSCRIPT_DIR / f"{SERVER_STEM}.jsonl"):
            if e.direction == UPLINK and e.message_type == "train" and e.error is None:
                sent[e.src] += e.nbytes
        got["bytes"] = statistics.mean(sent.values())
    return got


def shamir(neighbourhoods: list[int]) -> None:
    """Print Flower's secret-sharing cost per device for each neighbourhood size (medians of 3):
    stock Flower (sk1 as PEM, a 32-byte mask seed, the server combining all k shares) against
    each step FedPGen takes (shared/secagg_keys.py, server/secure_aggregation.py)."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes
    from rich.console import Console
    from rich.table import Table

    from fedpgen.shared import secagg_keys

    key = generate_key_pairs()[0]
    pem, scalar = private_key_to_bytes(key), secagg_keys.private_key_to_bytes(key)
    stock_seed, seed = secagg_keys.FLOWER_SEED_BYTES, secagg_keys.MASK_SEED_BYTES

    def cpu(fn: Any) -> float:
        times = []
        for _ in range(3):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        return statistics.median(times)

    def combined(secret: bytes, k: int, t: int, use: int) -> float:
        shares = create_shares(secret, t, k)
        if combine_shares(shares[:use]) != secret:
            raise RuntimeError("the shares did not give the secret")
        return cpu(lambda: combine_shares(shares[:use]))

    table = Table(title="Shamir secret sharing in Flower's SecAgg+, CPU seconds per device per round")
    for col in ("shares k", "threshold", f"device: split sk1 (PEM) + {stock_seed}-byte seed (Flower)",
                f"sk1 as scalar + {stock_seed}-byte seed", f"sk1 as scalar + {seed}-byte seed (FedPGen)",
                f"server: combine a {stock_seed}-byte seed from all k (Flower)", "from threshold shares",
                f"a {seed}-byte seed from threshold (FedPGen)", "server, 1,000 devices: Flower", "FedPGen"):
        table.add_column(col, justify="right")
    for k in neighbourhoods:
        t = max(2, round(0.6 * k))
        splits = [cpu(lambda sk=sk, n=n: (create_shares(sk, t, k), create_shares(os.urandom(n), t, k)))
                  for sk, n in ((pem, stock_seed), (scalar, stock_seed), (scalar, seed))]
        combines = [combined(os.urandom(stock_seed), k, t, k), combined(os.urandom(stock_seed), k, t, t),
                    combined(os.urandom(seed), k, t, t)]
        table.add_row(str(k), str(t), *(f"{x:.3f}" for x in splits), *(f"{x:.3f}" for x in combines),
                      f"{combines[0] * 1000:.0f} s", f"{combines[2] * 1000:.0f} s")
    Console(width=160).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10, 50, 100])
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key=value override")
    parser.add_argument("--shamir", type=int, nargs="*", help="only the secret-sharing cost for these share counts")
    parser.add_argument("--bytes", action="store_true", help="also the bytes each device sends (a second, "
                        "untimed run per mode, with the wire transcript)")
    parser.add_argument("--keep", type=Path, help="keep the run folders here (flower.log times each SecAgg+ stage)")
    args = parser.parse_args()
    if args.shamir:
        shamir(args.shamir)
        return
    from rich.console import Console
    from rich.table import Table

    extra = dict(s.split("=", 1) for s in args.sets)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        for users in args.sizes:
            plain = run(users, False, Path(tmp), extra, count_bytes=args.bytes)
            secure = run(users, True, Path(tmp), extra, count_bytes=args.bytes)
            rows.append((users, plain, secure))
            print(json.dumps({"users": users, "plain": plain, "secure": secure}), flush=True)
    table = Table(title="SecAgg+ cost per training round (text task shared adapter, 2 local steps, no DP)")
    for col in ("devices", "round s (plain)", "round s (SecAgg+)", "time ratio", "KiB up/device (plain)",
                "KiB up/device (SecAgg+)", "bytes ratio"):
        table.add_column(col, justify="right")
    for users, p, s in rows:
        kib = ("—", "—", "—") if math.isnan(p["bytes"]) else (
            f"{p['bytes'] / 1024:.1f}", f"{s['bytes'] / 1024:.1f}", f"{s['bytes'] / p['bytes']:.2f}x")
        table.add_row(str(users), f"{p['seconds']:.1f}", f"{s['seconds']:.1f}", f"{s['seconds'] / p['seconds']:.2f}x",
                      *kib)
    Console(width=140).print(table)
    stages = Table(title="The SecAgg+ round by stage, wall seconds (the server's view; the rest: the server's "
                   "unmasking and aggregation after the last replies)")
    names = [f"fit ({n})" for n in ("setup", "share_keys", "collect_masked_vectors", "unmask")]
    for col in ("devices", "plain round", *names, "rest", "SecAgg+ round"):
        stages.add_column(col, justify="right")
    for users, p, s in rows:
        parts = [s.get(n, math.nan) for n in names]
        stages.add_row(str(users), f"{p['seconds']:.1f}", *(f"{x:.1f}" for x in parts),
                       f"{s['seconds'] - sum(parts):.1f}", f"{s['seconds']:.1f}")
    Console(width=140).print(stages)


if __name__ == "__main__":
    main()
