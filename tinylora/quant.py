"""mlx-lm "affine" quantization (the QLoRA base): packed layers that load mlx-lm checkpoints as they are and dequantize
inside the matmul kernels (on the CPU at training sizes, into a transient float buffer per product instead), plus a
numpy reference that is bit-exact with `mx.quantize` on mlx's CPU backend.

Layout (mlx `mx.quantize(w, group_size, bits, mode="affine")`): each row of `weight` (uint32, (out, in*bits/32)) is a
little-endian bit stream in which value j sits in bits [j*bits, (j+1)*bits); for 2/4/8 bits no value crosses a word.
`scales` and `biases` hold one value per `group_size` consecutive inputs and w = scale * q + bias.
"""
from __future__ import annotations
import functools, math
from typing import Any, Callable, Iterator
import numpy as np
from tinygrad import Tensor, UOp, dtypes, function, nn
from tinygrad.dtype import DType
from tinylora.device_policy import on_device
from tinylora.errors import LoraError
from tinylora.tree import named_modules, replace_module

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
MODE = "affine"

def check_quant_params(bits: int, group_size: int, mode: str = MODE) -> None:
  """Raises LoraError naming the option when tinylora cannot run this mlx quantization."""
  if mode != MODE: raise LoraError(f"quantization mode {mode!r} is not supported; tinylora supports mode {MODE!r} only")
  if bits not in BITS: raise LoraError(f"quantization bits={bits!r} is not supported; allowed bits: {list(BITS)}")
  if group_size not in GROUP_SIZES:
    raise LoraError(f"quantization group_size={group_size!r} is not supported; allowed group_size: {list(GROUP_SIZES)}")

def _check_in_features(in_features: int, group_size: int) -> None:
  if in_features % group_size: raise LoraError(f"in_features={in_features} is not divisible by group_size={group_size}")

# ---------------------------------------------------------------- numpy reference

def pack_array(q: np.ndarray, bits: int) -> np.ndarray:
  """Packs integer codes (..., n) in [0, 2**bits) into uint32 words (..., n*bits/32), mlx's layout."""
  if 8 % bits == 0:  # whole values per byte: byte k holds values k*per .. k*per+per-1, lowest bits first
    per, q = 8 // bits, q.astype(np.uint8)
    packed = sum((q[..., i::per] << (i * bits)).astype(np.uint8) for i in range(per))
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32)
  stream = np.unpackbits(q.astype(np.uint8)[..., None], axis=-1, bitorder="little")[..., :bits]
  packed = np.packbits(stream.reshape(*q.shape[:-1], -1), axis=-1, bitorder="little")
  return np.ascontiguousarray(packed).view("<u4").astype(np.uint32)

def unpack_array(wq: np.ndarray, bits: int) -> np.ndarray:
  """Inverse of `pack_array`: uint32 words (..., m) -> uint8 codes (..., m*32/bits)."""
  stream = np.unpackbits(np.ascontiguousarray(wq.astype("<u4")).view(np.uint8), axis=-1, bitorder="little")
  return (stream.reshape(*wq.shape[:-1], -1, bits) << np.arange(bits, dtype=np.uint8)).sum(-1, dtype=np.uint8)

def quantize_array(w: np.ndarray, bits: int = 4, group_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Returns (packed uint32, scales, biases) as mlx's CPU `mx.quantize` computes them: float32 arithmetic, the scale
  snapped so the group edge of larger magnitude is exactly representable, scales/biases stored in w's dtype."""
  check_quant_params(bits, group_size)
  _check_in_features(w.shape[-1], group_size)
  g = w.astype(np.float32).reshape(*w.shape[:-1], -1, group_size)
  n_bins = np.float32(2**bits - 1)
  w_max, w_min = g.max(-1, keepdims=True), g.min(-1, keepdims=True)
  neg_edge = np.abs(w_min) > np.abs(w_max)
  scale = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7))
  scale = np.where(neg_edge, scale, -scale)
  edge = np.where(neg_edge, w_min, w_max)
  q0 = np.rint(edge / scale)
  scale = np.where(q0 != 0, edge / np.where(q0 != 0, q0, 1), scale)
  bias = np.where(q0 != 0, edge, np.float32(0))
  q = np.clip(np.rint((g - bias) / scale), 0, n_bins).astype(np.uint8)
  out_dtype = w.dtype if w.dtype in (np.float16, np.float32) else np.float32
  return pack_array(q.reshape(w.shape), bits), scale[..., 0].astype(out_dtype), bias[..., 0].astype(out_dtype)

