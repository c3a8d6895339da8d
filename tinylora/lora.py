"""The LoRA linear and the functions that put adapters into a model, count, merge and remove them."""
from __future__ import annotations
import contextlib, math, warnings
from typing import Any, Callable, Iterator
from tinygrad import Tensor, dtypes, nn
from tinylora.config import LoraConfig
from tinylora.errors import LoraError
from tinylora.device_policy import base_forward, merge_on_the_fly
from tinylora.quant import QuantizedLinear, linear_shape
from tinylora.tree import named_modules, replace_module

class LoraLinear:
  """y = base(x) + dropout(x) @ A.T @ B.T * scale, with A (r, in) and B (out, r) as in HF PEFT."""
  def __init__(self, base: Any, r: int, scale: float, dropout: float = 0.0, init: bool | str = True,
               weights: tuple[Tensor, Tensor] | None = None):
    """`init` as LoraConfig.init_lora_weights; `weights` = (A, B) to start from instead (e.g. read from a file)."""
    shape = linear_shape(base)
    if shape is None: raise LoraError(f"LoraLinear wraps nn.Linear or a quantized linear, not {type(base).__name__}")
    out_features, in_features = shape
    self.base, self.r, self.scale, self.dropout = base, r, scale, dropout
    if weights is not None: A, B = weights
    else:
      if init == "gaussian": A = Tensor.randn(r, in_features) / r
      else: A = Tensor.uniform(r, in_features, low=-1 / math.sqrt(in_features), high=1 / math.sqrt(in_features))
      B = Tensor.zeros(out_features, r) if init else Tensor.uniform(out_features, r, low=-1 / math.sqrt(r), high=1 / math.sqrt(r))
    if A.shape != (r, in_features) or B.shape != (out_features, r):
      raise LoraError(f"LoRA A {A.shape} / B {B.shape} do not fit rank {r} on a ({out_features}, {in_features}) linear")
    # realized now: a lazy constant would be folded into a TinyJit's kernels and never see optimizer updates
    self.lora_A, self.lora_B = A.contiguous().realize(), B.contiguous().realize()
    self.merged, self.enabled = False, True

  @property
  def out_features(self) -> int: return self.lora_B.shape[0]
  @property
  def in_features(self) -> int: return self.lora_A.shape[1]

  def __call__(self, x: Tensor) -> Tensor:
    if self.merged or not self.enabled: return base_forward(self.base, x)
    if merge_on_the_fly(self.base, x):
      # no training, so no gradients through the weight: merged on the fly, one matmul
      return x.linear(self.merged_weight().T, self.base.bias)
    y = base_forward(self.base, x)
    h = x.cast(self.lora_A.dtype).dropout(self.dropout) if self.dropout else x.cast(self.lora_A.dtype)
    # the low-rank delta in its own small kernels, added in the base matmul's epilogue: a kernel holding both
    # reductions gets none of tinygrad's matmul optimisations (and sums the base product in another order)
    return y + (h @ self.lora_A.T @ self.lora_B.T * self.scale).cast(y.dtype).contiguous()

  def delta_weight(self) -> Tensor:
    """The update scale * B @ A, shaped like the base weight (out, in)."""
    return self.lora_B @ self.lora_A * self.scale

  def merged_weight(self, sign: float = 1.0) -> Tensor:
    """The base weight plus (sign -1: minus) the update, summed in float32 and cast to the base weight's dtype."""
    return (self.base.weight.float() + sign * self.delta_weight()).cast(self.base.weight.dtype)

  def _updated_weight(self, sign: float, what: str) -> Tensor:
    if not isinstance(self.base, nn.Linear):
      raise LoraError(f"cannot {what} into a {type(self.base).__name__} in place; use merge_and_unload(model)")
    W = self.merged_weight(sign).realize()
    if not W.isfinite().all().item(): raise LoraError(f"{what} would write non-finite weights; the model is unchanged")
    return W

  def merge(self):
    if self.merged: raise LoraError("adapter is already merged")
    self.base.weight.assign(self._updated_weight(1.0, "merge")).realize()
    self.merged = True

  def unmerge(self):
    if not self.merged: raise LoraError("adapter is not merged")
    self.base.weight.assign(self._updated_weight(-1.0, "unmerge")).realize()
    self.merged = False

  def fuse(self, dtype=None) -> nn.Linear:
    """A plain nn.Linear with the update folded in (the base is left untouched); a quantized base is dequantized,
    to float16 unless `dtype` says otherwise."""
    quantized = isinstance(self.base, QuantizedLinear)
    base_W = self.base.dequantize(dtypes.float32) if quantized else self.base.weight.float()
    W = base_W if self.merged else base_W + self.delta_weight()
    if not W.isfinite().all().item(): raise LoraError("fusing would write non-finite weights; the model is unchanged")
    out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
    out.weight = W.cast(dtype or (dtypes.float16 if quantized else self.base.weight.dtype)).contiguous().realize()
    out.bias = self.base.bias
    return out

def lora_layers(model: Any) -> dict[str, LoraLinear]:
  """Every LoraLinear in the model by dotted path."""
  return {path: m for path, m, _, _ in named_modules(model) if isinstance(m, LoraLinear)}

def adaptable_linears(model: Any) -> dict[str, tuple[int, int]]:
  """(out, in) of every linear in the model that an adapter could wrap, by dotted path."""
  return {path: s for path, m, _, _ in named_modules(model) if (s := linear_shape(m)) is not None}

