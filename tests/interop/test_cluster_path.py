"""The path to a cluster and back, through the adapter files alone: tinylora trains an adapter data parallel on two
(virtual CPU) devices, torch + PEFT continues it under accelerate (one process here; on a cluster the same script runs
under `accelerate launch` with DDP, FSDP or DeepSpeed, see docs/devices.md), and tinylora loads the result and trains on.
At each hand-off the receiving library's loss on a held-out batch equals the sending library's, and the loss keeps
falling from there. Only the adapter crosses: each side starts its own AdamW moments."""
import numpy as np, pytest
import tinylora as tl
from tinylora import load_pretrained
from tinylora.train import TrainConfig, Trainer, lm_loss, to_devices
from tinygrad import Tensor
from .common import MAX_DIFFS, peft_loading_saved, peft_model
from .conftest import T7

pytestmark = pytest.mark.interop

LR, STEPS, BATCH, SEQ = 1e-2, 6, 4, 16
HANDOFF_RTOL = 1e-5  # float32 tinygrad vs torch on the same weights; the parity tests see ~1e-7

def batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Sequences that step by 3 through the vocabulary (64): learnable, so every phase can lower the loss."""
  seqs = (np.random.default_rng(seed).integers(0, 64, (BATCH, 1)) + 3 * np.arange(SEQ + 1)) % 64
  return seqs[:, :-1], seqs[:, 1:]

HELD_OUT = batch(1000)

def tl_loss(model) -> float:
  tokens, targets = (Tensor(a.astype(np.int32)) for a in HELD_OUT)
  return lm_loss(model(tokens), targets, Tensor.ones(*targets.shape)).item()

def tl_train(model, first_step: int, devices=None) -> None:
  trainer = Trainer(model, TrainConfig(lr=LR, iters=STEPS, warmup=0, min_lr_ratio=1.0), devices=devices)
  for s in range(first_step, first_step + STEPS):
    tokens, targets = batch(s)
    trainer.train_step([(tokens, targets, np.ones(targets.shape, np.float32))])

def torch_loss(model) -> float:
  import torch
  tokens, targets = (torch.tensor(a) for a in HELD_OUT)
  with torch.no_grad(): logits = model(tokens).logits
  return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()

def check_handoff(name: str, received: float, sent: float) -> None:
  MAX_DIFFS[f"cluster path: held-out loss at the hand-off {name}, relative"] = rel = abs(received / sent - 1)
  assert rel < HANDOFF_RTOL, f"{name}: loss {received} after the hand-off, {sent} before"

def test_tinylora_to_torch_peft_and_back(hf_models, needs_peft, tmp_path):
  import torch
  from accelerate import Accelerator
  base = hf_models["llama"]

  # 1. tinylora, data parallel on two devices, saves a PEFT adapter
  model = tl.inject(load_pretrained(base), tl.LoraConfig(r=4, lora_alpha=8, target_modules=T7))
  start = tl_loss(model)
  tl_train(model, 0, devices=("CPU:0", "CPU:1"))
  tl.save_adapter(model, tmp_path / "from_tinylora")
  sent = tl_loss(to_devices(model, "CPU"))  # back on one device for the plain forward
  assert sent < start - 0.2, (start, sent)

  # 2. torch + PEFT continue it: what a cluster job does, in one process
  peft_loading_saved(model, base, tmp_path / "from_tinylora")  # PEFT reads exactly tinylora's tensors and scales
  accelerator = Accelerator(cpu=True)
  pm = peft_model(base, tmp_path / "from_tinylora", is_trainable=True)
  check_handoff("tinylora -> PEFT", torch_loss(pm), sent)
  opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
  pm, opt = accelerator.prepare(pm, opt)
  pm.train()
  for s in range(STEPS, 2 * STEPS):
    tokens, targets = (torch.tensor(a) for a in batch(s))
    logits = pm(tokens).logits
    accelerator.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    opt.step()
    opt.zero_grad()
  pm.eval()
  # as under FSDP / DeepSpeed ZeRO-3, where only the gathered state dict holds whole tensors
  accelerator.unwrap_model(pm).save_pretrained(tmp_path / "from_peft", is_main_process=accelerator.is_main_process,
                                               state_dict=accelerator.get_state_dict(pm))
  continued = torch_loss(pm)
  assert continued < sent - 0.1, (sent, continued)

  # 3. back in tinylora: the same loss, and training goes on from there
  model = tl.load_adapter(load_pretrained(base), tmp_path / "from_peft")
  check_handoff("PEFT -> tinylora", tl_loss(model), continued)
  tl_train(model, 2 * STEPS)
  assert tl_loss(model) < continued - 0.05, (continued, tl_loss(model))
