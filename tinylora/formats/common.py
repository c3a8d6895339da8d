"""What the format modules share: assigning a model file's arrays to a Model, and for adapters the one load path (every
tensor checked against the model before it is touched, then injected), the saved adapter's layers, and the adapter
directory layout PEFT and mlx-lm share (adapter_config.json beside one safetensors file that records its config's
digest)."""
from __future__ import annotations
import dataclasses, hashlib, json, pathlib
from typing import Any, Callable
import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType
from tinylora.config import LoraConfig
from tinylora.errors import LoraError
from tinylora.io import check_arrays, read_json, read_safetensors, write_json, write_safetensors
from tinylora.lora import Adapter, adaptable_linears, inject, list_adapters, lora_layers, with_targets
from tinylora.models.decoder import Model
from tinylora.tree import unique_state_dict

# ---------------------------------------------------------------- models

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older Llama checkpoints saved; recomputed here

def assign_weights(model: Model, weights: dict[str, np.ndarray], dtype: DType | None = None) -> None:
  """Replaces every parameter with the array of the same key, checking the key sets and shapes first."""
  state = unique_state_dict(model)
  ignored = {k for k in weights if k.endswith(_IGNORED_SUFFIXES) or (k == "lm_head.weight" and model.config.tie_word_embeddings)}
  check_arrays("checkpoint", weights, {k: t.shape for k, t in state.items()}, ignored)
  floats = [a for a in weights.values() if np.issubdtype(a.dtype, np.floating)]
  if dtype is None: dtype = dtypes.float16 if floats and all(a.dtype == np.float16 for a in floats) else dtypes.float32
  for key, t in state.items():
    new = Tensor(weights[key], device=t.device)
    if np.issubdtype(weights[key].dtype, np.floating) and new.dtype != dtype: new = new.cast(dtype)
    t.replace(new)  # in place, so a tied lm_head keeps sharing the embedding tensor
  Tensor.realize(*state.values())  # together: each Tensor.realize walks every live tensor

def check_plain(model: Model) -> None:
  """Refuses a model holding tensors a model file has no place for (LoRA adapters not merged yet)."""
  reference = unique_state_dict(Model(model.config))
  for key in unique_state_dict(model):
    base = key.rsplit(".", 1)[0]
    if key not in reference and not (key.endswith((".scales", ".biases")) and f"{base}.weight" in reference):
      raise LoraError(f"cannot save {key!r} in a model file; merge or remove LoRA adapters before save_pretrained")

# ---------------------------------------------------------------- adapters: saving

def saved_adapter(model: Any, adapter_name: str | None) -> tuple[dict[str, Adapter], LoraConfig]:
  """The named (default: active) adapter of every linear holding it, by path, and its config."""
  if adapter_name is not None and adapter_name not in list_adapters(model):
    raise LoraError(f"no adapter named {adapter_name!r} to save; the model has {list_adapters(model) or 'none'}")
  layers = lora_layers(model, adapter_name)
  if not layers: raise LoraError("model has no LoRA adapters to save")
  adapters = {p: l.adapters[adapter_name or l.active] for p, l in layers.items()}
  if bare := [p for p, a in adapters.items() if a.config is None]:
    raise LoraError(f"{bare[0]} holds a LoraLinear built by hand, without the LoraConfig an adapter file records; add "
                    f"adapters with inject(model, config) to save them")
  return adapters, next(iter(adapters.values())).config

def adapter_tensors(a: Adapter) -> dict[str, Tensor]:
  """An adapter's tensors by format-neutral name: "A" (r, in), "B" (out, r) and, for DoRA, "magnitude" (out,)."""
  return {"A": a.lora_A, "B": a.lora_B} | ({"magnitude": a.magnitude} if a.use_dora else {})

def finite_arrays(tensors: dict[str, Tensor]) -> dict[str, np.ndarray]:
  """The tensors as float32 numpy arrays, refusing any non-finite value before a file is written."""
  arrays = {k: t.float().numpy() for k, t in tensors.items()}
  if bad := [k for k, a in arrays.items() if not np.isfinite(a).all()]:
    raise LoraError(f"refusing to save non-finite adapter tensors: {', '.join(bad[:5])}")
  return arrays

# ---------------------------------------------------------------- adapters: loading

@dataclasses.dataclass(frozen=True)
class AdapterFile:
  """What an adapter format's `read(model, path)` hands the shared loader: the config, the tensors as the file stores
  them, and how to find them. `key(path, name)` is the file's key of tensor `name` ("A", "B", "magnitude") of the
  adapter at module `path`; `transposed`: A and B are stored (in, r) and (r, out); `scale`: one scale used as is for
  every layer (None: the config's per-layer scale); `verify` runs after every tensor passed its checks (a format's own
  consistency check). `config_file` and `weights_file` are the names errors give."""
  config: LoraConfig
  tensors: dict[str, np.ndarray]
  key: Callable[[str, str], str]
  config_file: str
  weights_file: str
  transposed: bool = False
  scale: float | None = None
  verify: Callable[[], None] = lambda: None

