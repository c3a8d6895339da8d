"""Reading llama.cpp GGUF model files (llama, mistral and qwen2 architectures) into tinylora's Model.

The header is walked with tinygrad's own GGUF value readers (`tinygrad.llm.gguf`) and every tensor type tinygrad can
dequantize is dequantized by `ggml_data_to_tensor`. Q4_0, Q4_1 and Q8_0 are affine formats with 32 weights per block
and a float16 scale (and min), so they are repacked, without rounding, into `tinylora.quant`'s layout:
  Q4_1: w = d * q + m          -> scale d, bias m
  Q4_0: w = d * (q - 8)        -> scale d, bias -8d
  Q8_0: w = d * q (q: int8)    -> codes q + 128, scale d, bias -128d
(multiplying a float16 by a power of two is exact, and the dequantized values computed in float32 equal llama.cpp's).
"""
from __future__ import annotations
import io, os, pathlib, re
from dataclasses import dataclass
import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType
from tinygrad.llm.gguf import _GGML_QUANT, ggml_data_to_tensor, read_int32, read_int64, read_str, read_uint32, read_uint64, readers
from tinylora.errors import LoraError
from tinylora.quant import dequantize_array, pack_array

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
GGML_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "BF16": 30}
# packed types kept as tinylora.quant layers: ggml type -> (bits, bytes per 32-weight block)
PACKED = {2: (4, 18), 3: (4, 20), 8: (8, 34)}
_NATIVE = {0: np.float32, 1: np.float16}
# GGUF tensor name (after "blk.N.") -> HF module name (after "model.layers.N.")
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

@dataclass(frozen=True)
class TensorInfo:
  name: str
  shape: tuple[int, ...]  # numpy order (GGUF lists dimensions innermost first)
  ggml_type: int
  file: pathlib.Path
  offset: int  # absolute byte offset of the data in `file`

  @property
  def nbytes(self) -> int:
    n = int(np.prod(self.shape))
    if self.ggml_type in _GGML_QUANT:
      per_block, block_bytes = _GGML_QUANT[self.ggml_type]
      return n // per_block * block_bytes
    if self.ggml_type == 30: return 2 * n
    return n * np.dtype(_NATIVE[self.ggml_type]).itemsize

