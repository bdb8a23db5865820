"""The privacy/utility sweep's table answers the goal's question per user.

The goal (README, "Does federation pay off under DP?"): shared+personal better than *both*
shared-only and local-only for at least 80% of users. A user counts only when the personal
variant is strictly better than each of the two, on the task's tie-free metric where its
primary ties often (behavior: held-out NLL, lower is better), else on the primary.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import simulation_script


@pytest.fixture(scope="module")
def sweep():
    return simulation_script("dp_sweep")


def write_run(folder: Path, task: str, rows: list[dict[str, float]]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"task": task}))
    with (folder / "clients.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=sorted(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def rendered_row(sweep, run: Path, metric: str, higher: bool, median: dict[str, float], out: Path) -> dict[str, str]:
    """The sweep's Markdown table for one point of ``run``, as column -> cell."""
    row = {"epsilon": 8.0, "spent": 8.0, "unit": "user", "metric": metric, "higher-is-better": higher,
           "median": median, "wall-seconds": 60.0, "run-dir": str(run)}
    sweep.render([row], "test", out)
    head, _, line = (out / "dp_sweep.md").read_text().splitlines()
    return dict(zip(head.strip("| ").split(" | "), line.strip("| ").split(" | "), strict=True))


def behavior_user(hr: tuple[float, float, float], nll: tuple[float, float, float]) -> dict[str, float]:
    """One user's shared / personal / local HR@10 and NLL (base fixed)."""
    row = {"base-hr10": 0.1, "base-nll": 6.0}
    for variant, h, n in zip(("shared", "personal", "local"), hr, nll, strict=True):
        row[f"{variant}-hr10"], row[f"{variant}-nll"] = h, n
    return row


def test_better_than_both_counts_users_strictly_better_than_shared_and_local_on_the_tie_free_metric(
        sweep, tmp_path: Path) -> None:
    users = [
        behavior_user((0.2, 0.5, 0.4), (5.0, 4.0, 4.5)),  # better than both on NLL: counts
        behavior_user((0.2, 0.5, 0.5), (5.0, 4.0, 4.5)),  # ties local on HR@10, better on NLL: counts
        behavior_user((0.2, 0.5, 0.4), (3.9, 4.0, 4.5)),  # worse than shared on NLL: does not
        behavior_user((0.2, 0.5, 0.5), (5.0, 4.5, 4.5)),  # equal to local on NLL: does not
        behavior_user((0.6, 0.1, 0.1), (5.0, 4.0, 4.2)),  # far worse on HR@10, better on NLL: counts
    ]
    run = write_run(tmp_path / "eps-8", "behavior", users)
    assert sweep.better_than_both(run, "hr10", True) == (2, 5)  # the first and third users
    assert sweep.better_than_both(run, "nll", False) == (3, 5)

    cells = rendered_row(sweep, run, "hr10", True, {"base": 0.1, "shared": 0.2, "personal": 0.5, "local": 0.4},
                         tmp_path)
    assert cells["better than both"] == "3/5 (60%, nll)"
    row = {"epsilon": 8.0, "spent": 8.0, "unit": "user", "metric": "hr10", "higher-is-better": True, "median": {},
           "wall-seconds": 1.0, "run-dir": str(run)}
    assert sweep.row_cells(row)[1:] == (0.6, "nll")  # what the plot's goal panel draws for this point
    assert (tmp_path / "dp_sweep.png").stat().st_size > 0


def test_better_than_both_uses_the_primary_where_the_task_has_no_tie_free_metric(sweep, tmp_path: Path) -> None:
    users = [{"base-ppl": 7.0, "shared-ppl": s, "personal-ppl": p, "local-ppl": lo}
             for s, p, lo in ((6.5, 6.0, 6.3), (6.5, 6.6, 6.3), (6.5, 6.1, 6.1), (6.4, 6.2, 6.3))]
    run = write_run(tmp_path / "eps-1", "text", users)
    cells = rendered_row(sweep, run, "ppl", False, {"base": 7.0, "shared": 6.5, "personal": 6.15, "local": 6.3},
                         tmp_path)
    assert cells["better than both"] == "2/4 (50%, ppl)"
    assert cells["pers vs local (W/T/L)"] == "2/1/1"


def test_a_later_sweep_into_the_same_folder_keeps_the_earlier_points_of_the_same_settings(sweep,
                                                                                          tmp_path: Path) -> None:
    # Prepare: a folder swept at ε = 8 and ∞ earlier, then at ε = 1 (the README's three invocations)
    settings = {"config": {"num-users": 360, "fraction-fit": 0.2}, "unit": "user"}
    runs = {eps: write_run(tmp_path / f"eps-{eps:g}", "text", [{"base-ppl": 7.0, "shared-ppl": 6.5,
                                                               "personal-ppl": 6.0, "local-ppl": 6.3}])
            for eps in (1.0, 8.0, float("inf"))}

    def point(eps: float, **changed: object) -> dict[str, object]:
        return {"epsilon": eps, "run-dir": str(runs[eps]), "settings": {**settings, **changed}}

    earlier = [point(8.0), point(float("inf")), point(1.0)]
    new = [point(1.0)]
    new[0]["wall-seconds"] = 1.0  # this invocation's ε = 1 point replaces the earlier one
    # Execute
    merged, dropped = sweep.merge_points(earlier, new)
    # Assert: every ε once, by ε, the new point for the ε run again
    assert [r["epsilon"] for r in merged] == [1.0, 8.0, float("inf")] and merged[0] is new[0]
    assert dropped == []
    # an earlier point of other settings, of no settings (an older sweep) or whose run is gone is not
    # mixed in, and is named
    (runs[8.0] / "clients.csv").unlink()
    other = point(float("inf"), unit="record")
    older = {"epsilon": 4.0, "run-dir": str(runs[1.0])}
    merged, dropped = sweep.merge_points([point(8.0), other, older], new)
    assert merged == new and dropped == [4.0, 8.0, float("inf")]
