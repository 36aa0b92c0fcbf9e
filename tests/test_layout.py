"""The layout says what each file is: at the top level only what a user runs or a learner reads first, the library in
blip2lora/, no import circle (function-local imports included), and nothing in the library imports a script."""
import ast
import os

from conftest import ROOT

PACKAGE = "blip2lora"
SCRIPTS = {"train", "evaluate", "caption", "data", "bench", "demo"}  # what a user runs; lora.py is read first


def project_modules():
    """{module name: file} of every Python module of the project outside tests/ and config/."""
    found = {name[:-3]: os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")}
    for name in os.listdir(os.path.join(ROOT, PACKAGE)):
        if name.endswith(".py"):
            found[f"{PACKAGE}.{name[:-3]}"] = os.path.join(ROOT, PACKAGE, name)
    return found


def imports_of(path, modules):
    """The project modules a file imports anywhere in it (at the top, inside functions, under `if`)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # from blip2lora import t5
    return found & modules.keys()


def test_the_top_level_holds_what_a_user_runs_or_a_learner_reads_first():
    top = sorted(name for name in os.listdir(ROOT) if name.endswith(".py"))
    assert top == sorted(f"{s}.py" for s in SCRIPTS | {"lora"}) and len(top) <= 8


def test_no_import_circle_and_the_library_imports_no_script():
    modules = project_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    upward = {(name, dep) for name, deps in graph.items() if name.startswith(PACKAGE) for dep in deps
              if dep in SCRIPTS}
    assert not upward, upward
    assert graph["lora"] == set(), "lora.py imports nothing of the project: a reader needs only it"

    state = {}  # name -> "visiting" or "done": a depth-first search meets a "visiting" module only on a circle

    def visit(name, path):
        state[name] = "visiting"
        for dep in sorted(graph[name]):
            assert state.get(dep) != "visiting", "import circle: " + " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"
    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_every_library_module_opens_with_a_line_saying_its_place():
    for name, path in project_modules().items():
        if name.startswith(PACKAGE + "."):
            first = ast.get_docstring(ast.parse(open(path).read())).splitlines()[0]
            short = name.split(".")[1]
            assert first.startswith(f"{PACKAGE}/" + ("" if short == "__init__" else f"{short}.py: ")), (path, first)


def test_every_family_defines_the_same_public_names_with_the_same_signatures():
    """model.FAMILIES: one module per language model, held to model.FAMILY_CONTRACT, so that the rest of the project
    can ask any of them the same questions. Helpers are private: a name outside the contract starts with _."""
    import inspect
    from blip2lora.model import FAMILIES, FAMILY_CONTRACT
    signatures = {}
    for model_type, module in FAMILIES.items():
        public = {name for name, value in vars(module).items() if not name.startswith("_") and not
                  inspect.ismodule(value) and (name.isupper() or getattr(value, "__module__", None) == module.__name__)}
        assert public == set(FAMILY_CONTRACT), (model_type, public ^ set(FAMILY_CONTRACT))
        for name in FAMILY_CONTRACT:
            value = getattr(module, name)
            if callable(value):
                signatures.setdefault(name, set()).add(tuple(inspect.signature(value).parameters))
    assert all(len(forms) == 1 for forms in signatures.values()), signatures