def inject_checked(model: Any, file: AdapterFile, adapter_name: str) -> Any:
  """Checks every key and shape of `file` against what its config builds on this model, then injects it as adapter
  `adapter_name`: on any error the model is left exactly as it was."""
  config, key = with_targets(model, file.config), file.key
  linears = {p: s for p, s in adaptable_linears(model).items() if config.matches(p)}
  if not linears:
    raise LoraError(f"{file.config_file}: target_modules={config.target_modules!r} matches no linear in the model; "
                    f"linears are: {', '.join(sorted(adaptable_linears(model)))}")
  expected = {}  # shapes as stored in the file
  for p, (out_f, in_f) in linears.items():
    r = config.rank(p)
    expected[key(p, "A")], expected[key(p, "B")] = ((in_f, r), (r, out_f)) if file.transposed else ((r, in_f), (out_f, r))
    if config.use_dora: expected[key(p, "magnitude")] = (out_f,)
  a_keys = {key(p, "A") for p in linears}
  def rank_note(k: str, found: tuple[int, ...]) -> str:  # one side of a matrix agrees, so the other is the rank
    shape = expected[k]
    if len(found) != 2 or len(shape) != 2 or (found[0] != shape[0]) == (found[1] != shape[1]): return ""
    return f"; the config's rank is {shape[(k in a_keys) == file.transposed]}"
  check_arrays(file.weights_file, file.tensors, expected, floats=True, note=rank_note)
  file.verify()

  def make(p: str, base: Any) -> dict:
    A, B = (file.tensors[key(p, n)].astype(np.float32) for n in "AB")
    if file.transposed: A, B = A.T, B.T
    m = Tensor(file.tensors[key(p, "magnitude")].astype(np.float32)) if config.use_dora else None
    return dict(r=config.rank(p), scale=config.scale(p) if file.scale is None else file.scale, dropout=config.lora_dropout,
                weights=(Tensor(np.ascontiguousarray(A)), Tensor(np.ascontiguousarray(B))), magnitude=m)
  return inject(model, config, make, adapter_name)

# ---------------------------------------------------------------- adapter directories (PEFT, mlx-lm)

CONFIG_FILE = "adapter_config.json"
# The weights file carries a digest of the config saved with it: the two files are renamed into place one after the
# other, so a save killed in between (over an older adapter) would otherwise pair new weights with an old scale.
CONFIG_TAG = "tinylora.config_sha256"
def _config_digest(cfg: dict) -> str: return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()

def read_config(path: pathlib.Path) -> dict:
  """adapter_config.json of adapter directory `path`."""
  if not path.is_dir(): raise FileNotFoundError(f"adapter directory not found: {path}")
  return read_json(path / CONFIG_FILE)

def config_has(path: pathlib.Path, keys: tuple[str, ...]) -> bool:
  """Whether `path` is an adapter directory whose config holds any of `keys` (what tells PEFT's from mlx-lm's)."""
  return path.is_dir() and (path / CONFIG_FILE).is_file() and any(k in read_json(path / CONFIG_FILE) for k in keys)

def unknown_directory(path: pathlib.Path, signatures: list[str]) -> Exception:
  """The error for an adapter no format detects: a missing directory, or a config none of `signatures` describes."""
  cfg = read_config(path)
  return LoraError(f"{path / CONFIG_FILE}: unknown adapter format: neither {' nor '.join(signatures)}; found keys {sorted(cfg)}")

def write_directory(path: pathlib.Path, weights: str, cfg: dict, arrays: dict[str, np.ndarray], tag: str) -> None:
  """Writes `arrays` to `path/weights` (safetensors metadata format=`tag` and the config's digest), then `cfg` to
  adapter_config.json, each atomically: a crash never pairs a new config with old weights."""
  write_safetensors(path / weights, arrays, {"format": tag, CONFIG_TAG: _config_digest(cfg)})
  write_json(path / CONFIG_FILE, cfg)

def read_weights(path: pathlib.Path, weights: str, cfg: dict) -> tuple[dict[str, np.ndarray], Callable[[], None]]:
  """The arrays of `path/weights`, and a check that they were saved with config `cfg` (when the file records one)."""
  file = path / weights
  if not file.exists(): raise FileNotFoundError(f"adapter weights not found: {file}")
  tensors, metadata = read_safetensors(file)
  def verify():
    if CONFIG_TAG in metadata and metadata[CONFIG_TAG] != _config_digest(cfg):
      raise LoraError(f"{file} was saved with a different {CONFIG_FILE} than the one beside it (an interrupted save?)")
  return tensors, verify
