"""The GGUF container shared by llama.cpp model files, LoRA adapter files and the tokenizers inside them: the header and
tensor directory (read with tinygrad's own GGUF value readers, through tinylora.engine), tensor data, packed Q4/Q8 repacking,
HF <-> GGUF tensor names of every family in tinylora.models.architectures (llama, mistral, qwen2, qwen3, gemma2, gemma3,
phi3, smollm3, olmo2, granite: norm placement, q/k norms and fused projections from each family's spec), the Q/K row
permutation of the families whose llama.cpp converter applies it, Gemma's stored 1 + w norms, `rope_freqs`, metadata
writing (llama.cpp's `gguf` package, an optional extra) and the tokenizer <-> `tokenizer.*` metadata both ways.

Q4_0, Q4_1 and Q8_0 are affine formats with 32 weights per block and a float16 scale (and min), so they are repacked,
without rounding, into `tinylora.quant`'s layout:
  Q4_1: w = d * q + m          -> scale d, bias m
  Q4_0: w = d * (q - 8)        -> scale d, bias -8d
  Q8_0: w = d * q (q: int8)    -> codes q + 128, scale d, bias -128d
(multiplying a float16 by a power of two is exact, and the dequantized values computed in float32 equal llama.cpp's).
"""
from __future__ import annotations
import contextlib, functools, io, json, os, pathlib, re, struct
from dataclasses import dataclass
from typing import Any, Iterator
import numpy as np
from tinygrad import Tensor
from tinylora.engine import (GGML_QUANT_BLOCKS, ggml_data_to_tensor, read_int32, read_int64, read_str, read_uint32,
                             read_uint64, readers)
from tinylora.errors import LoraError
from tinylora.io import atomic_path
from tinylora.models.architectures import ARCHITECTURES, Architecture, ModelConfig, Rope
from tinylora.quant import dequantize_array, pack_array
from tinylora.tokenizer import HFTokenizer, tokenizers_package

