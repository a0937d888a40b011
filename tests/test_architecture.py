"""The architecture holds: no import cycles (function-local imports included), one matmul entry point, short files."""

import ast
import os

import jax
import jax.numpy as jnp
import pytest
from conftest import ROOT, tiny_config

from maxscale.model import transformer

PACKAGE = os.path.join(ROOT, "maxscale")
MAX_LINES = 450
MAX_FUNCTION_LINES = 80


def module_files(package_dir: str) -> dict[str, str]:
    """{dotted module name: path} for every .py file under `package_dir` (a package named by its folder)."""
    root = os.path.dirname(package_dir)
    out = {}
    for d, _, names in os.walk(package_dir):
        for n in names:
            if n.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, n), root)[:-3].split(os.sep)
                out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(d, n)
    return out


def imports(package_dir: str) -> list[tuple[str, str, str, int]]:
    """(module, imported module of the package, path, line) for every import statement anywhere in every file
    (function-local ones too). `from a.b import c` is an edge to the module a.b.c when c is a module, else to a.b."""
    modules = module_files(package_dir)
    top = os.path.basename(package_dir)
    found = []
    for name, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        with open(path) as fh:
            tree = ast.parse(fh.read(), path)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    parts = name.split(".") if is_pkg else name.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in modules and t != name and t.split(".")[0] == top:
                    found.append((name, t, path, node.lineno))
    return found


