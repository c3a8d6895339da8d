"""tinylora/engine.py is the one room for tinygrad's internals: no other module of tinylora imports tinygrad below its
public API (as engine.py's docstring defines it), and the engine's caches are bounded."""
import ast, pathlib
from tinylora import engine

PACKAGE = pathlib.Path(engine.__file__).parent
PUBLIC = {"tinygrad": {"Tensor", "TinyJit", "function", "UOp", "Variable", "dtypes", "GlobalCounters", "fetch", "Context",
                       "getenv", "Device", "nn"},
          "tinygrad.dtype": {"DType"}}
PUBLIC_MODULES = ("tinygrad", "tinygrad.nn")  # `import ...` of these, and anything from tinygrad.nn and its submodules

def below_public_api(path: pathlib.Path) -> list[str]:
  """`module: import` for each import in the file that reaches tinygrad below its public API."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found += [a.name for a in node.names if a.name.split(".")[0] == "tinygrad" and a.name not in PUBLIC_MODULES]
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tinygrad":
      if node.module == "tinygrad.nn" or node.module.startswith("tinygrad.nn."): continue
      found += [f"{node.module}.{a.name}" for a in node.names if a.name not in PUBLIC.get(node.module, set())]
  return found

def test_only_the_engine_reaches_below_tinygrads_public_api():
  modules = [p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "engine.py"]
  assert len(modules) > 10
  found = {str(p.relative_to(PACKAGE)): names for p in modules if (names := below_public_api(p))}
  assert found == {}, f"import these through tinylora/engine.py: {found}"

def test_the_scan_sees_internal_imports(tmp_path):
  (f := tmp_path / "m.py").write_text("from tinygrad import Tensor, nn\nfrom tinygrad.nn.state import safe_load\n"
                                      "def g():\n  from tinygrad.helpers import TRAINING, Context\n  import tinygrad.uop.ops\n")
  assert below_public_api(f) == ["tinygrad.helpers.TRAINING", "tinygrad.helpers.Context", "tinygrad.uop.ops"]
  assert below_public_api(PACKAGE / "engine.py")  # the engine room itself does

def test_the_kernel_plan_cache_is_bounded():
  assert engine.planned_kernel.cache_info().maxsize is not None
