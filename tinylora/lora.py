"""The LoRA linear (LoRA and DoRA, several named adapters per linear) and the functions that put adapters into a
model, choose the active one, count, merge and remove them."""
from __future__ import annotations
import contextlib, dataclasses, math, warnings
from typing import Any, Callable, Iterator
from tinygrad import Tensor, dtypes, nn
from tinylora.config import DEFAULT_TARGETS, LoraConfig
from tinylora.errors import LoraError
from tinylora.device_policy import base_forward, merge_on_the_fly
from tinylora.engine import is_training
from tinylora.quant import QuantizedEmbedding, QuantizedLinear, linear_shape
from tinylora.tree import named_modules, replace_module, unique_state_dict

DEFAULT = "default"  # the adapter name when none is given, as in PEFT
BASE = "__base__"    # in mixed batches: a row that uses no adapter (PEFT's spelling)

def base_weight(base: Any) -> Tensor:
  """The (out, in) weight of a linear or quantized linear, in float32."""
  return base.dequantize(dtypes.float32) if isinstance(base, QuantizedLinear) else base.weight.float()

def row_norm(W: Tensor) -> Tensor: return W.square().sum(1).sqrt()  # (out, in) -> (out,)

class Adapter:
  """One named adapter on one linear: A (r, in), B (out, r) and scale as in HF PEFT; with DoRA also the magnitude
  vector m (out,) (PEFT's lora_magnitude_vector, mlx-lm's m)."""
  def __init__(self, A: Tensor, B: Tensor, scale: float, dropout: float, magnitude: Tensor | None, config: LoraConfig | None):
    # realized now: a lazy constant would be folded into a TinyJit's kernels and never see optimizer updates
    self.lora_A, self.lora_B = A.contiguous().realize(), B.contiguous().realize()
    self.magnitude = None if magnitude is None else magnitude.contiguous().realize()
    self.scale, self.dropout, self.config = scale, dropout, config
    self.order = 0  # its place among the model's adapters by when each was added (set by add_adapter and inject)

  @property
  def r(self) -> int: return self.lora_A.shape[0]
  @property
  def use_dora(self) -> bool: return self.magnitude is not None
  def parameters(self) -> list[Tensor]: return [self.lora_A, self.lora_B] + ([self.magnitude] if self.use_dora else [])
  def delta_weight(self) -> Tensor: return self.lora_B @ self.lora_A * self.scale  # (out, in)

  def dora_scale(self, base: Any) -> Tensor:
    """m / ||W + scale * B @ A|| per output row, the norm detached from the gradient as in PEFT and mlx-lm (DoRA paper,
    section 4.3)."""
    return self.magnitude / row_norm(base_weight(base) + self.delta_weight()).detach()

  def output_delta(self, x: Tensor, y: Tensor, base: Any) -> Tensor:
    """What this adapter adds to the base output y = x @ W.T + bias: the low-rank delta d, or with DoRA
    g * (x @ W.T + d) + bias - y for g = m / ||W + scale * B @ A|| (the bias is not rescaled, as in PEFT and mlx-lm)."""
    h = x.cast(self.lora_A.dtype).dropout(self.dropout) if self.dropout else x.cast(self.lora_A.dtype)
    d = h @ self.lora_A.T @ self.lora_B.T * self.scale
    if not self.use_dora: return d.cast(y.dtype).contiguous()
    g = self.dora_scale(base)
    y0 = y if base.bias is None else y - base.bias
    # d in kernels of its own, as for LoRA: left lazy, its rank-r reduction joins the base matmul's kernel
    return ((g - 1) * y0 + g * d.contiguous()).cast(y.dtype)