def dequantize_array(wq: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int = 4, group_size: int = 64) -> np.ndarray:
  """(..., in) weights computed in the scales' dtype, as mlx does (bit-exact with mx.dequantize on CPU)."""
  q = unpack_array(wq, bits).astype(scales.dtype).reshape(*scales.shape, group_size)
  return (q * scales[..., None] + biases.astype(scales.dtype)[..., None]).reshape(*scales.shape[:-1], -1)

# ---------------------------------------------------------------- tinygrad

def _unpack(wq: Tensor, bits: int) -> Tensor:
  """uint32 words (..., m) -> uint32 codes (..., m*32/bits), all shifts and masks so it fuses into the consumer."""
  if 32 % bits == 0:
    shifts = Tensor.arange(0, 32, bits, dtype=dtypes.uint32).to(wq.device)
    return ((wq.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(-2)
  # 3/5/6 bits straddle words: split the stream into single bits and reassemble each value from `bits` of them
  stream = (wq.unsqueeze(-1) >> Tensor.arange(32, dtype=dtypes.uint32).to(wq.device)) & 1
  stream = stream.reshape(*wq.shape[:-1], -1, bits)
  return sum((stream[..., k] << k for k in range(1, bits)), stream[..., 0])

def dequantize_tensor(wq: Tensor, scales: Tensor, biases: Tensor, bits: int, group_size: int, dtype: DType) -> Tensor:
  """Lazy (..., in) weights in `dtype`; nothing is realized, so the caller's kernel does the dequantization."""
  q = _unpack(wq, bits).cast(dtype).unflatten(-1, (-1, group_size))
  return (q * scales.cast(dtype).unsqueeze(-1) + biases.cast(dtype).unsqueeze(-1)).flatten(-2)

# ---- packed matmuls on the CPU
# A matmul whose right operand is dequantized inside the kernel recomputes the unpacking for every multiply-add and
# splits the reduction over words and nibbles, which gets no matmul kernel shape (tinylora.device_policy). On the CPU a
# packed linear instead dequantizes its weight into a float buffer of its own right before each product, forward
# (x @ W.T) and input gradient (dy @ W, against W's transpose as tinylora.device_policy.linear), and multiplies with
# plain float matmuls. Each product is a precompiled tinygrad function over the activation and the packed tensors, so
# the scheduler places the dequantization next to its matmul and frees it there: a step holds one weight's float copy
# at a time, never the whole model's.

DENSE_ROWS = 64  # fewer input rows (decoding): the fused kernel is as fast, and the CPU matmul kernel shapes start at 64

def _dense_operand(w: Tensor) -> Tensor:
  """w (k, n) as a matmul's right operand, copied into a buffer of its own in which the reduction axis k is contiguous."""
  return w.T.contiguous().T

@functools.cache
def _dense_matmul(bits: int, group_size: int) -> Callable[..., Tensor]:
  """x @ W.T for a packed W (wq, scales, biases) of `bits` and `group_size`, with the input gradient dy @ W."""
  @function(precompile=True)
  def input_grad(dy: Tensor, wq: Tensor, scales: Tensor, biases: Tensor) -> Tensor:
    return dy @ _dense_operand(dequantize_tensor(wq, scales, biases, bits, group_size, dy.dtype))
  def backward(dy: UOp, call: UOp) -> tuple[UOp | None, ...]:
    _, wq, scales, *biases = (Tensor(s) for s in call.src[1:])  # equal inputs (unloaded zeros) come once
    dx = input_grad(Tensor(dy), wq, scales, biases[0] if biases else scales)
    return (dx.uop,) + (None,) * (len(call.src) - 2)
  @function(precompile=True, grad_fxn=backward)
  def forward(x: Tensor, wq: Tensor, scales: Tensor, biases: Tensor) -> Tensor:
    return x @ _dense_operand(dequantize_tensor(wq, scales, biases, bits, group_size, x.dtype).T)
  return forward

class _Packed:
  """`weight` (uint32 codes), `scales` and `biases` of a (rows, cols) matrix in mlx's affine layout, quantized along cols."""
  def __init__(self, rows: int, cols: int, bits: int, group_size: int, dtype: DType):
    check_quant_params(bits, group_size)
    _check_in_features(cols, group_size)
    self.bits, self.group_size = bits, group_size
    self.weight = Tensor.zeros(rows, cols * bits // 32, dtype=dtypes.uint32)
    self.scales = Tensor.zeros(rows, cols // group_size, dtype=dtype)
    self.biases = Tensor.zeros(rows, cols // group_size, dtype=dtype)

  def _pack(self, w: Tensor) -> None:
    wq, scales, biases = quantize_array(w.numpy(), self.bits, self.group_size)
    self.weight, self.scales, self.biases = Tensor(wq), Tensor(scales), Tensor(biases)

  def dequantize(self, dtype: DType | None = None) -> Tensor:
    """The (rows, cols) matrix, lazily, in `dtype` (default: the scales' dtype)."""
    return dequantize_tensor(self.weight, self.scales, self.biases, self.bits, self.group_size, dtype or self.scales.dtype)

  def matmul_t(self, x: Tensor) -> Tensor:
    """x @ matrix.T in x's dtype: on the CPU with at least DENSE_ROWS rows of x through a transient float copy of the
    matrix (`_dense_matmul`), otherwise with the dequantization fused into the matmul kernel."""
    if on_device(x, ("CPU",)) and math.prod(x.shape[:-1]) >= DENSE_ROWS:
      return _dense_matmul(self.bits, self.group_size)(x, self.weight, self.scales, self.biases)
    return x @ self.dequantize(x.dtype).T

class QuantizedLinear(_Packed):
  """A frozen `nn.Linear` in mlx's affine layout: `weight` (uint32), `scales`, `biases`, optional `bias`."""
  def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4, group_size: int = 64,
               dtype: DType = dtypes.float32):
    super().__init__(out_features, in_features, bits, group_size, dtype)
    self.in_features, self.out_features = in_features, out_features
    self.bias: Tensor | None = Tensor.zeros(out_features, dtype=dtype) if bias else None

  @classmethod
  def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 64) -> QuantizedLinear:
    out_features, in_features = linear.weight.shape
    ql = cls(in_features, out_features, False, bits, group_size, linear.weight.dtype)
    ql._pack(linear.weight)
    ql.bias = linear.bias
    return ql

  def __call__(self, x: Tensor) -> Tensor:
    y = self.matmul_t(x)
    return y if self.bias is None else y + self.bias.cast(x.dtype)

class QuantizedEmbedding(_Packed):
  """A frozen `nn.Embedding` in mlx's affine layout; `as_linear` is the tied output head."""
  def __init__(self, num_embeddings: int, dims: int, bits: int = 4, group_size: int = 64, dtype: DType = dtypes.float32):
    super().__init__(num_embeddings, dims, bits, group_size, dtype)
    self.num_embeddings, self.dims = num_embeddings, dims

  @classmethod
  def from_embedding(cls, embedding: nn.Embedding, bits: int = 4, group_size: int = 64) -> QuantizedEmbedding:
    qe = cls(*embedding.weight.shape, bits, group_size, embedding.weight.dtype)
    qe._pack(embedding.weight)
    return qe

  def __call__(self, idx: Tensor) -> Tensor:
    """Gathers the packed rows first (as nn.Embedding does, by a one-hot compare), then dequantizes only those."""
    if not dtypes.is_int(idx.dtype): raise TypeError(f"Expected integer dtype for index in embedding, got {idx.dtype}")
    hit = (Tensor.arange(self.num_embeddings).to(self.weight.device) == idx.unsqueeze(-1)).unsqueeze(-1)
    rows = [hit.where(t, 0).sum(-2, dtype=t.dtype) for t in (self.weight, self.scales, self.biases)]
    return dequantize_tensor(*rows, self.bits, self.group_size, self.scales.dtype)

  def as_linear(self, x: Tensor) -> Tensor:
    """x @ weight.T, in x's dtype (the tied output head)."""
    return self.matmul_t(x)

def linear_shape(obj: Any) -> tuple[int, int] | None:
  """(out_features, in_features) if `obj` is a base linear tinylora can adapt, else None."""
  if isinstance(obj, QuantizedLinear): return obj.out_features, obj.in_features
  if isinstance(obj, nn.Linear): return tuple(obj.weight.shape)
  return None

# ---------------------------------------------------------------- whole models

def _modules(model: Any) -> Iterator[tuple[str, Any, Any, Any]]:
  """(dotted name, container, key, module) for every Linear/Embedding, plain or quantized."""
  kinds = (nn.Linear, nn.Embedding, QuantizedLinear, QuantizedEmbedding)
  return ((name, parent, key, m) for name, m, parent, key in named_modules(model) if isinstance(m, kinds))

def _tied_head(embedding: QuantizedEmbedding, bias: Tensor | None) -> QuantizedLinear:
  head = QuantizedLinear(embedding.dims, embedding.num_embeddings, False, embedding.bits, embedding.group_size)
  head.weight, head.scales, head.biases, head.bias = embedding.weight, embedding.scales, embedding.biases, bias
  return head

QuantizedModule = QuantizedLinear | QuantizedEmbedding

def _swap(model: Any, make: Callable[[str, Any], QuantizedModule | None]) -> None:
  """Replaces each plain Linear/Embedding by `make(name, module)` unless that is None. Embeddings go first, so that a
  head whose weight *is* a swapped embedding's weight (a tied head) shares its packed tensors, as mlx-lm's
  `embed_tokens.as_linear` does."""
  tied: dict[int, QuantizedEmbedding] = {}
  for name, container, key, module in sorted(_modules(model), key=lambda m: not isinstance(m[3], nn.Embedding)):
    if not isinstance(module, (nn.Linear, nn.Embedding)): continue
    if isinstance(module, nn.Linear) and id(module.weight) in tied: new = _tied_head(tied[id(module.weight)], module.bias)
    elif (new := make(name, module)) is None: continue
    if isinstance(new, QuantizedEmbedding): tied[id(module.weight)] = new
    replace_module(container, key, new)

def quantize(model: Any, bits: int = 4, group_size: int = 64,
             predicate: Callable[[str, Any], bool | dict] | None = None) -> Any:
  """Quantizes, in place, every nn.Linear and nn.Embedding whose input size divides by its group size, as mlx-lm's
  `quantize_model` does. `predicate(name, module)` may return False to skip a layer or a dict with its own "bits" and
  "group_size"; a head tied to a quantized embedding follows the embedding. Returns the model (quantization_config
  describes it)."""
  check_quant_params(bits, group_size)
  default = {"group_size": group_size, "bits": bits, "mode": MODE}
  def make(name: str, module: nn.Linear | nn.Embedding) -> QuantizedModule | None:
    if not (chosen := True if predicate is None else predicate(name, module)): return None
    params = {**default, **chosen} if isinstance(chosen, dict) else default
    check_quant_params(params["bits"], params["group_size"], params["mode"])
    if module.weight.shape[-1] % params["group_size"]: return None
    if isinstance(module, nn.Embedding): return QuantizedEmbedding.from_embedding(module, params["bits"], params["group_size"])
    return QuantizedLinear.from_linear(module, params["bits"], params["group_size"])
  _swap(model, make)
  return model

def dequantize(model: Any, dtype: DType | None = None) -> Any:
  """The inverse of `quantize`, in place: every quantized layer becomes a plain nn.Linear / nn.Embedding holding its
  dequantized weight in `dtype` (default: its scales' dtype), a head tied to a quantized embedding tied to the plain
  embedding's weight again (mlx-lm's `fuse --de-quantize`). Returns the model."""
  plain: dict[int, Tensor] = {}  # id(packed weight) -> its float matrix, shared by a tied head
  for _, container, key, module in list(_modules(model)):
    if not isinstance(module, (QuantizedLinear, QuantizedEmbedding)): continue
    if (weight := plain.get(id(module.weight))) is None:
      weight = plain[id(module.weight)] = module.dequantize(dtype).contiguous()
    if isinstance(module, QuantizedEmbedding): new = nn.Embedding(module.num_embeddings, module.dims)
    else:
      new = nn.Linear(module.in_features, module.out_features, bias=False)
      new.bias = module.bias
    new.weight = weight
    replace_module(container, key, new)
  if plain: Tensor.realize(*plain.values())
  return model

def quantization_config(model: Any) -> dict:
  """mlx-lm's config.json `quantization` entry for the model's quantized layers, read from the layers themselves: the
  most common bits / group_size / mode at the top level, a per-layer entry for each layer that differs ({} when no
  layer is quantized). Layers left plain need no entry: their checkpoint has no `.scales`."""
  layers = {name: {"group_size": m.group_size, "bits": m.bits, "mode": MODE} for name, _, _, m in _modules(model)
            if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
  if not layers: return {}
  kinds = [tuple(q.items()) for q in layers.values()]
  top = dict(max(kinds, key=kinds.count))
  return {**top, **{name: q for name, q in layers.items() if q != top}}

def _layer_params(quantization: dict, name: str | None = None) -> dict | None:
  """bits / group_size / mode for layer `name` (None: the top level) from an mlx-lm `quantization` dict; None if a
  per-layer entry says false."""
  override = quantization.get(name, True)
  if override is False: return None
  if not isinstance(override, (bool, dict)):
    raise LoraError(f"quantization[{name!r}] must be an object or a boolean, found {override!r}")
  params = {"bits": quantization.get("bits", 4), "group_size": quantization.get("group_size", 64),
            "mode": quantization.get("mode", MODE)}
  if isinstance(override, dict): params.update(override)
  check_quant_params(params["bits"], params["group_size"], params["mode"])
  return params

def prepare_quantized(model: Any, quantization: dict, weight_keys: set[str]) -> None:
  """Before weights are assigned: swaps each nn.Linear / nn.Embedding that the checkpoint stores quantized for an
  empty quantized module of the right shapes, deciding as mlx-lm's loader does (a per-layer entry in `quantization`
  wins, else the layer is quantized iff `<name>.scales` is in `weight_keys`).
  A head tied to a quantized embedding shares its tensors: its state-dict keys alias the embedding's."""
  if not isinstance(quantization, dict): raise LoraError(f"quantization must be a JSON object, found {quantization!r}")
  _layer_params(quantization)  # a bad top level fails even when no layer is quantized
  def make(name: str, module: nn.Linear | nn.Embedding) -> QuantizedModule | None:
    if name not in quantization and f"{name}.scales" not in weight_keys: return None
    if (params := _layer_params(quantization, name)) is None: return None
    rows, cols = module.weight.shape
    if isinstance(module, nn.Embedding): return QuantizedEmbedding(rows, cols, params["bits"], params["group_size"], module.weight.dtype)
    return QuantizedLinear(cols, rows, module.bias is not None, params["bits"], params["group_size"], module.weight.dtype)
  _swap(model, make)