def _read_header(path: pathlib.Path) -> tuple[dict, list[TensorInfo]]:
  """The key/value metadata and the tensor directory of one GGUF file, with every offset checked against its size."""
  size = path.stat().st_size
  try:
    with open(path, "rb") as f:
      r = io.BufferedReader(f, 1 << 20)
      magic, version = r.read(4), read_int32(r)
      if magic != b"GGUF": raise LoraError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
      if version not in (2, 3): raise LoraError(f"{path}: GGUF version {version} is not supported (2 or 3)")
      n_tensors, n_kv = read_int64(r), read_int64(r)
      kv = {}
      for _ in range(n_kv):
        key, typ = read_str(r), read_int32(r)
        if typ not in readers: raise LoraError(f"{path}: metadata {key!r} has unknown value type {typ}")
        kv[key] = readers[typ](r)
      raw = [(read_str(r), tuple(read_uint64(r) for _ in range(read_uint32(r))), read_int32(r), read_uint64(r))
             for _ in range(n_tensors)]
      alignment = kv.get("general.alignment", 32)
      start = -(-r.tell() // alignment) * alignment
  except (EOFError, UnicodeDecodeError, ValueError, MemoryError, OverflowError) as e:  # struct.error is a ValueError
    raise LoraError(f"{path}: truncated or corrupt GGUF header ({type(e).__name__}: {e})") from None
  infos = []
  for name, dims, typ, off in raw:
    if typ not in _NATIVE and typ != 30 and typ not in _GGML_QUANT:
      raise LoraError(f"{path}: tensor {name!r} has GGML type {typ}, which tinygrad cannot read")
    info = TensorInfo(name, tuple(int(d) for d in reversed(dims)), typ, path, start + off)
    if info.offset + info.nbytes > size:
      raise LoraError(f"{path}: truncated: tensor {name!r} needs bytes up to {info.offset + info.nbytes}, the file has {size}")
    infos.append(info)
  return kv, infos

def split_paths(path: pathlib.Path, kv: dict) -> list[pathlib.Path]:
  """All files of a split set (`name-00001-of-0000N.gguf`), given its first file and that file's metadata."""
  if (count := kv.get("split.count", 1)) <= 1: return [path]
  if kv.get("split.no", 0) != 0: raise LoraError(f"{path}: part {kv['split.no'] + 1} of a split GGUF; open the first part")
  if not (m := re.match(r"^(.*)-00001-of-\d{5}\.gguf$", path.name)):
    raise LoraError(f"{path}: the first part of a split GGUF must be named NAME-00001-of-{count:05d}.gguf")
  paths = [path.with_name(f"{m.group(1)}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
  if missing := [p for p in paths if not p.exists()]:
    raise LoraError(f"{path}: split GGUF of {count} parts: part {missing[0].name} is missing")
  return paths

def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, TensorInfo]]:
  """Metadata and tensor directory of a GGUF file, or of a whole split set given its first part."""
  path = pathlib.Path(path)
  if not path.is_file(): raise FileNotFoundError(f"GGUF file not found: {path}")
  kv, infos = _read_header(path)
  for part in split_paths(path, kv)[1:]: infos += _read_header(part)[1]
  return kv, {i.name: i for i in infos}

def _bytes(info: TensorInfo) -> np.ndarray:
  return np.fromfile(info.file, np.uint8, count=info.nbytes, offset=info.offset)

def read_array(info: TensorInfo) -> np.ndarray:
  """The tensor as float32/float16 numpy data: native floats as stored, the packed types dequantized in float32 as
  llama.cpp does, everything else dequantized by tinygrad."""
  if info.ggml_type in _NATIVE: return _bytes(info).view(_NATIVE[info.ggml_type]).reshape(info.shape)
  if info.ggml_type in PACKED:
    codes, scales, biases = read_packed(info)
    return dequantize_array(codes, scales.astype(np.float32), biases.astype(np.float32), PACKED[info.ggml_type][0], 32)
  n = int(np.prod(info.shape))
  return ggml_data_to_tensor(Tensor(_bytes(info)), n, info.ggml_type).reshape(info.shape).float().numpy()

def read_packed(info: TensorInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A Q4_0 / Q4_1 / Q8_0 matrix (out, in) as tinylora.quant's (uint32 codes, float16 scales, float16 biases)."""
  bits, block_bytes = PACKED[info.ggml_type]
  blocks = _bytes(info).reshape(*info.shape[:-1], info.shape[-1] // 32, block_bytes)
  d = blocks[..., :2].copy().view(np.float16)[..., 0]
  if info.ggml_type == 8:
    q, bias = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d * np.float16(-128)
  else:
    qs = blocks[..., 4:] if info.ggml_type == 3 else blocks[..., 2:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # byte j holds weight j (low nibble) and weight j+16 (high)
    bias = blocks[..., 2:4].copy().view(np.float16)[..., 0] if info.ggml_type == 3 else d * np.float16(-8)
  return pack_array(q.reshape(info.shape), bits), d, bias

def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's convert_hf_to_gguf row permutation of llama Q/K projections (rotate_half -> interleaved RoPE);
  works on any array whose first axis is the output rows (weights, packed codes, scales)."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """convert_hf_to_gguf's permutation: the inverse of `unpermute_qk`."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

def hf_name(name: str) -> str | None:
  """The HF state-dict key of a GGUF tensor name (blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight)."""
  if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name):
    return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{m.group(3)}" if m.group(2) in LAYER_NAMES else None
  stem, _, kind = name.rpartition(".")
  return f"{TOP_NAMES[stem]}.{kind}" if stem in TOP_NAMES else None

def config_from_gguf(kv: dict, tensors: dict[str, TensorInfo], where: str) -> dict:
  """An HF config.json dict from GGUF metadata."""
  arch = kv.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise LoraError(f"{where}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
  def get(key: str, default=None):
    if (value := kv.get(f"{arch}.{key}", default)) is None: raise LoraError(f"{where}: GGUF metadata lacks {arch}.{key}")
    return value
  if "rope_freqs.weight" in tensors:
    raise LoraError(f"{where}: rope_freqs (llama3-style RoPE scaling stored as a tensor) is not supported yet")
  heads = get("attention.head_count")
  hidden = get("embedding_length")
  vocab = kv.get(f"{arch}.vocab_size") or len(kv.get("tokenizer.ggml.tokens", [])) or tensors["token_embd.weight"].shape[0]
  return {"model_type": arch, "architectures": [ARCHITECTURES[arch]], "hidden_size": hidden,
          "intermediate_size": get("feed_forward_length"), "num_hidden_layers": get("block_count"),
          "num_attention_heads": heads, "num_key_value_heads": get("attention.head_count_kv", heads),
          "head_dim": get("attention.key_length", hidden // heads), "vocab_size": vocab,
          "rms_norm_eps": get("attention.layer_norm_rms_epsilon"), "rope_theta": get("rope.freq_base", 10000.0),
          "max_position_embeddings": get("context_length", 2048), "tie_word_embeddings": "output.weight" not in tensors,
          "bos_token_id": kv.get("tokenizer.ggml.bos_token_id"), "eos_token_id": kv.get("tokenizer.ggml.eos_token_id")}

def read_weights(kv: dict, tensors: dict[str, TensorInfo], config: dict, where: str, dequantize: bool
                 ) -> tuple[dict[str, np.ndarray], dict]:
  """HF-named arrays (packed layers as `.weight` codes plus `.scales` / `.biases`) and the mlx-style `quantization`
  dict that describes the packed ones (empty when none are kept packed)."""
  weights, quantization = {}, {}
  for name, info in tensors.items():
    if (key := hf_name(name)) is None: raise LoraError(f"{where}: tensor {name!r} has no place in a {config['model_type']} model")
    module = key.rsplit(".", 1)[0]
    heads = {"self_attn.q_proj": config["num_attention_heads"], "self_attn.k_proj": config["num_key_value_heads"]}.get(
      module.split(".", 3)[-1]) if config["model_type"] != "qwen2" else None
    fix = (lambda a: unpermute_qk(a, heads)) if heads else (lambda a: a)
    if info.ggml_type in PACKED and not dequantize and key.endswith(".weight"):
      codes, scales, biases = read_packed(info)
      weights |= {key: fix(codes), f"{module}.scales": fix(scales), f"{module}.biases": fix(biases)}
      quantization[module] = {"bits": PACKED[info.ggml_type][0], "group_size": 32, "mode": "affine"}
    else: weights[key] = fix(read_array(info))
  if quantization:  # the most common format at the top level, as mlx-lm writes it; the others per layer
    formats = [tuple(q.items()) for q in quantization.values()]
    top = dict(max(set(formats), key=formats.count))
    quantization = {**top, **{m: q for m, q in quantization.items() if q != top}}
  return weights, quantization

def load_gguf(path: str | os.PathLike, dtype: DType | None = None, dequantize: bool = False):
  """A Model from a GGUF file (or the first file of a split set). Q4_0 / Q4_1 / Q8_0 weights stay packed as
  tinylora.quant layers unless `dequantize`; every other tensor is dequantized to `dtype` (default float16)."""
  from tinylora.models.llama import Model, ModelConfig
  from tinylora.models.pretrained import assign_weights
  from tinylora.quant import prepare_quantized
  kv, tensors = read_gguf(path)
  config = config_from_gguf(kv, tensors, str(path))
  weights, quantization = read_weights(kv, tensors, config, str(path), dequantize)
  model = Model(ModelConfig.from_hf(config))
  if quantization: prepare_quantized(model, quantization, set(weights))
  assign_weights(model, weights, dtype or dtypes.float16)
  model.gguf_metadata = {k: v for k, v in kv.items() if k.startswith("tokenizer.")}  # carried into files saved from it
  return model