class LoraLinear:
  """y = base(x) + dropout(x) @ A.T @ B.T * scale with A (r, in) and B (out, r) as in HF PEFT, or with DoRA
  y = m / ||W + scale * B @ A|| * (x @ W.T + dropout(x) @ A.T @ B.T * scale) + bias.
  Holds any number of named adapters (`adapters`); the one named `active` computes, the others wait."""
  def __init__(self, base: Any, r: int, scale: float, dropout: float = 0.0, init: bool | str = True,
               weights: tuple[Tensor, Tensor] | None = None, use_dora: bool = False, magnitude: Tensor | None = None,
               adapter_name: str = DEFAULT, config: LoraConfig | None = None):
    """`init` as LoraConfig.init_lora_weights; `weights` = (A, B) to start from instead (e.g. read from a file);
    `magnitude` the DoRA magnitude to start from (default: the row norms of the base weight)."""
    if linear_shape(base) is None: raise LoraError(f"LoraLinear wraps nn.Linear or a quantized linear, not {type(base).__name__}")
    self.base, self.adapters, self.active = base, {}, adapter_name
    self.merged, self.enabled = False, True
    self._dora_scale: Tensor | None = None  # DoRA while merged: the row scale the merge applied, to undo it
    self.row_masks: dict[str, Tensor] | None = None  # set by mixed_batch: a (B, 1, 1) 0/1 row mask per adapter name
    self.add_adapter(adapter_name, r, scale, dropout, init, weights, use_dora, magnitude, config)

  def add_adapter(self, name: str, r: int, scale: float, dropout: float = 0.0, init: bool | str = True,
                  weights: tuple[Tensor, Tensor] | None = None, use_dora: bool = False, magnitude: Tensor | None = None,
                  config: LoraConfig | None = None) -> None:
    """Adds adapter `name` beside those present (it computes once it is the active one)."""
    if name in self.adapters: raise LoraError(f"this linear already has an adapter named {name!r}")
    out_features, in_features = linear_shape(self.base)
    if weights is not None: A, B = weights
    else:
      if init == "gaussian": A = Tensor.randn(r, in_features) / r
      else: A = Tensor.uniform(r, in_features, low=-1 / math.sqrt(in_features), high=1 / math.sqrt(in_features))
      B = Tensor.zeros(out_features, r) if init else Tensor.uniform(out_features, r, low=-1 / math.sqrt(r), high=1 / math.sqrt(r))
    if A.shape != (r, in_features) or B.shape != (out_features, r):
      raise LoraError(f"LoRA A {A.shape} / B {B.shape} do not fit rank {r} on a ({out_features}, {in_features}) linear")
    if magnitude is not None and magnitude.shape != (out_features,):
      raise LoraError(f"DoRA magnitude {magnitude.shape} does not fit a ({out_features}, {in_features}) linear: expected ({out_features},)")
    adapter = Adapter(A, B, scale, dropout, None, config)
    if use_dora or magnitude is not None:
      norm = row_norm(base_weight(self.base) + adapter.delta_weight()).numpy()
      if (zero := (norm == 0).nonzero()[0]).size:
        raise LoraError(f"DoRA needs a nonzero norm in every row of W + scale * B @ A, but row(s) {zero[:8].tolist()} of "
                        f"this ({out_features}, {in_features}) linear are zero")
      # m starts as ||W|| (B = 0), so the adapter starts as the identity, as PEFT and mlx-lm initialise it
      adapter.magnitude = (Tensor(norm) if magnitude is None else magnitude.float()).contiguous().realize()
    adapter.order = 1 + max((a.order for a in self.adapters.values()), default=-1)
    self.adapters[name] = adapter

  @property
  def adapter(self) -> Adapter:
    if self.active not in self.adapters: raise LoraError(f"this linear has no adapter {self.active!r}; it has {sorted(self.adapters)}")
    return self.adapters[self.active]
  # the active adapter's tensors and settings, read (and, for tests and tools, written) through the layer
  lora_A = property(lambda self: self.adapter.lora_A, lambda self, t: setattr(self.adapter, "lora_A", t))
  lora_B = property(lambda self: self.adapter.lora_B, lambda self, t: setattr(self.adapter, "lora_B", t))
  magnitude = property(lambda self: self.adapter.magnitude)
  r = property(lambda self: self.adapter.r)
  scale = property(lambda self: self.adapter.scale)
  config = property(lambda self: self.adapter.config)
  use_dora = property(lambda self: self.adapter.use_dora)

  @property
  def out_features(self) -> int: return linear_shape(self.base)[0]
  @property
  def in_features(self) -> int: return linear_shape(self.base)[1]

  def __call__(self, x: Tensor) -> Tensor:
    if self.merged or not self.enabled or (self.row_masks is None and self.active not in self.adapters):
      return base_forward(self.base, x)
    if self.row_masks is None and merge_on_the_fly(self.base, x):
      # no training, so no gradients through the weight: merged on the fly, one matmul
      return x.linear(self.merged_weight().cast(self.base.weight.dtype).T, self.base.bias)
    y = base_forward(self.base, x)
    # the low-rank delta in its own small kernels, added in the base matmul's epilogue: a kernel holding both
    # reductions gets none of tinygrad's matmul optimisations (and sums the base product in another order)
    if self.row_masks is None: return y + self.adapter.output_delta(x, y, self.base)
    for mask in self.row_masks.values(): _check_rows(mask.shape[0], x.shape[0])
    routed = [(self.adapters[n], mask) for n, mask in self.row_masks.items() if n in self.adapters]
    if not routed: return y
    if any(a.use_dora or (a.dropout and is_training()) for a, _ in routed):
      # mixed batch: every adapter over the whole batch, kept on its own rows
      return y + sum(a.output_delta(x, y, self.base) * mask.cast(y.dtype) for a, mask in routed)
    # every adapter in two products whatever their number: x @ [A_1; A_2; ...].T, of which each row keeps its own
    # adapter's ranks, times [s_1 B_1, s_2 B_2, ...].T
    A = Tensor.cat(*[a.lora_A for a, _ in routed]).contiguous()  # (sum of ranks, in), copied: the matmuls stay plain
    B = Tensor.cat(*[a.lora_B * a.scale for a, _ in routed], dim=1).contiguous()  # (out, sum of ranks)
    keep = Tensor.cat(*[mask.reshape(-1, 1).expand(mask.shape[0], a.r) for a, mask in routed], dim=1)  # (batch, sum of ranks)
    h = (x.cast(A.dtype) @ A.T) * keep.reshape(keep.shape[0], *[1] * (x.ndim - 2), keep.shape[1])
    return y + (h @ B.T).cast(y.dtype).contiguous()

  def delta_weight(self) -> Tensor:
    """The active adapter's update of the base weight, shaped (out, in): scale * B @ A, or for DoRA the merged weight
    minus the base weight."""
    a = self.adapter
    return self.merged_weight() - base_weight(self.base) if a.use_dora else a.delta_weight()

  def merged_weight(self) -> Tensor:
    """The base weight with the active adapter folded in, in float32: W + scale * B @ A, for DoRA times
    m / ||W + scale * B @ A|| per row."""
    a, W = self.adapter, base_weight(self.base)
    return W + a.delta_weight() if not a.use_dora else (W := W + a.delta_weight()) * (a.magnitude / row_norm(W)).unsqueeze(1)

  def _checked(self, W: Tensor, what: str) -> Tensor:
    if not isinstance(self.base, nn.Linear):
      raise LoraError(f"cannot {what} into a {type(self.base).__name__} in place; use merge_and_unload(model)")
    W = W.cast(self.base.weight.dtype).realize()
    if not W.isfinite().all().item(): raise LoraError(f"{what} would write non-finite weights; the model is unchanged")
    return W

  def _merge_weights(self) -> tuple[Tensor, Tensor | None]:
    """The merged weight and, for DoRA, the row scale needed to undo it (the norm of the unmerged weight)."""
    a = self.adapter
    g = a.dora_scale(self.base).realize() if a.use_dora else None
    return self._checked(self.merged_weight(), "merge"), g

  def _write(self, W: Tensor, merged: bool, dora_scale: Tensor | None = None):
    self.base.weight.assign(W).realize()
    self.merged, self._dora_scale = merged, dora_scale

  def merge(self):
    if self.merged: raise LoraError("adapter is already merged")
    W, g = self._merge_weights()
    self._write(W, True, g)

  def unmerge(self):
    if not self.merged: raise LoraError("adapter is not merged")
    a, W = self.adapter, self.base.weight.float()
    W = W / self._dora_scale.unsqueeze(1) - a.delta_weight() if a.use_dora else W - a.delta_weight()
    self._write(self._checked(W, "unmerge"), False)

  def fuse(self, dtype=None) -> nn.Linear:
    """A plain nn.Linear with the update folded in (the base is left untouched); a quantized base is dequantized,
    to float16 unless `dtype` says otherwise."""
    quantized = isinstance(self.base, QuantizedLinear)
    W = base_weight(self.base) if self.merged or self.active not in self.adapters else self.merged_weight()
    if not W.isfinite().all().item(): raise LoraError("fusing would write non-finite weights; the model is unchanged")
    out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
    out.weight = W.cast(dtype or (dtypes.float16 if quantized else self.base.weight.dtype)).contiguous().realize()
    out.bias = self.base.bias
    return out

