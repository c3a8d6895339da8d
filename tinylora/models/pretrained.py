"""Reading and writing Hugging Face model directories: config.json plus model.safetensors or a sharded index.

dtype policy: with `dtype=None` a model whose file holds only float16 tensors loads as float16 and anything else
(float32, bfloat16, mixed) as float32, because bfloat16 kernels do not compile on every tinygrad CPU backend. Pass
`dtype` to force one (bfloat16 only where the backend compiles it: tinylora.precision.check_dtype says what to install
otherwise). Integer tensors (quantized weights) keep their dtype.
"""
from __future__ import annotations
import os, pathlib
import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType
from tinylora.errors import LoraError
from tinylora.io import check_arrays, read_json, read_safetensors, write_json, write_safetensors
from tinylora.models.llama import Model, ModelConfig
from tinylora.precision import check_dtype
from tinylora.tree import unique_state_dict

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older Llama checkpoints saved; recomputed here
_SAVE_DTYPES = (dtypes.float32, dtypes.float16)

def load_pretrained(path: str | os.PathLike, dtype: DType | None = None, dequantize: bool = False) -> Model:
  """Loads a local HF model directory or a `.gguf` file (see tinylora/models/gguf.py: Q4_0/Q4_1/Q8_0 stay packed unless
  `dequantize`, other GGUF tensors load as `dtype`, float16 by default). Raises FileNotFoundError for a missing
  directory or file and LoraError for an unsupported config or weights that do not match it (missing, unexpected or
  mis-shaped keys)."""
  path = pathlib.Path(path)
  if dtype is not None: check_dtype(dtype)  # before any file is read: bfloat16 may not compile here
  if path.suffix == ".gguf":
    from tinylora.models.gguf import load_gguf
    return load_gguf(path, dtype, dequantize)
  if not path.is_dir(): raise FileNotFoundError(f"model directory not found: {path}")
  config = read_json(path / "config.json")
  model = Model(ModelConfig.from_hf(config))  # its lazy random init is replaced before it is ever realized
  weights = read_weights(path)
  if "quantization" in config:
    from tinylora.quant import prepare_quantized
    prepare_quantized(model, config["quantization"], set(weights))
  assign_weights(model, weights, dtype)
  return model

def read_weights(path: pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of `model.safetensors`, or of the shards listed in `model.safetensors.index.json`."""
  index = path / "model.safetensors.index.json"
  if not index.exists():
    if not (single := path / "model.safetensors").exists():
      raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    return read_safetensors(single)[0]
  weight_map = read_json(index).get("weight_map")
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
    raise LoraError(f"{index}: expected a weight_map object of tensor name -> shard file name, found {str(weight_map)[:80]}")
  weights: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    if not (shard_path := path / shard).exists(): raise FileNotFoundError(f"shard listed in {index} not found: {shard_path}")
    part = read_safetensors(shard_path)[0]
    if twice := sorted(set(part) & set(weights)): raise LoraError(f"{index}: tensor {twice[0]!r} is stored in {shard} and in another shard")
    weights.update(part)
  if missing := sorted(set(weight_map) - set(weights)):
    raise LoraError(f"{index}: key {missing[0]!r} is listed in weight_map but not found in shard {weight_map[missing[0]]}")
  return weights

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
    t.replace(new.realize())  # in place, so a tied lm_head keeps sharing the embedding tensor

def save_pretrained(model: Model, path: str | os.PathLike, dtype: DType | None = None, format: str = "hf",
                    quantization: str = "f16", tokenizer=None) -> None:
  """Writes the model, each file atomically. A LoRA-injected model must be merged first: its adapter tensors have no
  place in a model file.
  format="hf": directory `path` with config.json and model.safetensors (no lm_head.weight when tied), and the
  tokenizer's files when `tokenizer` is given; `dtype` (float32 or float16) casts the float tensors, None keeps them.
  format="gguf": one llama.cpp file `path` with 2-D weights in `quantization` ("f32", "f16", "q8_0", "q4_0", "q4_1";
  needs the `gguf` package) and the tokenizer and chat template of `tokenizer`, or of the GGUF the model was loaded from."""
  if format not in ("hf", "gguf"): raise LoraError(f"unknown model format {format!r}: expected 'hf' or 'gguf'")
  if dtype is not None and dtype not in _SAVE_DTYPES:
    raise LoraError(f"save_pretrained writes float32 or float16, not {dtype}")
  reference = unique_state_dict(Model(model.config))
  state = unique_state_dict(model)
  for key in state:
    base = key.rsplit(".", 1)[0]
    if key not in reference and not (key.endswith((".scales", ".biases")) and f"{base}.weight" in reference):
      raise LoraError(f"cannot save {key!r} in an HF model file; merge or remove LoRA adapters before save_pretrained")
  if format == "gguf":
    from tinylora.models.gguf import tokenizer_metadata, write_model
    metadata = tokenizer_metadata(tokenizer) if tokenizer is not None else getattr(model, "gguf_tokenizer", None)
    if metadata is None: raise LoraError("a GGUF file carries its tokenizer: pass tokenizer=load_tokenizer(model_dir)")
    return write_model(model, path, quantization, dict(metadata))
  arrays = {}
  for key, t in state.items():
    if dtype is not None and dtypes.is_float(t.dtype): t = t.cast(dtype)
    arrays[key] = t.numpy()
  float_types = {str(a.dtype) for a in arrays.values() if np.issubdtype(a.dtype, np.floating)}
  config = model.config.to_hf()
  config.pop("quantization", None)
  if any(k.endswith(".scales") for k in arrays): config["quantization"] = model.quantization  # set by tinylora.quant
  if len(float_types) == 1: config["torch_dtype"] = float_types.pop()
  path = pathlib.Path(path)
  write_safetensors(path / "model.safetensors", arrays, {"format": "pt"})
  (path / "model.safetensors.index.json").unlink(missing_ok=True)  # a stale index would win over the new file on load
  write_json(path / "config.json", config)
  if tokenizer is not None: tokenizer.save(path)
