"""The formats package as a newcomer adding a format meets it: one registry of model and adapter formats whose modules
share one interface, a save -> load round trip through every adapter format by the public functions alone, no import
cycle anywhere in tinylora, and no format's file names or keys outside tinylora/formats."""
import ast, copy, inspect, pathlib, pickle, subprocess, sys
import numpy as np, pytest
from tinygrad import Tensor, nn
import tinylora as tl
from tinylora import LoraConfig, LoraError
from tinylora.cli import _parser
from tinylora.formats import ADAPTER_FORMATS, MODEL_FORMATS, adapter_path, detect_adapter_format
from tinylora.models import Model
from tinylora.tree import FrozenMapping

PACKAGE = pathlib.Path(tl.__file__).parent
CFG = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 32}

def params(f) -> list[str]: return list(inspect.signature(f).parameters)

def test_every_format_module_has_the_interface():
  for name, m in MODEL_FORMATS.items():
    assert params(m.detect) == ["path"] and params(m.read) == ["path", "dtype", "dequantize"], name
    assert params(m.write) == ["model", "path", "dtype", "quantization", "tokenizer"], name
    assert params(m.read_tokenizer) == ["path"], name
  for name, m in ADAPTER_FORMATS.items():
    assert params(m.write) == ["model", "layers", "config", "path"], name
    assert hasattr(m, "read") == hasattr(m, "detect"), f"{name}: a format tinylora reads is also detected"
    if hasattr(m, "read"): assert params(m.read) == ["model", "path"] and params(m.detect) == ["path"], name

def test_the_command_line_offers_the_registry():
  sub = next(a for a in _parser()._actions if a.dest == "command").choices
  for command in ("train", "convert"):
    assert next(a for a in sub[command]._actions if a.dest == "format").choices == list(ADAPTER_FORMATS)

def base() -> Model:
  Tensor.manual_seed(0)
  return Model.from_config(CFG)

@pytest.mark.parametrize("format", list(ADAPTER_FORMATS))
def test_every_adapter_format_saves_and_what_is_read_loads_back(tmp_path, format):
  if format == "gguf": pytest.importorskip("gguf")
  model = tl.inject(base(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
  tokens, path = Tensor([[1, 5, 9, 3]]), adapter_path(tmp_path, format)
  tl.save_adapter(model, path, format=format)
  assert path.exists()
  if not hasattr(ADAPTER_FORMATS[format], "read"):
    with pytest.raises(LoraError, match=f"unknown adapter format '{format}'"): tl.load_adapter(base(), path, format=format)
    return
  assert detect_adapter_format(path) == format
  expected = model(tokens).numpy()
  np.testing.assert_allclose(tl.load_adapter(base(), path)(tokens).numpy(), expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(tl.load_adapter(base(), path, format=format)(tokens).numpy(), expected, rtol=1e-6, atol=1e-6)

# ---- the house: no cycles, one home per format

def modules() -> dict[str, pathlib.Path]:
  out = {}
  for f in sorted(PACKAGE.rglob("*.py")):
    parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
  return out

def imports(path: pathlib.Path, top_level: bool) -> set[str]:
  """The tinylora modules `path` imports (at module level only, or anywhere), `from pkg import sub` counted as pkg.sub."""
  tree, found, names = ast.parse(path.read_text()), set(), set(modules())
  nodes = tree.body if top_level else list(ast.walk(tree))
  for node in nodes:
    if isinstance(node, ast.Import): found |= {a.name for a in node.names if a.name.startswith("tinylora")}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tinylora"):
      found.add(node.module)
      found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in names}
  return found

def test_no_module_level_import_cycle():
  graph = {m: imports(f, top_level=True) & set(modules()) for m, f in modules().items()}
  def visit(m: str, path: list[str]):
    assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
    for n in graph[m] - {m}:
      if not m.startswith(n + "."): visit(n, path + [m])  # a submodule's parent package is imported first anyway
  for m in graph: visit(m, [])

def test_every_module_imports_alone_in_a_fresh_interpreter():
  procs = {m: subprocess.Popen([sys.executable, "-c", f"import {m}"], cwd=PACKAGE.parent, stderr=subprocess.PIPE, text=True)
           for m in modules() if m != "tinylora.__main__"}
  failed = {m: p.communicate()[1].strip().splitlines()[-1:] for m, p in procs.items() if p.wait() != 0}
  assert not failed

def test_only_the_entry_points_import_formats():
  allowed = {"tinylora": None, "tinylora.cli": None, "tinylora.server": {"tinylora.formats"},
             "tinylora.train": {"tinylora.formats", "tinylora.formats.checkpoint"}}
  for m, f in modules().items():
    if m.startswith("tinylora.formats"): continue
    used = {n for n in imports(f, top_level=False) if n.startswith("tinylora.formats")}
    if m not in allowed: assert not used, f"{m} imports {used}: formats are reached through tinylora.formats' public functions"
    elif allowed[m] is not None: assert used <= allowed[m], (m, used)
  for m, f in modules().items():  # no function-local imports inside the package to dodge a cycle
    if m.startswith("tinylora.formats"): assert imports(f, top_level=True) == imports(f, top_level=False), m

# file names and tensor / metadata keys of the formats (not "lora_parameters": the command line's -c file takes mlx-lm's
# training config, which shares that name with mlx-lm's adapter_config.json)
FORMAT_KEYS = ["adapter_config.json", "adapter_model.safetensors", "adapters.safetensors", "base_model.model.",
               "lora_magnitude_vector", "latest.json", "optimizer.safetensors", "trainer_state.json",
               "model.safetensors", "blk.", "token_embd", "tokenizer.ggml", "peft_type"]

def strings(path: pathlib.Path) -> set[str]:
  """Every string constant of the code in `path` (f-string parts included), docstrings left out."""
  tree = ast.parse(path.read_text())
  docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
          and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
  return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs}

def test_no_format_keys_outside_the_formats_package():
  for m, f in modules().items():
    if m.startswith("tinylora.formats"): continue
    assert not (found := [k for k in FORMAT_KEYS if any(k in s for s in strings(f))]), f"{m} spells a format's keys: {found}"

def test_bolted_on_attributes_are_gone():
  model = Model.from_config(CFG)
  assert dict(model.file_metadata) == {} and not hasattr(model, "gguf_tokenizer") and not hasattr(model, "quantization")
  with pytest.raises(TypeError): model.file_metadata["tokenizer.ggml.model"] = "gpt2"  # read-only
  model.file_metadata = FrozenMapping({"tokenizer.ggml.tokens": ["a"] * 1000})
  assert dict(copy.deepcopy(model).file_metadata) == dict(pickle.loads(pickle.dumps(model.file_metadata))) == dict(model.file_metadata)
  assert not [k for k in nn.state.get_state_dict(model) if "file_metadata" in k]  # the walks do not descend into it
  from tinylora.tokenizer import HFTokenizer
  assert "file_metadata" in params(HFTokenizer.__init__) and not hasattr(HFTokenizer, "gguf_metadata")