def import_graph(package_dir: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (see `imports`)."""
    graph = {m: set() for m in module_files(package_dir)}
    for name, target, _, _ in imports(package_dir):
        graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles_in_maxscale():
    graph = import_graph(PACKAGE)
    assert len(graph) > 30 and "maxscale.train.command" in graph["maxscale.train.__main__"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_check_finds_a_planted_function_local_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg import c\n    return c\n")
    (pkg / "c.py").write_text("import os\nfrom . import a\n")
    (pkg / "d.py").write_text("from pkg import a\n")  # imports into the cycle, not part of it
    graph = import_graph(str(pkg))
    assert graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(str(pkg))) is None


MATMUL_CALLS = ("einsum", "dot", "matmul", "dot_general", "ragged_dot", "tensordot")


def test_model_matmuls_only_in_the_entry_point():
    """No einsum/dot/@ in maxscale/model outside layers.py: a new layer gets dtype and quantization by construction."""
    offenders = []
    model_dir = os.path.join(PACKAGE, "model")
    for n in sorted(os.listdir(model_dir)):
        # kernels: activation x activation only; grouped_matmul: the tile kernels behind Matmul.grouped, whose
        # operands Matmul has already cast and quantized (as jax.lax.ragged_dot is behind Matmul.ragged)
        if not n.endswith(".py") or n in ("layers.py", "kernels.py", "grouped_matmul.py"):
            continue
        tree = ast.parse(open(os.path.join(model_dir, n)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
                offenders.append(f"{n}:{node.lineno} @")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MATMUL_CALLS:
                offenders.append(f"{n}:{node.lineno} {node.func.attr}")
    assert not offenders, offenders


class CountingQuantizer:
    quantizes_kv = whole_attention = False

    def __init__(self):
        self.calls = []

    def weights(self, w, eq, role):
        self.calls.append((role, eq))
        return w

    def activations(self, x, eq, role):
        return x

    def table(self, table_VD):
        return table_VD


@pytest.mark.parametrize("mlp,tied,expected_hidden", [("swiglu", False, 7), ("gelu", True, 6)])
def test_every_model_matmul_reaches_the_quantizer_with_its_role(mlp, tied, expected_hidden):
    counter = CountingQuantizer()
    cfg = tiny_config(**{"model.mlp": mlp, "model.tie_embeddings": tied})
    model = transformer.ModelDef(cfg, transformer.build_context(cfg, quantizer=counter))  # the Context's quantizer
    tokens = jax.ShapeDtypeStruct((2, cfg.data.seq_len), jnp.int32)
    out = jax.eval_shape(model.apply, model.abstract_params, tokens)
    assert out.shape == (2, cfg.data.seq_len, cfg.model.vocab_size)
    roles = [r for r, _ in counter.calls]
    # the scan body is traced once for all layers: q, k, v, o + the MLP's matrices, then the readout
    assert roles.count("hidden") == expected_hidden and roles.count("readout") == 1, counter.calls


def test_no_file_is_longer_than_the_limit():
    long = []
    for d in ("maxscale", "tools", "launch", "tests", "configs"):
        for path in _py_files(d):
            with open(path) as fh:
                n = sum(1 for _ in fh)
            if n > MAX_LINES:
                long.append(f"{os.path.relpath(path, ROOT)}: {n} lines")
    assert not long, f"split these files (limit {MAX_LINES}): {long}"


def test_no_function_is_longer_than_the_limit():
    """STYLE: a function that does not fit a screen does several things; split it into named helpers."""
    long = []
    for d in ("maxscale", "tools", "launch"):
        for path in _py_files(d):
            with open(path) as fh:
                tree = ast.parse(fh.read())
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, f"split these functions (limit {MAX_FUNCTION_LINES}): {long}"


def _py_files(d: str) -> list[str]:
    return [os.path.join(a, n) for a, _, names in os.walk(os.path.join(ROOT, d)) for n in names if n.endswith(".py")]


# Layers, lowest first: a module imports only its own layer or lower ones (function-local imports count). Longest
# prefix wins; `__main__` modules are entry points, above everything (nothing imports them). docs/architecture.md.
LAYERS = (
    ("maxscale", "maxscale.errors", "maxscale.defaults", "maxscale.paths", "maxscale._host"),
    ("maxscale.config", "maxscale.configdiff", "maxscale.cli"),
    ("maxscale.parameterization",),
    ("maxscale.parallel",),
    ("maxscale.model",),
    ("maxscale.quant",),
    ("maxscale.train",),
    ("maxscale.analysis", "maxscale.tools", "maxscale.launch"),
)
# Known upward imports, each to be removed by the change named; the list empties, it never grows. (The ones issue #23
# named are gone: model.transformer -> quant.qat, quant.ptq -> train.*, parallel.compile_check -> train.step.)
ALLOWED_UPWARD = {
    # config.resolve calls each section's resolver where the section lives (for the lead: move those resolvers into
    # the config layer, or the field schema's owner decides)
    ("maxscale.config", "maxscale.parameterization"),
    ("maxscale.config", "maxscale.quant.config"),
    ("maxscale.config", "maxscale.train.tokenizers"),
}


def layer_of(module: str, layers=LAYERS) -> int:
    """The layer index of `module`: its longest listed prefix; `__main__` modules are above every layer."""
    if module.rsplit(".", 1)[-1] == "__main__":
        return len(layers)
    best, index = "", None
    for i, names in enumerate(layers):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > len(best):
                best, index = n, i
    assert index is not None, f"{module} is in no layer: add it to LAYERS"
    return index


def upward_imports(package_dir: str, layers=LAYERS) -> list[tuple[str, str, str]]:
    """(module, imported module, 'path:line: import text') for each import of a higher layer."""
    found = []
    for name, target, path, line in imports(package_dir):
        if layer_of(target, layers) > layer_of(name, layers):
            with open(path) as fh:
                text = fh.read().splitlines()[line - 1].strip()
            found.append((name, target, f"{os.path.relpath(path, os.path.dirname(package_dir))}:{line}: {text}"))
    return sorted(set(found))


def test_layers_import_only_downward():
    found = upward_imports(PACKAGE)
    new = [where for name, target, where in found if (name, target) not in ALLOWED_UPWARD]
    assert not new, "imports of a higher layer (LAYERS in this file):\n" + "\n".join(new)
    stale = ALLOWED_UPWARD - {(name, target) for name, target, _ in found}
    assert not stale, f"these upward imports are gone: remove them from ALLOWED_UPWARD: {sorted(stale)}"


def test_layer_check_reports_a_planted_function_local_upward_import(tmp_path):
    pkg = tmp_path / "pkg"
    for sub in ("low", "high"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "high" / "a.py").write_text("from pkg.low import b\n")  # downward: fine
    (pkg / "low" / "b.py").write_text("import os\n\n\ndef f():\n    from pkg.high import a\n    return a\n")
    layers = (("pkg", "pkg.low"), ("pkg.high",))
    assert upward_imports(str(pkg), layers) == [("pkg.low.b", "pkg.high.a", "pkg/low/b.py:5: from pkg.high import a")]
    (pkg / "low" / "b.py").write_text("import os\n")
    assert upward_imports(str(pkg), layers) == []
