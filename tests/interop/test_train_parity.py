"""A few AdamW steps on the LoRA tensors from the same PEFT adapter and batch give torch + PEFT's loss trajectory."""
import numpy as np, pytest
import tinylora as tl
from tinylora import load_pretrained
from .common import MAX_DIFFS, assert_close, peft_model, tl_adamw_losses, torch_adamw_losses

pytestmark = pytest.mark.interop

LR, WD, STEPS = 1e-2, 0.1, 5

def test_adamw_trajectory_matches_torch_peft(peft_adapters):
  ref = peft_adapters["llama_std"]
  batch = np.random.default_rng(0).integers(0, 64, (4, 17))
  tokens, targets = batch[:, :-1], batch[:, 1:]  # mean next-token cross-entropy over every position, on both sides

  pm = peft_model(ref.base, ref.path, is_trainable=True)
  assert len([p for p in pm.parameters() if p.requires_grad]) == 2 * 7 * 2
  torch_losses = torch_adamw_losses(pm, tokens, targets, STEPS, LR, WD)
  model = tl.load_adapter(load_pretrained(ref.base), ref.path)
  tl_losses = tl_adamw_losses(model, tokens, targets, STEPS, LR, WD)

  rel = np.abs(np.array(tl_losses) / np.array(torch_losses) - 1)
  MAX_DIFFS["train: loss trajectory, relative (tinylora Trainer vs torch AdamW + PEFT)"] = float(rel.max())
  assert rel.max() < 1e-4, f"tinylora {tl_losses} vs torch {torch_losses}"
  assert torch_losses[-1] < torch_losses[0] - 0.05  # the steps really moved the adapter
  peft_weights = {n.removeprefix("base_model.model.").replace(".default", ""): p.detach().numpy()
                  for n, p in pm.named_parameters() if p.requires_grad}
  tl_weights = {f"{path}.lora_{n}.weight": getattr(l, f"lora_{n}").numpy() for path, l in tl.lora_layers(model).items() for n in "AB"}
  assert sorted(peft_weights) == sorted(tl_weights)
  assert_close(f"train: every LoRA tensor after {STEPS} steps (tinylora vs torch)",
               np.concatenate([tl_weights[k].ravel() for k in sorted(tl_weights)]),
               np.concatenate([peft_weights[k].ravel() for k in sorted(tl_weights)]))
