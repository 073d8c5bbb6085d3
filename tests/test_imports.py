"""The layout's rules, checked from the source: no import circles, nothing imports upward, a light command line.

The import graph is built with ``ast`` from every module of ``seal_diffusion`` and ``ui``, counting imports inside
functions too (a circle hidden in a function body is still a circle); a strongly connected component of more than
one module is a circle. "Upward" is measured against the tree in the README's *Development* section, which lists the
subpackages bottom to top and the modules of each in the order data flows through them: a module may import only
modules listed above it, and a subpackage only the subpackages listed above it.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("seal_diffusion", "ui")
HEAVY = ("accelerate", "diffusers", "gradio", "matplotlib", "transformers")
# (importer, imported): why it may point down the README tree. Keep this short; each entry is a debt.
DOWNWARD_OK: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _targets(node: ast.AST, name: str, path: Path) -> list[str]:
    """The dotted names an import statement may refer to (``from a import b``: ``a`` and ``a.b``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, name, path):
                    while target and target not in mods:  # `from pkg.mod import func` → pkg.mod
                        target = target.rpartition(".")[0]
                    if target and target != name:
                        graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "seal_diffusion.errors" in graph["seal_diffusion.cli"]  # `from ..errors import` in cli/__init__.py
    assert "seal_diffusion.training" in graph["seal_diffusion.cli.commands_make"]  # inside cmd_train
    assert "seal_diffusion.training.loop" in graph["seal_diffusion.training"]


def test_no_import_circles():
    assert circles(import_graph()) == []


CLI_START = """
import os, sys

class Watch:  # tells the OpenMP spin setting at the moment torch starts loading
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("spin at torch:", os.environ.get("GOMP_SPINCOUNT"))
        return None

sys.meta_path.insert(0, Watch())
import seal_diffusion.cli
seal_diffusion.cli.build_parser()
print("heavy:", sorted(m for m in HEAVY + ("torch",) if m in sys.modules))
import seal_diffusion.detection.verify  # what the verify handler imports when it runs
"""