# packed types kept as tinylora.quant layers: ggml type -> (bits, bytes per 32-weight block)
PACKED = {2: (4, 18), 3: (4, 20), 8: (8, 34)}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
_NATIVE = {0: np.float32, 1: np.float16}
# GGUF tensor name (after "blk.N.") -> HF module name (after "model.layers.N."), by the family's spec: plain or fused
# (Phi-3's qkv_proj, and gate_up_proj as one ffn_up holding the gate rows, then the up rows) projections, and the norms
# where the family places them. HF's post_attention_layernorm is the pre-MLP norm (ffn_norm) of "pre" families but the
# attention output's norm (post_attention_norm) of "sandwich" (Gemma) and "post" (OLMo2) ones.
_PROJECTIONS = {False: {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj"},
                True: {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}}
_NORMS = {"pre": {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
          "sandwich": {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                       "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
          "post": {"post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")  # RoPE data, read into the config

# ---------------------------------------------------------------- reading

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
    if self.ggml_type in GGML_QUANT_BLOCKS:
      per_block, block_bytes = GGML_QUANT_BLOCKS[self.ggml_type]
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
  except (EOFError, UnicodeDecodeError, ValueError, MemoryError, OverflowError, struct.error) as e:
    raise LoraError(f"{path}: truncated or corrupt GGUF header ({type(e).__name__}: {e})") from None
  infos = []
  for name, dims, typ, off in raw:
    if typ not in _NATIVE and typ != 30 and typ not in GGML_QUANT_BLOCKS:
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

def detect(path: pathlib.Path) -> bool:
  """Whether `path` names a GGUF file (by its suffix: what is inside, model or adapter, each reader checks)."""
  return path.suffix == ".gguf" and not path.is_dir()

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

# ---------------------------------------------------------------- names and layouts

def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's convert_hf_to_gguf row permutation of llama Q/K projections (rotate_half -> interleaved RoPE);
  works on any array whose first axis is the output rows (weights, packed codes, scales)."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """convert_hf_to_gguf's permutation: the inverse of `unpermute_qk`."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

@functools.lru_cache(maxsize=None)
def layer_names(arch: Architecture) -> dict[str, str]:
  """GGUF tensor name (after "blk.N.") -> HF module name (after "model.layers.N.") of a family's decoder layer."""
  return {**_PROJECTIONS[arch.fused], "attn_output": "self_attn.o_proj", "ffn_down": "mlp.down_proj", **_NORMS[arch.norms],
          **(_QK_NORMS if arch.qk_norm else {})}

@functools.lru_cache(maxsize=None)
def _gguf_layer_names(arch: Architecture) -> dict[str, str]: return {hf: gg for gg, hf in layer_names(arch).items()}
_GGUF_TOP_NAMES = {hf: gg for gg, hf in TOP_NAMES.items()}

def qk_heads(config: ModelConfig, key: str) -> int | None:
  """The head count llama.cpp's converter permutes the rows of HF tensor `key` with: a Q or K projection's, for the
  families whose spec says it permutes them (None for anything else)."""
  if not config.arch.permute_qk: return None
  return {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}.get(
    key.rsplit(".", 1)[0].split(".", 3)[-1])

def norm_shift(key: str, arch: Architecture) -> float:
  """What llama.cpp's converter adds to HF tensor `key`: 1 to every RMSNorm weight of a family that scales by 1 + w
  (Gemma), which llama.cpp then scales by as is; 0 otherwise."""
  return 1.0 if arch.norm_plus_one and key.endswith("norm.weight") else 0.0

def family(arch: str, where: str) -> str:
  """The HF model_type a file of GGUF `general.architecture` `arch` reads as: the family of that name, else the first
  whose spec writes it (GGUF "llama" reads as llama; Mistral is written as llama, as llama.cpp does)."""
  if not (types := [t for t, a in ARCHITECTURES.items() if a.gguf == arch]):
    raise LoraError(f"{where}: GGUF architecture {arch!r} is not supported; supported: "
                    f"{', '.join(dict.fromkeys(a.gguf for a in ARCHITECTURES.values()))}")
  return arch if arch in types else types[0]

def hf_name(name: str, arch: Architecture) -> str | None:
  """The HF state-dict key of a GGUF tensor name in a family's file (blk.3.attn_q.weight ->
  model.layers.3.self_attn.q_proj.weight), None for a name the family has no place for."""
  if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name):
    names = layer_names(arch)
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}" if m.group(2) in names else None
  stem, _, kind = name.rpartition(".")
  return f"{TOP_NAMES[stem]}.{kind}" if stem in TOP_NAMES else None

def gguf_name(key: str, arch: Architecture) -> str:
  """The GGUF tensor name of a family's HF state-dict key (model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight)."""
  module, kind = key.rsplit(".", 1)
  if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module):
    return f"blk.{m.group(1)}.{_gguf_layer_names(arch)[m.group(2)]}.{kind}"
  return f"{_GGUF_TOP_NAMES[module]}.{kind}"

def rope_freqs(rope: Rope) -> np.ndarray:
  """llama.cpp's `rope_freqs` tensor for llama3 RoPE scaling: the factor each inverse frequency is divided by."""
  return (Rope(rope.theta, rope.dim).inv_freq(0) / rope.inv_freq(0)).astype(np.float32)

def llama3_scaling(factors: np.ndarray, head_dim: int, theta: float, where: str) -> dict:
  """HF's llama3 `rope_scaling` that gives llama.cpp's `rope_freqs` factors. Long wavelengths are divided by `factor`,
  short ones kept, and in between 1/f = (1 - smooth) / factor + smooth with smooth = (L / wavelen - low) / (high - low)
  linear in 1/wavelen: with two or more such entries the line gives low and high for L = 8192 (any L with the same
  line gives the same frequencies); else Llama 3.x's own low 1, high 4, L 8192. Checked by recomputing the factors."""
  factor, wavelen = float(factors.max()), 2 * np.pi / Rope(theta, head_dim).inv_freq(0).astype(np.float64)
  candidates, L = [(1.0, 4.0)], 8192.0
  if (medium := (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))).sum() >= 2:
    smooth = (1 / factors[medium].astype(np.float64) - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelen[medium], smooth, 1)  # slope = L / (high - low), intercept = -low / (high - low)
    candidates.insert(0, (-intercept * L / slope, (1 - intercept) * L / slope))
  for low, high in candidates:
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low), "high_freq_factor": float(high),
               "original_max_position_embeddings": int(L)}
    rope = Rope(theta, head_dim, (("rope_type", "llama3"), *sorted((k, float(v)) for k, v in scaling.items() if k != "rope_type")))
    if np.allclose(rope_freqs(rope), factors, rtol=1e-5):
      return scaling
  raise LoraError(f"{where}: rope_freqs factors ({factors.min():.4g}..{factor:.4g}) do not follow llama3's RoPE scaling, "
                  "the only pattern supported")