def _linears(model: Any, lora_only: bool = False) -> list[tuple[str, Any, Any, Any]]:
  """(path, module, parent, key) of every linear an adapter could wrap, a LoraLinear standing for the linear inside it;
  with `lora_only`, of the LoraLinears only. A list, so callers may replace modules as they go through it."""
  found, inside = [], None
  for p, m, parent, k in named_modules(model):
    if inside is not None and p.startswith(inside): continue
    if isinstance(m, LoraLinear): inside = p + "."
    if isinstance(m, LoraLinear) or (not lora_only and linear_shape(m) is not None): found.append((p, m, parent, k))
  return found

def list_adapters(model: Any) -> list[str]:
  """The names of the adapters in the model, in the order they were added."""
  first = {}
  for _, m, _, _ in _linears(model, lora_only=True):
    for name, a in m.adapters.items(): first[name] = min(first.get(name, a.order), a.order)
  return sorted(first, key=first.get)

def active_adapter(model: Any) -> str | None:
  """The name of the adapter that computes, trains, merges and saves by default (None without adapters)."""
  return next((m.active for _, m, _, _ in _linears(model, lora_only=True)), None)

def _known(model: Any, name: str) -> str:
  if name not in (names := list_adapters(model)): raise LoraError(f"no adapter named {name!r}; the model has {names or 'none'}")
  return name