def inject(model: Any, config: LoraConfig, make: Callable[[str, Any], LoraLinear] | None = None) -> Any:
  """Wraps every linear that `config` targets in a LoraLinear, in place, and freezes all other tensors.
  `make(path, base)` may build the layers instead (load_adapter does, from file tensors); every layer is built before
  the model is changed. Returns the model."""
  if existing := lora_layers(model):
    raise LoraError(f"model already has LoRA adapters (e.g. {next(iter(existing))}); merge_and_unload or remove them first")
  targets = [(p, m, parent, k) for p, m, parent, k in named_modules(model) if linear_shape(m) and config.matches(p)]
  if not targets:
    names = sorted(adaptable_linears(model))
    raise LoraError(f"target_modules={config.target_modules!r} (layers_to_transform={config.layers_to_transform}) "
                    f"matches no linear in the model; linears are: {', '.join(names) or 'none'}")
  make = make or (lambda p, m: LoraLinear(m, config.rank(p), config.scale(p), config.lora_dropout, config.init_lora_weights))
  layers = [(parent, k, make(p, m)) for p, m, parent, k in targets]
  for t in nn.state.get_parameters(model): t.is_param_(False)
  for parent, k, layer in layers:
    layer.config = config
    replace_module(parent, k, layer)
  return model

def trainable_parameters(model: Any) -> list[Tensor]:
  """The LoRA tensors (A then B of every adapted linear, in model order): the only tensors training updates."""
  return [t for layer in lora_layers(model).values() for t in (layer.lora_A, layer.lora_B)]

def count_parameters(model: Any) -> tuple[int, int]:
  """(trainable, total) parameter counts; shared (tied) tensors count once, quantized weights by stored elements."""
  trainable = sum(t.numel() for t in trainable_parameters(model))
  total = sum(t.numel() for t in {id(t): t for t in nn.state.get_parameters(model)}.values())
  return trainable, total

def merge(model: Any) -> Any:
  """Adds every adapter's update into its base weight (reversible with unmerge). Merging twice is an error."""
  layers = lora_layers(model)
  if not layers: raise LoraError("model has no LoRA adapters to merge")
  if merged := [p for p, l in layers.items() if l.merged]: raise LoraError(f"already merged: {', '.join(merged)}")
  names: dict[int, list[str]] = {}
  for k, t in nn.state.get_state_dict(model).items(): names.setdefault(id(t), []).append(k)
  for p, l in layers.items():
    if isinstance(l.base, nn.Linear) and len(tied := names[id(l.base.weight)]) > 1:
      raise LoraError(f"{p}'s weight is shared with {', '.join(k for k in tied if not k.startswith(p))} (tied); merging "
                      f"in place would change those too. Use merge_and_unload(model), which gives {p} its own weight")
  new = [layer._updated_weight(1.0, "merge") for layer in layers.values()]  # all checked before any is written
  for layer, W in zip(layers.values(), new):
    layer.base.weight.assign(W).realize()
    layer.merged = True
  return model

def unmerge(model: Any) -> Any:
  layers = lora_layers(model)
  if not layers: raise LoraError("model has no LoRA adapters to unmerge")
  if unmerged := [p for p, l in layers.items() if not l.merged]: raise LoraError(f"not merged: {', '.join(unmerged)}")
  for layer in layers.values(): layer.unmerge()
  return model

def merge_and_unload(model: Any, dtype=None, requantize: bool = False) -> Any:
  """Replaces every LoraLinear by a plain nn.Linear holding W + scale * B @ A (a quantized base is dequantized, to
  float16 unless `dtype` says otherwise). Nothing is replaced unless every fused weight is finite.
  `requantize=True` quantizes the fused weights of quantized bases again with their bits and group size, and warns
  with how much of each adapter's update the rounding destroyed (a small update can vanish in 4-bit steps)."""
  found = [(p, parent, k, m) for p, m, parent, k in named_modules(model) if isinstance(m, LoraLinear)]
  if not found: raise LoraError("model has no LoRA adapters to merge")
  fused = [(p, parent, k, m, m.fuse(dtype)) for p, parent, k, m in found]
  errors = {}
  for p, parent, k, m, linear in fused:
    if requantize and isinstance(m.base, QuantizedLinear):
      target = linear.weight.float()
      linear = QuantizedLinear.from_linear(linear, m.base.bits, m.base.group_size)
      lost = (linear.dequantize(dtypes.float32) - target).square().sum().sqrt()
      errors[p] = (lost / m.delta_weight().square().sum().sqrt().maximum(1e-12)).item()
    replace_module(parent, k, linear)
  if errors:
    worst = max(errors, key=errors.get)
    warnings.warn(f"re-quantizing after merge: rounding error / adapter update = {sum(errors.values()) / len(errors):.2f} "
                  f"on average, {errors[worst]:.2f} at worst ({worst}); a ratio near or above 1 means the fine-tune is "
                  f"largely lost. Keep the merged model in float16 to keep it.")
  return model

def unload(model: Any) -> Any:
  """Removes every adapter without merging it, giving back the base linears."""
  for _, m, parent, k in [(p, m, parent, k) for p, m, parent, k in named_modules(model) if isinstance(m, LoraLinear)]:
    if m.merged: m.unmerge()
    replace_module(parent, k, m.base)
  return model

@contextlib.contextmanager
def disabled(model: Any) -> Iterator[Any]:
  """Inside this block the model computes exactly its base output (merged adapters are unmerged for the while)."""
  layers = lora_layers(model).values()
  was_merged = [l for l in layers if l.merged]
  for l in was_merged: l.unmerge()
  for l in layers: l.enabled = False
  try: yield model
  finally:
    for l in layers: l.enabled = True
    for l in was_merged: l.merge()
