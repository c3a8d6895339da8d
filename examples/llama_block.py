"""LoRA on one Llama-style decoder block, end to end: inject adapters into the seven HF projections (q/k/v/o with GQA,
gate/up/down), train a few steps with a TinyJit'd step that updates only A and B, merge, and compare.

  python examples/llama_block.py        (DEV=CPU / METAL / CUDA / NV picks the device; default: the best available)
"""
import numpy as np
from tinygrad import Context, Device, GlobalCounters, Tensor, TinyJit, nn
import tinylora as tl
from tinylora.models import Model
from tinylora.train import lm_loss

CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 1,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}

def kernels(f) -> int:
  GlobalCounters.reset()
  f().realize()
  return GlobalCounters.kernel_count

def main():
  Tensor.manual_seed(0)
  model = Model.from_config(CONFIG)  # embedding -> one decoder block (RMSNorm, RoPE, GQA attention, SwiGLU MLP) -> head
  tokens = Tensor(np.random.default_rng(0).integers(0, 128, (4, 32)).astype(np.int32)).realize()
  targets = Tensor(np.roll(tokens.numpy(), -1, axis=1)).realize()  # learn to predict the next token of a fixed batch
  mask = Tensor.ones(4, 32).contiguous().realize()
  base_logits, base_k = model(tokens).numpy(), kernels(lambda: model(tokens))

  tl.inject(model, tl.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"]))
  trainable, total = tl.count_parameters(model)
  print(f"device {Device.DEFAULT}: trainable {trainable:,} of {total:,} parameters")
  print("k_proj A/B shapes (GQA):", model.model.layers[0].self_attn.k_proj.lora_A.shape, model.model.layers[0].self_attn.k_proj.lora_B.shape)
  print("B = 0 at init, max |lora - base| =", np.abs(model(tokens).numpy() - base_logits).max())

  params = tl.trainable_parameters(model)  # A and B only; every base weight is frozen
  opt = nn.optim.AdamW(params, lr=1e-2)
  @TinyJit
  def step() -> Tensor:
    loss = lm_loss(model(tokens), targets, mask)
    for p, g in zip(params, loss.gradient(*params)): p.grad = g  # gradients of the LoRA tensors only
    return loss.realize(*opt.schedule_step())
  with Context(TRAINING=1):
    for i in range(20):
      loss = step().item()
      if i % 5 == 0 or i == 19: print(f"step {i:2d}  loss {loss:.3f}")

  lora_logits, lora_k = model(tokens).numpy(), kernels(lambda: model(tokens))
  tl.merge(model)
  merged_logits, merged_k = model(tokens).numpy(), kernels(lambda: model(tokens))
  print(f"max |merged - unmerged| = {np.abs(merged_logits - lora_logits).max():.2e}")
  print(f"forward kernels: base {base_k}, LoRA {lora_k} ({lora_k - base_k} more for 7 adapters), merged {merged_k}")
  tl.merge_and_unload(model)
  print("after merge_and_unload:", type(model.model.layers[0].self_attn.q_proj).__name__, "- no LoRA tensors left:",
        not any("lora" in k for k in nn.state.get_state_dict(model)))

if __name__ == "__main__":
  main()