def lora_layers(model: Any, adapter_name: str | None = None) -> dict[str, LoraLinear]:
  """By dotted path, every LoraLinear that holds adapter `adapter_name` (default: the active one)."""
  name = adapter_name or active_adapter(model)
  return {p: m for p, m, _, _ in _linears(model, lora_only=True) if name in m.adapters}

def adaptable_linears(model: Any) -> dict[str, tuple[int, int]]:
  """(out, in) of every linear in the model that an adapter could wrap, by dotted path."""
  return {p: linear_shape(m.base if isinstance(m, LoraLinear) else m) for p, m, _, _ in _linears(model)}

def with_targets(model: Any, config: LoraConfig) -> LoraConfig:
  """`config`, its target_modules=None (the default) replaced by the model family's default names
  (model.config.arch.lora_targets, as PEFT's for the model type; q_proj and v_proj for a model without one)."""
  if config.target_modules is not None: return config
  arch = getattr(getattr(model, "config", None), "arch", None)
  return dataclasses.replace(config, target_modules=list(getattr(arch, "lora_targets", DEFAULT_TARGETS)))

def inject(model: Any, config: LoraConfig, make: Callable[[str, Any], dict] | None = None, adapter_name: str = DEFAULT) -> Any:
  """Adds adapter `adapter_name` to every linear that `config` targets, in place, and freezes all other tensors. The
  model's first adapter becomes the active one; a later one waits beside it until set_adapter chooses it (as in PEFT).
  `make(path, base)` may give the keyword arguments of LoraLinear.add_adapter instead (load_adapter does, from file
  tensors); every adapter is built before the model is changed. The adapters record `config` with its targets resolved
  (with_targets). Returns the model."""
  config = with_targets(model, config)
  if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE:
    raise LoraError(f"adapter_name={adapter_name!r}: expected a non-empty name other than {BASE!r}")
  if adapter_name in (names := list_adapters(model)):
    raise LoraError(f"the model already has an adapter named {adapter_name!r} (adapters: {names}); delete_adapter it or choose another name")
  if any(m.merged for _, m, _, _ in _linears(model, lora_only=True)): raise LoraError("unmerge the model before adding an adapter")
  targets = [(p, m, parent, k) for p, m, parent, k in _linears(model) if config.matches(p)]
  if not targets:
    names = sorted(adaptable_linears(model))
    raise LoraError(f"target_modules={config.target_modules!r} (layers_to_transform={config.layers_to_transform}) "
                    f"matches no linear in the model; linears are: {', '.join(names) or 'none'}")
  make = make or (lambda p, m: dict(r=config.rank(p), scale=config.scale(p), dropout=config.lora_dropout,
                                    init=config.init_lora_weights, use_dora=config.use_dora))
  active = active_adapter(model) or adapter_name
  order = 1 + max((a.order for _, m, _, _ in _linears(model, lora_only=True) for a in m.adapters.values()), default=-1)
  built = []
  for p, m, parent, k in targets:
    base = m.base if isinstance(m, LoraLinear) else m
    try:
      layer = LoraLinear(base, adapter_name=adapter_name, config=config, **make(p, base))
    except LoraError as e: raise LoraError(f"{p}: {e}") from None
    layer.adapters[adapter_name].order = order
    built.append((parent, k, m, layer))
  adapter_ids = {id(t) for _, m, _, _ in _linears(model, lora_only=True) for a in m.adapters.values() for t in a.parameters()}
  for t in nn.state.get_parameters(model):
    if id(t) not in adapter_ids: t.is_param_(False)
  for parent, k, m, layer in built:
    if isinstance(m, LoraLinear): m.adapters[adapter_name] = layer.adapters[adapter_name]
    else:
      layer.active = active
      replace_module(parent, k, layer)
  return model

