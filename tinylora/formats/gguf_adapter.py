"""llama.cpp LoRA adapter files (convert_lora_to_gguf.py's format, loaded with `--lora`) for every family of
tinylora.models.architectures: one `.gguf` of general.type adapter with tensors `<gguf name>.lora_a` (r, in) and
`.lora_b` (out, r) named as the family's model file names its linears (Phi-3's fused qkv_proj / gate_up_proj as attn_qkv /
ffn_up), B's Q/K rows permuted where the family's converter permutes the weights (Llama, Mistral, Granite, SmolLM3), and
adapter.lora.alpha. llama.cpp scales each pair by alpha / r, r the pair's rank (by 1 where alpha is 0)."""
from __future__ import annotations
import pathlib
from typing import Any
import numpy as np
from tinylora.config import LoraConfig, is_number
from tinylora.errors import LoraError
from tinylora.formats.common import AdapterFile, finite_arrays
from tinylora.formats.gguf import detect  # noqa: F401  this format's detect: a .gguf file
from tinylora.formats.gguf import gguf_name, hf_name, permute_qk, qk_heads, read_array, read_gguf, unpermute_qk, writer
from tinylora.lora import Adapter, adaptable_linears

SIGNATURE = "llama.cpp LoRA (a '.gguf' file)"  # how detect tells it, for the error when no format does
FILE_NAME = "adapter.gguf"  # the file's name when saved into an output directory (tinylora train --format gguf)

def _needs_config(model: Any) -> None:
  if not hasattr(model, "config"): raise LoraError("a GGUF adapter needs a tinylora.models model (its architecture and heads)")

def key(model: Any, path: str, name: str) -> str:
  """The file's tensor name of `name` ("A" or "B") of the adapter at module `path` of `model` (blk.3.attn_q.weight.lora_a)."""
  return f"{gguf_name(f'{path}.weight', model.config.arch)}.lora_{name.lower()}"


def read(model: Any, path: pathlib.Path) -> AdapterFile:
  """The adapter as llama.cpp applies it: each pair's rank is its lora_b's, its scale alpha / rank (1 where
  adapter.lora.alpha is 0: llama.cpp then uses the user's scale alone), llama's Q/K rows of B put back in HF's order.
  The config names every adapted linear by its full path, with rank_pattern (and for alpha 0 alpha_pattern) for the
  linears whose rank differs from the most common one."""
  _needs_config(model)
  kv, infos = read_gguf(path)
  if (kind := kv.get("general.type")) != "adapter" or kv.get("adapter.type") != "lora":
    raise LoraError(f"{path}: not a LoRA adapter (general.type {kind!r}, adapter.type {kv.get('adapter.type')!r}); a GGUF "
                    f"model file loads with load_pretrained")
  if (arch := kv.get("general.architecture")) != (expected := model.config.arch.gguf):
    raise LoraError(f"{path}: an adapter for GGUF architecture {arch!r}, but the model is {expected!r} "
                    f"(model_type {model.config.model_type!r})")
  alpha = kv.get("adapter.lora.alpha", 0.0)
  if not is_number(alpha) or alpha < 0: raise LoraError(f"{path}: adapter.lora.alpha = {alpha!r}: expected a number >= 0")
  paths = {}  # "<gguf name>.weight" -> HF module path
  for name in infos:
    stem, _, half = name.rpartition(".")
    if half not in ("lora_a", "lora_b") or not (hf := hf_name(stem, model.config.arch) or "").endswith(".weight"):
      raise LoraError(f"{path}: tensor {name!r} is not one half of a LoRA pair (<tensor>.weight.lora_a / .lora_b of a "
                      f"linear); tinylora adapters hold low-rank pairs only")
    paths[stem] = hf.removesuffix(".weight")
  if not paths: raise LoraError(f"{path}: the adapter holds no tensors")
  for stem, p in paths.items():
    if missing := [f"{stem}.{h}" for h in ("lora_a", "lora_b") if f"{stem}.{h}" not in infos]:
      raise LoraError(f"{path}: tensor {missing[0]!r} is missing: {p} has only one half of its LoRA pair")
  tensors = {name: read_array(info).astype(np.float32) for name, info in infos.items()}
  ranks = {p: tensors[f"{stem}.lora_b"].shape[-1] for stem, p in paths.items()}
  shapes = adaptable_linears(model)
  for stem, p in paths.items():  # B as the model will check it: a mis-shaped B is refused there, not reordered here
    B = tensors[f"{stem}.lora_b"]
    if (heads := qk_heads(model.config, f"{p}.weight")) is not None and p in shapes and B.shape[:1] == shapes[p][:1]:
      tensors[f"{stem}.lora_b"] = unpermute_qk(B, heads)
  r = max(sorted(set(ranks.values())), key=list(ranks.values()).count)
  rank_pattern = {p: k for p, k in ranks.items() if k != r}
  try:
    config = LoraConfig(r=r, lora_alpha=alpha or r, target_modules=sorted(paths.values()), rank_pattern=rank_pattern,
                        alpha_pattern={} if alpha else dict(rank_pattern))
  except LoraError as e: raise LoraError(f"{path}: {e}") from None
  return AdapterFile(config, tensors, lambda p, name: key(model, p, name), str(path), str(path))

def write(model: Any, layers: dict[str, Adapter], config: LoraConfig, path: pathlib.Path) -> None:
  """Writes the adapters as one llama.cpp LoRA file `path`, atomically, with adapter.lora.alpha such that llama.cpp's
  scale alpha / r equals each layer's scale (folded into B where layers differ in rank or scale)."""
  if config.use_dora: raise LoraError("llama.cpp adapters are LoRA only; save a DoRA adapter as peft or mlx")
  _needs_config(model)
  arrays = finite_arrays({key(model, p, n): t for p, a in layers.items() for n, t in (("A", a.lora_A), ("B", a.lora_B))})
  scales, ranks = {l.scale for l in layers.values()}, {l.r for l in layers.values()}
  alpha = scales.pop() * ranks.pop() if len(scales) == 1 and len(ranks) == 1 else 1.0
  with writer(path, model.config, "adapter") as (w, gguf):
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for p, layer in layers.items():
      if p == "lm_head" and model.config.tie_word_embeddings:
        raise LoraError("llama.cpp ignores an adapter on a tied lm_head; save this adapter as PEFT or mlx instead")
      A, B = arrays[key(model, p, "A")], arrays[key(model, p, "B")] * (layer.scale * layer.r / alpha)
      if (heads := qk_heads(model.config, f"{p}.weight")) is not None: B = permute_qk(B, heads)
      w.add_tensor(key(model, p, "A"), np.ascontiguousarray(A, np.float32))
      w.add_tensor(key(model, p, "B"), np.ascontiguousarray(B, np.float32))
