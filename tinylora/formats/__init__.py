"""Every file format tinylora reads or writes, one module each, behind load_pretrained / save_pretrained /
load_tokenizer / load_adapter / save_adapter.

MODEL_FORMATS and ADAPTER_FORMATS are the one list of formats. A model format module has `detect(path) -> bool`,
`read(path, dtype, dequantize) -> Model`, `write(model, path, dtype, quantization, tokenizer)` and
`read_tokenizer(path)`. An adapter format module has `write(model, layers, config, path)` and, where tinylora reads it,
`detect(path) -> bool` and `read(model, path) -> common.AdapterFile` (what the shared, check-everything-first loader
needs). Adding a format is one module and one registry entry. The Trainer's checkpoints are formats/checkpoint.py."""
from __future__ import annotations
import os, pathlib
from types import ModuleType
from typing import Any
from tinygrad import dtypes
from tinygrad.dtype import DType
from tinylora.errors import LoraError
from tinylora.formats import gguf_adapter, gguf_model, hf, mlx, peft
from tinylora.formats.common import check_plain, inject_checked, saved_adapter, unknown_directory
from tinylora.lora import DEFAULT, list_adapters
from tinylora.models.decoder import Model
from tinylora.precision import check_dtype
from tinylora.tokenizer import HFTokenizer

MODEL_FORMATS: dict[str, ModuleType] = {"hf": hf, "gguf": gguf_model}
ADAPTER_FORMATS: dict[str, ModuleType] = {"peft": peft, "mlx": mlx, "gguf": gguf_adapter}
_SAVE_DTYPES = (dtypes.float32, dtypes.float16)

def _choose(registry: dict[str, ModuleType], kind: str, name: str, action: str) -> ModuleType:
  """The module of format `name`, if it can do `action` ("read" or "write"); else a LoraError listing those that can."""
  able = [repr(n) for n, m in registry.items() if hasattr(m, action)]
  if repr(name) not in able:
    raise LoraError(f"unknown {kind} format {name!r}: expected {' or '.join([', '.join(able[:-1]), able[-1]] if able[1:] else able)}")
  return registry[name]

def _detect(registry: dict[str, ModuleType], path: pathlib.Path) -> str | None:
  return next((name for name, m in registry.items() if hasattr(m, "detect") and m.detect(path)), None)

# ---------------------------------------------------------------- models and tokenizers

def load_pretrained(path: str | os.PathLike, dtype: DType | None = None, dequantize: bool = False) -> Model:
  """Loads a local HF model directory or a `.gguf` file (Q4_0/Q4_1/Q8_0 stay packed unless `dequantize`). Float
  tensors load as `dtype`; with None, a GGUF's as float32 and an HF directory's by its own types: float16 when every
  float tensor is float16, else float32 (tinylora/formats/hf.py). Raises
  FileNotFoundError for a missing directory or file and LoraError for an unsupported config or weights that do not
  match it (missing, unexpected or mis-shaped keys)."""
  path = pathlib.Path(path)
  if dtype is not None: check_dtype(dtype)  # before any file is read: bfloat16 may not compile here
  if (format := _detect(MODEL_FORMATS, path)) is None: raise FileNotFoundError(f"model directory not found: {path}")
  return MODEL_FORMATS[format].read(path, dtype, dequantize)

def save_pretrained(model: Model, path: str | os.PathLike, dtype: DType | None = None, format: str = "hf",
                    quantization: str = "f16", tokenizer: HFTokenizer | None = None) -> None:
  """Writes the model, each file atomically. A LoRA-injected model must be merged first: its adapter tensors have no
  place in a model file.
  format="hf": directory `path` with config.json and model.safetensors (no lm_head.weight when tied), and the
  tokenizer's files when `tokenizer` is given; `dtype` (float32 or float16) casts the float tensors, None keeps them.
  format="gguf": one llama.cpp file `path` with 2-D weights in `quantization` ("f32", "f16", "q8_0", "q4_0", "q4_1";
  needs the `gguf` package) and the tokenizer and chat template of `tokenizer`, or of the GGUF the model was loaded from."""
  module = _choose(MODEL_FORMATS, "model", format, "write")
  if dtype is not None and dtype not in _SAVE_DTYPES:
    raise LoraError(f"save_pretrained writes float32 or float16, not {dtype}")
  check_plain(model)
  module.write(model, pathlib.Path(path), dtype, quantization, tokenizer)

def load_tokenizer(path: str | os.PathLike) -> HFTokenizer:
  """Loads `tokenizer.json` (and `tokenizer_config.json` when present) from a model directory or the file itself, or
  the tokenizer and chat template in a `.gguf` file's metadata. Needs the optional packages: pip install
  tinylora[tokenizers]."""
  path = pathlib.Path(path)
  return MODEL_FORMATS[_detect(MODEL_FORMATS, path) or "hf"].read_tokenizer(path)  # hf also reads a tokenizer.json given as is

def detect_model_format(path: str | os.PathLike) -> str | None:
  """The name of the format of the model at `path` (a key of MODEL_FORMATS), None when none detects it."""
  return _detect(MODEL_FORMATS, pathlib.Path(path))

# ---------------------------------------------------------------- adapters

def detect_adapter_format(path: str | os.PathLike) -> str:
  """The name of the format of the adapter at `path`: the first in ADAPTER_FORMATS whose `detect` accepts it."""
  path = pathlib.Path(path)
  if (format := _detect(ADAPTER_FORMATS, path)) is None:
    raise unknown_directory(path, [m.SIGNATURE for m in ADAPTER_FORMATS.values() if hasattr(m, "detect")])
  return format

def adapter_path(directory: str | os.PathLike, format: str) -> pathlib.Path:
  """Where an adapter in `format` goes in output directory `directory`: the directory itself, or for a one-file format
  the file its module names (FILE_NAME) inside it."""
  return pathlib.Path(directory) / getattr(_choose(ADAPTER_FORMATS, "adapter", format, "write"), "FILE_NAME", "")

def save_adapter(model: Any, path: str | os.PathLike, format: str = "peft", adapter_name: str | None = None) -> None:
  """Writes the model's adapter `adapter_name` (default: the active one) as HF PEFT (`format="peft"`) or mlx-lm
  (`"mlx"`) files in directory `path`, or as one llama.cpp LoRA file `path` (`"gguf"`, needs the `gguf` package).
  Each file is written atomically; the weights go first, so a crash never pairs a new config with old weights."""
  layers, config = saved_adapter(model, adapter_name)
  _choose(ADAPTER_FORMATS, "adapter", format, "write").write(model, layers, config, pathlib.Path(path))

def load_adapter(model: Any, path: str | os.PathLike, format: str | None = None, adapter_name: str = DEFAULT) -> Any:
  """Reads a PEFT or mlx-lm adapter directory or a llama.cpp LoRA `.gguf` file (format detected unless given) and adds
  it to `model` as adapter `adapter_name`, beside any already there (the model's first adapter is the active one; see
  set_adapter).
  Every tensor is checked against the model first: on any error the model is left exactly as it was."""
  if adapter_name in (names := list_adapters(model)):
    raise LoraError(f"the model already has an adapter named {adapter_name!r} (adapters: {names}); load it under another adapter_name")
  path = pathlib.Path(path)
  module = _choose(ADAPTER_FORMATS, "adapter", format or detect_adapter_format(path), "read")
  return inject_checked(model, module.read(model, path), adapter_name)