def set_adapter(model: Any, adapter_name: str) -> Any:
  """Makes `adapter_name` the active adapter: the one that computes, trains, merges and saves by default."""
  _known(model, adapter_name)
  if merged := [p for p, m, _, _ in _linears(model, lora_only=True) if m.merged]:
    raise LoraError(f"adapter {active_adapter(model)!r} is merged (e.g. {merged[0]}); unmerge before switching adapters")
  for _, m, _, _ in _linears(model, lora_only=True): m.active = adapter_name
  return model

def delete_adapter(model: Any, adapter_name: str) -> Any:
  """Removes adapter `adapter_name`; linears left with no adapter become their base again. Deleting the active adapter
  makes the first remaining one active."""
  _known(model, adapter_name)
  found = _linears(model, lora_only=True)
  if any(m.merged and m.active == adapter_name for _, m, _, _ in found):
    raise LoraError(f"adapter {adapter_name!r} is merged; unmerge it before deleting it")
  rest = [n for n in list_adapters(model) if n != adapter_name]
  for _, m, parent, k in found:
    m.adapters.pop(adapter_name, None)
    if not m.adapters: replace_module(parent, k, m.base)
    elif m.active == adapter_name: m.active = rest[0]
  return model

def trainable_parameters(model: Any) -> list[Tensor]:
  """The active adapter's tensors (A, B and for DoRA the magnitude, of every adapted linear, in model order): the only
  tensors training updates."""
  return [t for layer in lora_layers(model).values() for t in layer.adapter.parameters()]

