"""LoraConfig: which linears get an adapter and with what rank and scale, with HF PEFT's names and defaults."""
from __future__ import annotations
import math, re, sys
from dataclasses import dataclass, field
from tinylora.errors import LoraError

ALL_LINEAR = "all-linear"
# target_modules=None means the model family's default (PEFT's per model type), which inject resolves; this one for a
# model that names none (and for matching an unresolved config)
DEFAULT_TARGETS = ("q_proj", "v_proj")
# Output heads that "all-linear" leaves alone, as PEFT does.
HEAD_NAMES = ("lm_head", "output", "embed_out")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")

def layer_index(path: str) -> int | None:
  """The block index in a dotted module path such as `model.layers.3.self_attn.q_proj`, or None."""
  m = _LAYER_INDEX.search(path)
  return int(m.group(1)) if m else None

def is_int(v) -> bool: return isinstance(v, int) and not isinstance(v, bool)

# abs(v) <= float max rejects nan, inf and ints too large for a float (math.isfinite would raise OverflowError)
def is_number(v) -> bool: return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= sys.float_info.max

def _pattern_regex(key: str) -> str:
  # PEFT: a rank_pattern/alpha_pattern key is a name or regex matched against the end of the module path
  return rf"(.*\.)?({key})$"

def _pattern_key(patterns: dict, path: str) -> str | None:
  return next((k for k in patterns if re.match(_pattern_regex(k), path)), None)

@dataclass
class LoraConfig:
  """LoRA hyperparameters, named as in HF PEFT's LoraConfig.

  target_modules: module names (a module matches when its dotted path equals the name or ends with "." + name),
  a regex string matched against the whole path, "all-linear" (every linear except the output head), or None (the
  default): the model family's default, as PEFT's (q_proj and v_proj; Phi-3's fused qkv_proj), resolved by inject.
  init_lora_weights: True (A as nn.Linear's kaiming-uniform init, B = 0, so the adapter starts as the identity),
  "gaussian" (A normal with standard deviation 1/r, as PEFT draws it; B = 0) or False (A and B both random: for tests).
  use_dora: DoRA (weight-decomposed LoRA): each row of W + scale * B @ A is normalised and scaled by a trained magnitude."""
  r: int = 8
  lora_alpha: float = 8
  lora_dropout: float = 0.0
  target_modules: list[str] | str | None = None
  use_rslora: bool = False
  layers_to_transform: list[int] | None = None
  init_lora_weights: bool | str = True
  rank_pattern: dict[str, int] = field(default_factory=dict)
  alpha_pattern: dict[str, float] = field(default_factory=dict)
  use_dora: bool = False

  def __post_init__(self):
    def check(ok: bool, what: str, value, expected: str):
      if not ok: raise LoraError(f"LoraConfig.{what} = {value!r}: expected {expected}")
    check(is_int(self.r) and self.r >= 1, "r", self.r, "an integer >= 1")
    check(is_number(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "a finite number > 0")
    check(is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout,
          "a number in [0, 1)")
    if isinstance(self.target_modules, (set, tuple)): self.target_modules = sorted(self.target_modules, key=str)
    if isinstance(self.target_modules, str):
      check(bool(self.target_modules), "target_modules", self.target_modules, "a non-empty regex or 'all-linear'")
      try: re.compile(self.target_modules)
      except re.error as e: raise LoraError(f"LoraConfig.target_modules = {self.target_modules!r} is not a valid regex: {e}")
    elif self.target_modules is not None:
      check(isinstance(self.target_modules, list) and len(self.target_modules) > 0 and
            all(isinstance(t, str) and t for t in self.target_modules), "target_modules", self.target_modules,
            "a non-empty list of module names, a regex string, 'all-linear' or None")
    check(isinstance(self.use_rslora, bool), "use_rslora", self.use_rslora, "True or False")
    check(isinstance(self.use_dora, bool), "use_dora", self.use_dora, "True or False")
    if is_int(self.layers_to_transform): self.layers_to_transform = [self.layers_to_transform]
    check(self.layers_to_transform is None or (isinstance(self.layers_to_transform, list) and
          all(is_int(i) and i >= 0 for i in self.layers_to_transform)), "layers_to_transform", self.layers_to_transform,
          "None, or a list of block indices >= 0")
    check(self.init_lora_weights in (True, False, "gaussian"), "init_lora_weights", self.init_lora_weights,
          "True, False or 'gaussian'")
    check(isinstance(self.rank_pattern, dict) and all(isinstance(k, str) and is_int(v) and v >= 1
                                                      for k, v in self.rank_pattern.items()),
          "rank_pattern", self.rank_pattern, "a dict of module name/regex -> integer rank >= 1")
    check(isinstance(self.alpha_pattern, dict) and all(isinstance(k, str) and is_number(v) and v > 0
                                                       for k, v in self.alpha_pattern.items()),
          "alpha_pattern", self.alpha_pattern, "a dict of module name/regex -> alpha > 0")
    for k in [*self.rank_pattern, *self.alpha_pattern]:
      try: re.compile(_pattern_regex(k))
      except re.error as e: raise LoraError(f"LoraConfig pattern key {k!r} is not a valid regex: {e}") from None

  def matches(self, path: str) -> bool:
    """Whether the linear at dotted `path` gets an adapter (PEFT's matching rules)."""
    if self.target_modules == ALL_LINEAR: hit = path.rsplit(".", 1)[-1] not in HEAD_NAMES
    elif isinstance(self.target_modules, str): hit = re.fullmatch(self.target_modules, path) is not None
    else: hit = any(path == t or path.endswith("." + t) for t in self.target_modules or DEFAULT_TARGETS)
    if hit and self.layers_to_transform is not None: hit = layer_index(path) in self.layers_to_transform
    return hit

  def rank(self, path: str) -> int:
    key = _pattern_key(self.rank_pattern, path)
    return self.r if key is None else self.rank_pattern[key]

  def scale(self, path: str) -> float:
    key = _pattern_key(self.alpha_pattern, path)
    alpha = self.lora_alpha if key is None else self.alpha_pattern[key]
    r = self.rank(path)
    return alpha / math.sqrt(r) if self.use_rslora else alpha / r