# ---------------------------------------------------------------- writing (llama.cpp's `gguf` package, optional extra)

def gguf_package():
  try: import gguf
  except ImportError as e: raise ImportError("writing GGUF files needs llama.cpp's 'gguf' package: pip install tinylora[gguf]") from e
  return gguf

@contextlib.contextmanager
def writer(path: str | os.PathLike, config: ModelConfig, kind: str) -> Iterator[tuple[Any, Any]]:
  """Yields (GGUFWriter, the gguf package) for one file of general.type `kind` ("model" or "adapter") of a model with
  `config`; on leaving, writes header, metadata and tensors and renames the file into place atomically."""
  gguf = gguf_package()
  llama_cpp_arch(gguf, config)
  with atomic_path(path) as tmp:
    w = gguf.GGUFWriter(str(tmp), config.arch.gguf)
    w.add_type(kind)
    yield w, gguf
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

def llama_cpp_arch(gguf: Any, config: ModelConfig) -> Any:
  """The gguf package's MODEL_ARCH of a model's family, refused with LoraError where llama.cpp defines none."""
  if (kind := next((k for k, name in gguf.MODEL_ARCH_NAMES.items() if name == config.arch.gguf), None)) is None:
    raise LoraError(f"llama.cpp defines no GGUF architecture {config.arch.gguf!r} (model_type {config.model_type!r})")
  return kind

def defined_tensors(gguf: Any, config: ModelConfig) -> set[str]:
  """The tensor names (blk.{bid}.attn_q, output, ...) llama.cpp defines for a model's GGUF architecture."""
  return {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[llama_cpp_arch(gguf, config)]}

def add_value(w, key: str, value) -> None:
  """One metadata value with the GGUF type llama.cpp expects for it (token ids uint32, flags bool, lists typed by item)."""
  if isinstance(value, bool): w.add_bool(key, value)
  elif isinstance(value, int): w.add_uint32(key, value)
  elif isinstance(value, float): w.add_float32(key, value)
  elif isinstance(value, str): w.add_string(key, value)
  elif isinstance(value, list) and value:
    w.add_array(key, value)

# ---------------------------------------------------------------- tokenizers <-> `tokenizer.*` metadata

def tokenizer_metadata(tokenizer: HFTokenizer) -> dict:
  """GGUF `tokenizer.*` metadata for an HFTokenizer: the metadata it was read from, or, for a byte-level BPE
  tokenizer.json, its vocabulary, merges, token types (special added tokens are control tokens), special token ids,
  whether bos is added, and the chat template."""
  if tokenizer.file_metadata: return dict(tokenizer.file_metadata)
  spec = json.loads(tokenizer.tokenizer.to_str())
  kinds = {spec.get("decoder", {}).get("type"), *(p.get("type") for p in spec.get("pre_tokenizer", {}).get("pretokenizers", []))}
  if spec["model"]["type"] != "BPE" or not ({"ByteLevel"} & (kinds | {spec.get("pre_tokenizer", {}).get("type")})):
    raise LoraError("only byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM, GPT-2 style) can be written to GGUF")
  vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
  tokens = [f"[PAD{i}]" for i in range(max(vocab.values()) + 1)]
  for token, i in vocab.items(): tokens[i] = token
  added = {t["id"]: t["special"] for t in spec.get("added_tokens", [])}
  types_ = [(CONTROL if added[i] else USER_DEFINED) if i in added else 1 for i in range(len(tokens))]
  merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
  probe = tokenizer.encode("a", add_special_tokens=True)
  out = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
         "tokenizer.ggml.token_type": types_, "tokenizer.ggml.merges": merges,
         "tokenizer.ggml.add_bos_token": tokenizer.bos_id is not None and probe[:1] == [tokenizer.bos_id]}
  for key, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("padding", tokenizer.pad_id)):
    if i is not None: out[f"tokenizer.ggml.{key}_token_id"] = i
  if tokenizer.chat_template: out["tokenizer.chat_template"] = tokenizer.chat_template
  return out

