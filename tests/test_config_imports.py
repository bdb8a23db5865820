"""The config layer depends only on names: validating a run imports no model library.

Checks of what a fresh interpreter imports run in a subprocess: this test process has
long imported torch and the rest.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedpgen.server.plots import plot_run
from fedpgen.server.results import RunRecorder, read_config
from fedpgen.server.summary import summarize
from fedpgen.shared.config import RunConfig
from fedpgen.shared.tasks import TASKS, Task, get_task

ROOT = Path(__file__).resolve().parent.parent
MODEL_LIBRARIES = ("torch", "transformers", "diffusers", "peft", "opacus", "flwr")


def imported_after(code: str) -> list[str]:
    """The model libraries a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {MODEL_LIBRARIES!r} if m in sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_building_and_rejecting_a_config_imports_no_model_library() -> None:
    # Prepare: every task's config, and one the validation must reject
    code = """
from fedpgen.shared.config import RunConfig
for task in ("text", "behavior", "image"):
    RunConfig.from_mapping({"task": task, "data": "synthetic"})
try:
    RunConfig.from_mapping({"lr": -1})
except ValueError as exc:
    assert "'lr'" in str(exc), exc
else:
    raise SystemExit("lr = -1 was accepted")
"""
    # Execute / Assert
    assert imported_after(code) == []


def test_the_text_task_and_the_modules_a_text_run_uses_import_no_diffusers() -> None:
    code = """
import sys
from fedpgen.shared.tasks import get_task
import fedpgen.shared.model, fedpgen.shared.training, fedpgen.shared.accelerator
assert get_task("text").name == "text"
others = [m for m in ("fedpgen.shared.tasks.image", "fedpgen.shared.tasks.behavior") if m in sys.modules]
assert not others, f"get_task('text') imported {others}"
"""
    assert "diffusers" not in imported_after(code)


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports executed when the module is imported: module level (inside if / try / with / class
    bodies too), not inside functions, not under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for part in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                    visit(part)
            elif isinstance(node, ast.With | ast.ClassDef):
                visit(node.body)

    visit(tree.body)
    return found


def shared_import_graph() -> dict[str, set[str]]:
    """Module -> the ``shared`` modules its import executes (a package's ``__init__`` included,
    except the importer's own ancestors, which Python has initialized before it)."""
    files = {"fedpgen." + ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "shared").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:  # relative: from the importer's package, up level - 1
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in files)
        edges = set()
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name in files and not (module == name or module.startswith(name + ".")):
                    edges.add(name)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as a path ``[a, b, ..., a]``; [] if it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_find_cycle_finds_one_through_a_package_init() -> None:
    # The checker itself: config -> shared.tasks (its __init__) -> a task -> config is a cycle
    graph = {"fedpgen.shared.config": {"fedpgen.shared.tasks"}, "fedpgen.shared.tasks": {"fedpgen.shared.tasks.text"},
             "fedpgen.shared.tasks.text": {"fedpgen.shared.config"}}
    assert find_cycle(graph) == ["fedpgen.shared.config", "fedpgen.shared.tasks", "fedpgen.shared.tasks.text", "fedpgen.shared.config"]


def test_shared_modules_import_one_another_without_a_cycle() -> None:
    graph = shared_import_graph()
    assert {"fedpgen.shared.config", "fedpgen.shared.tasks", "fedpgen.shared.tasks.registry"} <= graph.keys()
    assert "fedpgen.shared.tasks.registry" in graph["fedpgen.shared.config"], "the graph misses the config's imports"
    assert find_cycle(graph) == []


def test_the_registry_imports_only_the_standard_library() -> None:
    tree = ast.parse((ROOT / "shared" / "tasks" / "registry.py").read_text())
    names = {((n.module or "") if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
             for n in _runtime_imports(tree) for a in n.names}
    assert names <= sys.stdlib_module_names | {"__future__"}, names


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_task_class_reads_its_metadata_from_its_registry_entry(name: str) -> None:
    info = TASKS[name]
    task = get_task(name)
    assert type(task).info is info
    for field in dataclasses.fields(info):  # a class attribute shadowing the entry would fail here
        if field.name != "target":
            assert getattr(task, field.name) == getattr(info, field.name), field.name


def test_a_class_claiming_another_class_s_entry_is_refused() -> None:
    with pytest.raises(TypeError, match="registry entry names fedpgen.shared.tasks.text:TextTask"):
        class Impostor(Task, task="text"):
            pass


def test_an_unknown_task_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown task 'poetry'; valid: behavior, image, text"):
        get_task("poetry")


def run_folder(tmp_path: Path, cfg: RunConfig) -> Path:
    """A finished text run's folder: config.json and two clients' held-out perplexities."""
    run = tmp_path / "run"
    recorder = RunRecorder(run, cfg)
    recorder.final_clients([{"client-index": i, "base-ppl": 9.0, "shared-ppl": 6.0, "personal-ppl": 4.0 + i,
                             "local-ppl": 7.0} for i in range(2)])
    return run


def test_the_summary_reads_config_json_as_a_run_config(tmp_path: Path) -> None:
    # Prepare
    cfg = RunConfig.from_mapping({"dp-accountant": "rdp", "user-dp": "central", "secure-aggregation": True})
    run = run_folder(tmp_path, cfg)
    with (run / "client_rounds.jsonl").open("w") as fh:
        fh.write(json.dumps({"client-index": 0, "round": 1, "dp-epsilon": 1.5}) + "\n")
    # Execute
    summary = summarize(run)
    # Assert
    assert read_config(run) == cfg
    assert summary["primary-metric"] == "ppl" and summary["personal-beats-shared"] == 2
    assert summary["privacy"][0].startswith("record-level DP (DP-SGD, RDP accountant")
    assert summary["privacy"][1].startswith("user-level DP (central DP-FedAvg")
    assert summary["privacy"][2].startswith("against the server")  # central: it sees the deltas, ε = ∞
    assert summary["privacy"][3].startswith("secure aggregation")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: json.dumps({**d, "lr": -1}), "config 'lr'"),
        (lambda d: json.dumps({**d, "no-longer-a-key": 1}), "unknown config key 'no-longer-a-key'"),
        (lambda d: json.dumps({**d, "task": "poetry"}), "config 'task'"),
        (lambda d: json.dumps(d)[:-2], "Expecting"),
        (lambda d: json.dumps([d]), "JSON object"),
    ],
    ids=["invalid-value", "removed-key", "unknown-task", "truncated", "not-an-object"],
)
@pytest.mark.parametrize("reader", [summarize, plot_run, read_config], ids=["summary", "plots", "read_config"])
def test_an_invalid_config_json_is_an_error_naming_the_file(tmp_path: Path, reader, edit, message: str) -> None:
    # Prepare: an old or hand-edited config.json
    run = run_folder(tmp_path, RunConfig.from_mapping({}))
    path = run / "config.json"
    path.write_text(edit(json.loads(path.read_text())))
    # Execute / Assert
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: not a valid run configuration: .*{message}"):
        reader(run)
