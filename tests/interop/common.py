"""Shared by the interop tests: the token batch, logits from each library, and the checked comparison whose measured
differences conftest prints at the end of the run. torch, transformers, PEFT and mlx are imported inside the functions:
the fixtures that skip when a package is missing run first."""
from __future__ import annotations
import json, pathlib, warnings
from dataclasses import dataclass
import numpy as np, pytest
from tinygrad import Tensor
import tinylora as tl

TOKENS = np.array([[1, 5, 9, 33, 2, 60, 17], [3, 3, 41, 0, 12, 8, 63]])
ATOL = 1e-4
MAX_DIFFS: dict[str, float] = {}  # check name -> measured max |difference|

@dataclass
class Adapter:
  base: pathlib.Path  # the model directory it was made on
  path: pathlib.Path  # the adapter directory
  logits: np.ndarray  # its library's logits on TOKENS with the adapter applied
  merged: np.ndarray | None = None  # PEFT's logits after merge_and_unload

def assert_close(name: str, got: np.ndarray, want: np.ndarray, atol: float = ATOL) -> None:
  assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
  diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
  MAX_DIFFS[name] = diff
  assert diff <= atol, f"{name}: max |difference| {diff:.3e} > {atol}"

def tl_logits(model, tokens: np.ndarray = TOKENS) -> np.ndarray: return model(Tensor(tokens.astype(np.int32))).numpy()

# ---- transformers / PEFT

def hf_logits(model, tokens: np.ndarray = TOKENS) -> np.ndarray:
  import torch
  with torch.no_grad(): return model(torch.tensor(tokens)).logits.numpy()

def hf_model(path: pathlib.Path):
  """The checkpoint in transformers with eager attention in float32: the plain reference implementation (sdpa and the
  others are kernels that must agree with it)."""
  from transformers import AutoModelForCausalLM
  return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype="float32").eval()

def hf_generate(model, prompt: list[int], max_new_tokens: int) -> list[int]:
  """transformers' greedy continuation of one prompt, never stopping early (no end-of-sequence token). The attention
  mask is given: generate would otherwise mask every prompt token equal to the pad token."""
  import torch
  model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
  ids = torch.tensor([prompt])
  with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
  return out[0, len(prompt):].tolist()

def peft_model(base: pathlib.Path, adapter: pathlib.Path, **kwargs):
  from peft import PeftModel
  return PeftModel.from_pretrained(hf_model(base), adapter, **kwargs).eval()

def peft_loading_saved(model, base: pathlib.Path, path: pathlib.Path):
  """PeftModel of the adapter tinylora saved from `model` at `path`, checked to hold exactly tinylora's tensors and
  scales: PEFT only warns about a missing tensor (keeping that B at zero) and ignores extra tensors silently."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pm = peft_model(base, path)
  assert not [w.message for w in caught if "missing" in str(w.message) or "nexpected" in str(w.message)]
  layers = tl.lora_layers(model)
  loaded = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if "default" in getattr(m, "lora_A", {})}
  assert sorted(loaded) == sorted(layers)
  for path, layer in layers.items():
    assert loaded[path].scaling["default"] == pytest.approx(layer.scale), path
    for n in "AB":
      np.testing.assert_array_equal(getattr(loaded[path], f"lora_{n}")["default"].weight.detach().numpy(),
                                    getattr(layer, f"lora_{n}").numpy(), err_msg=f"{path}.lora_{n}")
  return pm

def torch_adamw_losses(pm, tokens: np.ndarray, targets: np.ndarray, steps: int, lr: float, wd: float) -> list[float]:
  """The losses of `steps` torch AdamW steps on pm's trainable parameters (mean next-token cross-entropy)."""
  import torch
  opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
  losses = []
  for _ in range(steps):
    logits = pm(torch.tensor(tokens)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(targets).reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
  return losses

def tl_adamw_losses(model, tokens: np.ndarray, targets: np.ndarray, steps: int, lr: float, wd: float) -> list[float]:
  """The same steps with tinylora's Trainer: constant learning rate, no clipping."""
  from tinylora.train import TrainConfig, Trainer
  trainer = Trainer(model, TrainConfig(lr=lr, iters=steps, warmup=0, min_lr_ratio=1.0, weight_decay=wd, grad_clip=0))
  mask = np.ones(targets.shape, np.float32)
  return [trainer.train_step([(tokens, targets, mask)])[0] for _ in range(steps)]

# ---- mlx-lm

def mlx_load(path: pathlib.Path):
  """(model, config) as mlx_lm.utils.load_model gives them. mlx-lm reads only a top-level rope_theta, which
  transformers 5 does not write (it writes rope_parameters.rope_theta), so that value is passed on explicitly."""
  from mlx_lm.utils import load_model
  theta = json.loads((path / "config.json").read_text()).get("rope_parameters", {}).get("rope_theta")
  return load_model(path, model_config={"rope_theta": theta} if theta else None)

def mlx_logits(model, tokens: np.ndarray = TOKENS) -> np.ndarray:
  import mlx.core as mx
  return np.array(model(mx.array(tokens)))

def mlx_with_adapter(base: pathlib.Path, adapter: pathlib.Path):
  from mlx_lm.tuner.utils import load_adapters
  model, _ = mlx_load(base)
  load_adapters(model, str(adapter))
  model.eval()
  return model

def mlx_loading_saved(model, base: pathlib.Path, path: pathlib.Path):
  """mlx-lm model with the adapter tinylora saved from `model` at `path`, checked to hold exactly tinylora's tensors:
  load_adapters accepts missing tensors silently (that B stays zero)."""
  from mlx.utils import tree_flatten
  mlx_model = mlx_with_adapter(base, path)
  loaded = {k: np.array(v) for k, v in tree_flatten(mlx_model.parameters()) if k.endswith((".lora_a", ".lora_b"))}
  saved = {f"{p}.lora_{n.lower()}": getattr(l, f"lora_{n}").numpy().T for p, l in tl.lora_layers(model).items() for n in "AB"}
  assert sorted(loaded) == sorted(saved)
  for k, v in saved.items(): np.testing.assert_array_equal(loaded[k], v, err_msg=k)
  return mlx_model

