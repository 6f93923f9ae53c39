"""The layout holds: no import cycles in workflow/, and every stage of the stage table has its rule, adapter and
entry point where workflow/stages.py says."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from workflow.stages import STAGES

REPO = Path(__file__).resolve().parent.parent


def import_graph() -> dict[str, set[str]]:
    """workflow module -> the workflow modules it imports, at module level or inside functions."""
    modules = {}
    for path in (REPO / "workflow").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("workflow"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    graph[name].add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name.startswith("workflow"))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_workflow_has_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_each_stage_has_its_rule_adapter_and_entry_point(stage):
    rules = (REPO / "rules" / f"{stage.rules}.smk").read_text()
    assert re.search(rf"^(rule|checkpoint) {stage.name}(_\w+)?:", rules, re.M), f"rules/{stage.rules}.smk has no rule {stage.name}"
    assert f'"../scripts/{stage.name}.py"' in rules
    adapter = (REPO / "scripts" / f"{stage.name}.py").read_text()
    assert re.search(rf"^from workflow\.{re.escape(stage.module)} import .*\b{stage.name}\b", adapter, re.M), \
        f"scripts/{stage.name}.py does not call workflow.{stage.module}.{stage.name}"
    source = (REPO / "workflow" / (stage.module.replace(".", "/") + ".py")).read_text()
    assert re.search(rf"^def {stage.name}\(", source, re.M)


def test_every_rule_file_is_a_stage_file_and_included():
    snakefile = (REPO / "Snakefile").read_text()
    files = {path.stem for path in (REPO / "rules").glob("*.smk")} - {"common"}
    assert files == {stage.rules for stage in STAGES}
    assert all(f'include: "rules/{name}.smk"' in snakefile for name in files)


def test_adapters_pass_keyword_arguments():
    for path in (REPO / "scripts").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name):
                if node.value.func.id != "to_file":
                    assert not node.value.args, f"{path.name}: {node.value.func.id}(...) takes positional arguments"


# What the gateway must not load: the build stages, tracking, and the libraries only they need. A gateway image
# carries the engine runtime (workflow/engine/runtime.py), not the code that built the engine.
BUILD_ONLY = ("workflow.engine.build", "workflow.engine.calibration", "workflow.evaluate", "workflow.quantize",
              "workflow.tracking", "workflow.data", "workflow.finetune", "workflow.plan", "workflow.select",
              "workflow.summary", "workflow.bootstrap", "mlflow", "torch", "transformers", "modelopt", "deepspeed")


def test_the_gateway_imports_the_engine_runtime_and_no_build_stage():
    """In a fresh interpreter: the gateway's app and the engine backends it may load import nothing of the build."""
    probe = ("import json, sys; import workflow.serve.app, workflow.engine.onnxruntime, workflow.engine.tensorrt_llm; "
             "print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    loaded = json.loads(done.stdout)
    assert "workflow.engine.runtime" in loaded
    assert [m for m in loaded if any(m == b or m.startswith(b + ".") for b in BUILD_ONLY)] == []