def test_the_command_line_starts_light_and_sets_the_spin_before_torch():
    """The parser loads none of diffusers, accelerate, gradio, matplotlib or torch (the handlers import what they
    need), and the OpenMP spin setting (:func:`seal_diffusion.cpu.short_openmp_spin`) comes before torch loads."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}" + CLI_START], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["heavy: []", "spin at torch: 1000"], out.stdout


WATCH = """
import runpy, sys
sys.argv = ["seal-diffusion"] + ARGV
try:
    runpy.run_module("seal_diffusion.cli", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print("loaded:", sorted(m for m in WATCHED if m in sys.modules), "exit:", code)
"""
WATCHED = ("accelerate", "diffusers", "gradio", "matplotlib", "numpy", "PIL", "safetensors", "scipy", "skimage",
           "torch", "transformers")


def _run_cli(args: list[str], tmp_path) -> tuple[list[str], int, str]:
    """Run ``seal-diffusion ARGS`` in a fresh interpreter; the libraries of WATCHED it loaded, its exit code."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = str(ROOT)
    code = f"ARGV = {args!r}\nWATCHED = {WATCHED!r}" + WATCH
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("loaded:"), out.stdout + out.stderr
    loaded, _, exit_code = last.removeprefix("loaded: ").rpartition(" exit: ")
    return ast.literal_eval(loaded), int(exit_code), out.stdout + out.stderr


def test_help_loads_no_torch(tmp_path):
    """``seal-diffusion --help`` and a command's ``--help`` print from the parser alone: no torch, no numpy (issue
    25: ≤ 0.3 s; ``benchmarks/bench_startup.py`` times it)."""
    for args in (["--help"], ["verify", "--help"], ["challenge", "--help"], ["compare", "--help"]):
        loaded, exit_code, out = _run_cli(args, tmp_path)
        assert exit_code == 0 and "usage: seal-diffusion" in out, out
        assert loaded == [], (args, loaded)


def test_verify_of_a_lora_file_loads_torch_safetensors_numpy_only(tmp_path):
    """Plain ``verify`` of a LoRA file needs the key, the file and the test's arithmetic: torch, safetensors and numpy,
    and none of diffusers, transformers, scipy, scikit-image, PIL or matplotlib (each costs seconds to import).
    The verdict is checked too: the owner's own export must be detected."""
    import torch

    from seal_diffusion.core.export import export_lora
    from seal_diffusion.core.keyfile import ModuleKey, SealKey

    g = torch.Generator().manual_seed(0)
    rank, width = 4, 32
    names = [f"down_blocks.{b}.attentions.0.transformer_blocks.0.attn{i}.to_{p}" for b in (0, 1, 2) for i in (1, 2)
             for p in "qkv"]  # 18 modules: the exact test's ceiling, 18·log10 2 = 5.4, clears the threshold 3.3
    modules = {n: ModuleKey(torch.randn(rank, width, generator=g), torch.randn(width, rank, generator=g),
                            torch.randn(rank, rank, generator=g), torch.randn(rank, rank, generator=g))
               for n in names}
    key = SealKey(modules, rank, float(rank), base_model="tiny", target_modules=["to_q", "to_k", "to_v"])
    key_path = key.save(tmp_path / "owner.sealkey")
    lora = export_lora(key, tmp_path / "owner.safetensors", "kohya", "owner")
    loaded, exit_code, out = _run_cli(["verify", "--key", str(key_path), str(lora)], tmp_path)
    assert exit_code == 0 and "DETECTED" in out, out
    assert loaded == ["numpy", "safetensors", "torch"], loaded


def test_progress_bars_are_switched_off_when_diffusers_loads_after_the_command_started():
    """quiet_libraries() no longer imports diffusers/transformers itself; their progress bars go off at their import."""
    code = ("from seal_diffusion.quiet import quiet_libraries\nimport sys\nquiet_libraries()\n"
            "assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules\n"
            "from diffusers.utils import logging as d\nfrom transformers.utils import logging as t\n"
            "import huggingface_hub.utils as h\n"
            "print(d.is_progress_bar_enabled(), t.is_progress_bar_enabled(), h.are_progress_bars_disabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True"], out.stdout


def readme_order() -> list[str]:
    """The entries of the README's layout tree, top to bottom: a sub-package header line (``seal_diffusion/core/``)
    stands for the package and heads the modules indented under it; a top-level header (``seal_diffusion/``, ``ui/``)
    only heads its modules; an indented ``name/`` entry stands for a whole sub-package."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    tree = text[text.index("## Development"):]
    tree = tree[tree.index("```") + 3:]
    tree = tree[tree.index("\n") + 1: tree.index("```")]
    order, package = [], None
    for line in tree.splitlines():
        if not line.strip():
            continue
        first = line.split()[0]
        if not line.startswith(" "):
            package = first.rstrip("/").replace("/", ".")
            if "." in package:  # a sub-package on its own line, e.g. seal_diffusion/cli/
                order.append(package)
            continue
        order.append(f"{package}.{first.removesuffix('.py').rstrip('/')}")
    return order


def subpackages() -> list[str]:
    """The sub-packages of ``seal_diffusion``, in the README tree's order (bottom floor first)."""
    return [e for e in readme_order() if e.count(".") == 1 and e.startswith("seal_diffusion.")
            and (ROOT / e.replace(".", "/") / "__init__.py").exists()]


def test_every_subpackage_is_listed_and_says_what_it_may_import():
    on_disk = sorted(p.parent.name for p in (ROOT / "seal_diffusion").glob("*/__init__.py"))
    listed = subpackages()
    assert sorted(s.split(".")[1] for s in listed) == on_disk
    for sub in listed:
        doc = ast.get_docstring(ast.parse((ROOT / sub.replace(".", "/") / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "import" in doc, f"{sub}/__init__.py: say what lives here and what it may import"


def test_subpackages_import_only_downward():
    """A module of one sub-package imports only from sub-packages listed above it (or the top-level helpers)."""
    floors = {s: i for i, s in enumerate(subpackages())}

    def floor(module: str) -> str | None:
        parts = module.split(".")
        return ".".join(parts[:2]) if len(parts) > 1 and ".".join(parts[:2]) in floors else None

    upward = sorted({(floor(a), floor(b)) for a, targets in import_graph().items() for b in targets
                     if floor(a) and floor(b) and floors[floor(b)] > floors[floor(a)]})
    assert upward == []
    tops = [m for m in _modules() if m.count(".") == 1 and m.startswith("seal_diffusion.") and floor(m) is None]
    assert len(tops) <= 10, f"seal_diffusion/ should keep at most ~10 top-level modules: {sorted(tops)}"


def test_nothing_imports_upward():
    order = readme_order()
    rank = {m: i for i, m in enumerate(order)}

    def entry(module: str) -> str | None:  # the tree entry a module belongs to (a package's modules: the package)
        while module not in rank and "." in module:
            module = module.rpartition(".")[0]
        return module if module in rank else None

    graph = import_graph()
    unlisted = sorted(m for m in graph if entry(m) is None and m not in PACKAGES)
    assert not unlisted, f"add these modules to the README's layout tree: {unlisted}"
    upward = sorted((entry(a), entry(b)) for a, targets in graph.items() for b in targets
                    if entry(a) and entry(b) and rank[entry(b)] > rank[entry(a)])
    assert [pair for pair in upward if pair not in DOWNWARD_OK] == []
    assert set(DOWNWARD_OK) <= set(upward), "an exception no longer needed: remove it from DOWNWARD_OK"