def tokenizer_keys(kv: dict) -> dict:
  """The tokenizer's part of GGUF metadata: what a model or tokenizer read from a GGUF carries into GGUFs saved later."""
  return {k: v for k, v in kv.items() if k.startswith("tokenizer.")}

# pre-tokenizer splits of byte-level GGUF vocabularies by `tokenizer.ggml.pre`, as transformers' GGUF loader applies them
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
GGUF_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
               "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}

def _byte_alphabet() -> set[str]:
  """The 256 characters byte-level BPE spells bytes with (GPT-2's bytes_to_unicode)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  return {chr(b) for b in printable} | {chr(256 + i) for i in range(256 - len(printable))}

def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
  """BPE merges of a SentencePiece vocabulary that has scores but no merges (transformers' generate_merges)."""
  merges = []
  for piece, score in scores.items():
    local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
    merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
  return [(l, r) for l, r, _ in sorted(merges, key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)]

def read_tokenizer(kv: dict, where: str = "GGUF") -> HFTokenizer:
  """The tokenizer in GGUF metadata, built as transformers' GGUF loader builds it: byte-level BPE ("gpt2": Llama 3,
  Qwen2, SmolLM, ...) or SentencePiece BPE ("llama": Llama 2, Mistral), with control tokens special, user-defined
  tokens added, bos/eos added as `add_bos_token` / `add_eos_token` say, and the chat template."""
  tk = tokenizers_package()
  kind, tokens = kv.get("tokenizer.ggml.model"), kv.get("tokenizer.ggml.tokens")
  if kind not in ("gpt2", "llama") or not tokens:
    raise LoraError(f"{where}: GGUF tokenizer model {kind!r} is not supported (byte-level 'gpt2' or SentencePiece 'llama')")
  vocab, types = {t: i for i, t in enumerate(tokens)}, kv.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  merges = [tuple(m.split(" ", 1)) for m in kv["tokenizer.ggml.merges"]] if "tokenizer.ggml.merges" in kv else None
  if kind == "gpt2":
    tokenizer = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges or [], dropout=None, continuing_subword_prefix="",
                                           end_of_word_suffix="", fuse_unk=False))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split := GGUF_SPLITS.get(kv.get("tokenizer.ggml.pre")):
      tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence([tk.pre_tokenizers.Split(tk.Regex(split), behavior="isolated"),
                                                            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = tk.decoders.ByteLevel()
    alphabet = _byte_alphabet()
    control = [t for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= alphabet]
  else:
    if merges is None: merges = _merges_from_scores(vocab, dict(zip(tokens, kv.get("tokenizer.ggml.scores", [0.0] * len(tokens)))))
    tokenizer = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = tk.decoders.Sequence([tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(), tk.decoders.Fuse(),
                                              tk.decoders.Strip(" ", 1, 0)])
    control = [t for t, ty in zip(tokens, types) if ty == CONTROL]
  special = {name: tokens[i] for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                                               ("pad_token", "padding"))
             if isinstance(i := kv.get(f"tokenizer.ggml.{key}_token_id"), int) and 0 <= i < len(tokens)}
  tokenizer.add_special_tokens([tk.AddedToken(t, normalized=False, special=True) for t in control + list(special.values())])
  tokenizer.add_tokens([tk.AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])
  add_bos = kv.get("tokenizer.ggml.add_bos_token", kind == "llama") and "bos_token" in special
  add_eos = kv.get("tokenizer.ggml.add_eos_token", False) and "eos_token" in special
  bos, eos = special.get("bos_token"), special.get("eos_token")
  single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
  pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
  tokenizer.post_processor = tk.processors.TemplateProcessing(
    single=single, pair=pair, special_tokens=[(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on])
  return HFTokenizer(tokenizer, {**special, "chat_template": kv.get("tokenizer.chat_template")}, tokenizer_keys(kv))