def count_parameters(model: Any) -> tuple[int, int]:
  """(trainable, total) parameter counts; shared (tied) tensors count once, and a packed (quantized) weight counts the
  rows x cols of the matrix it stands for, its packing's scales and biases not at all."""
  trainable = sum(t.numel() for t in trainable_parameters(model))
  logical: dict[int, int] = {}  # by id: a packed layer's uint32 codes hold 32 / bits values each
  for _, m, _, _ in named_modules(model):
    if isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
      logical |= {id(m.weight): m.weight.numel() * 32 // m.bits, id(m.scales): 0, id(m.biases): 0}
  total = sum(logical.get(id(t), t.numel()) for t in unique_state_dict(model).values())
  return trainable, total

def merge(model: Any) -> Any:
  """Folds the active adapter into its base weights. unmerge reverses it to float rounding (the weights come back as
  (W + d) - d, not bit for bit W). Merging twice is an error."""
  layers = lora_layers(model)
  if not layers: raise LoraError("model has no LoRA adapters to merge")
  if merged := [p for p, l, _, _ in _linears(model, lora_only=True) if l.merged]: raise LoraError(f"already merged: {', '.join(merged)}")
  names: dict[int, list[str]] = {}
  for k, t in nn.state.get_state_dict(model).items(): names.setdefault(id(t), []).append(k)
  for p, l in layers.items():
    if isinstance(l.base, nn.Linear) and len(tied := names[id(l.base.weight)]) > 1:
      raise LoraError(f"{p}'s weight is shared with {', '.join(k for k in tied if not k.startswith(p))} (tied); merging "
                      f"in place would change those too. Use merge_and_unload(model), which gives {p} its own weight")
  new = [layer._merge_weights() for layer in layers.values()]  # all checked before any is written
  for layer, (W, g) in zip(layers.values(), new): layer._write(W, True, g)
  return model

def unmerge(model: Any) -> Any:
  layers = lora_layers(model)
  if not layers: raise LoraError("model has no LoRA adapters to unmerge")
  if unmerged := [p for p, l in layers.items() if not l.merged]: raise LoraError(f"not merged: {', '.join(unmerged)}")
  for layer in layers.values(): layer.unmerge()
  return model

def merge_and_unload(model: Any, dtype=None, requantize: bool = False) -> Any:
  """Replaces every LoraLinear by a plain nn.Linear holding its base weight with the active adapter folded in (a
  quantized base is dequantized, to float16 unless `dtype` says otherwise); the other adapters are dropped. Nothing is
  replaced unless every fused weight is finite.
  `requantize=True` quantizes the fused weights of quantized bases again with their bits and group size, and warns
  with how much of each adapter's update the rounding destroyed (a small update can vanish in 4-bit steps)."""
  found = _linears(model, lora_only=True)
  if not found: raise LoraError("model has no LoRA adapters to merge")
  fused = [(p, parent, k, m, m.fuse(dtype)) for p, m, parent, k in found]
  errors = {}
  for p, parent, k, m, linear in fused:
    if requantize and isinstance(m.base, QuantizedLinear) and m.active in m.adapters:
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
  """Removes every adapter without merging it, giving back the base linears (a merged one is unmerged first, so its
  weight equals the base to float rounding)."""
  for _, m, parent, k in _linears(model, lora_only=True):
    if m.merged: m.unmerge()
    replace_module(parent, k, m.base)
  return model

@contextlib.contextmanager
def disabled(model: Any) -> Iterator[Any]:
  """Inside this block the model computes its base output: exactly, for adapters that are not merged; merged ones are
  unmerged for the while, which gives the base weights to float rounding (and merged again after, even if the block
  raises)."""
  layers = [m for _, m, _, _ in _linears(model, lora_only=True)]
  was_merged = [l for l in layers if l.merged]
  for l in was_merged: l.unmerge()
  for l in layers: l.enabled = False
  try: yield model
  finally:
    for l in layers: l.enabled = True
    for l in was_merged: l.merge()

@contextlib.contextmanager
def mixed_batch(model: Any, adapter_names: list[str], batch_size: int | None = None) -> Iterator[Any]:
  """Inside this block row i of every batch uses adapter `adapter_names[i]` (BASE = "__base__": no adapter), each row
  equal to running its adapter alone, in one batched pass: every adapter's output is computed over the batch and kept
  on its own rows. Nothing is merged. generate(..., adapter_names=...) uses this; a model call inside the block, e.g.
  `with mixed_batch(model, ["chat", BASE]): logits = model(tokens)`, routes its rows the same way."""
  if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
    raise LoraError(f"adapter_names must be a list of adapter names, one per batch row, found {adapter_names!r}")
  if batch_size is not None: _check_rows(len(adapter_names), batch_size)
  masks = {n: Tensor([[[float(r == n)]] for r in adapter_names]).realize() for n in dict.fromkeys(adapter_names) if n != BASE}
  with routed_rows(model, masks): yield model

@contextlib.contextmanager
def routed_rows(model: Any, masks: dict[str, Tensor]) -> Iterator[Any]:
  """Inside this block every LoRA linear adds adapter `name`'s output only to the batch rows where `masks[name]`
  (B, 1, 1) is 1, and no adapter on rows no mask selects. The masks are data: a step captured inside the block
  routes rows by the values its mask tensors hold when it runs (continuous batching changes them between steps)."""
  layers = [m for _, m, _, _ in _linears(model, lora_only=True)]
  known = list_adapters(model)
  if unknown := sorted(n for n in masks if n not in known):
    raise LoraError(f"adapter_names holds unknown adapter(s) {unknown}; the model has {known or 'none'} (and {BASE!r} for the base)")
  if any(l.merged for l in layers): raise LoraError("mixed batches need unmerged adapters; unmerge(model) first")
  for l in layers: l.row_masks = masks
  try: yield model
  finally:
    for l in layers: l.row_masks = None

def _check_rows(names: int, rows: int) -> None:
  if names != rows: raise LoraError(f"adapter_names has {names} name(s) for a batch of {rows} row(s)")
