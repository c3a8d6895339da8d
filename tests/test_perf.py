"""Machine-independent performance facts: FLOP and kernel counts, which tinygrad computes deterministically for a given
graph and renderer. Small configs keep this file to seconds; timings and the full-size model are in bench/run.py."""
import numpy as np, pytest
from tinygrad import Tensor, GlobalCounters, nn
from tinygrad.uop.ops import Ops
from tinylora import LoraConfig, LoraLinear, inject
from tinylora.models.decoder import Model
from tinylora.train import Trainer, TrainConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CFG = dict(model_type="llama", hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
BATCH, SEQ, RANK = 2, 64, 8

def run_counted(fn) -> tuple[int, int]:
  """(kernels, FLOPs) that running fn executes."""
  GlobalCounters.reset()
  fn()
  return GlobalCounters.kernel_count, GlobalCounters.global_ops

def analytic_forward_flops(cfg: dict, batch: int, seq: int, r: int) -> int:
  """2 x (weights used in matmuls: the 7 projections per layer, their LoRA A and B, lm_head) x tokens, plus attention
  4 x batch x layers x heads x seq^2 x head_dim (q@k.T and probs@v over the full square; the causal mask is applied,
  not skipped). The embedding is a lookup; norms, RoPE and softmax are not counted."""
  d, f, L, H, kv = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                      "num_key_value_heads"))
  hd = d // H
  shapes = [(d, H * hd), (d, kv * hd), (d, kv * hd), (H * hd, d), (d, f), (d, f), (f, d)]
  weights = L * sum(i * o + r * (i + o) for i, o in shapes) + d * cfg["vocab_size"]
  return 2 * weights * batch * seq + 4 * batch * L * H * seq * seq * hd

@pytest.fixture(scope="module")
def model_flops() -> tuple[int, int]:
  """(forward FLOPs, train step FLOPs): the forward is model(tokens) -> logits; the step is one Trainer.train_step,
  i.e. its two TinyJits _accumulate (loss, LoRA gradients, norm) and _apply (clipping, AdamW)."""
  Tensor.manual_seed(0)
  config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False)
  model = inject(Model.from_config(CFG), config)
  tokens = np.random.default_rng(0).integers(0, CFG["vocab_size"], (BATCH, SEQ + 1)).astype(np.int32)
  batch = (tokens[:, :-1].copy(), tokens[:, 1:].copy(), np.ones((BATCH, SEQ), np.float32))
  _, forward = run_counted(lambda: model(Tensor(batch[0])).realize())
  trainer = Trainer(model, TrainConfig())
  _, step = run_counted(lambda: trainer.train_step([batch]))
  return forward, step

def test_train_step_flops_near_twice_forward(model_flops):
  # a frozen-base LoRA step needs the forward plus about one more for the input gradients; recomputed elementwise work
  # inside matmuls (see the notes in tinylora/models/decoder.py) shows up here first
  forward, step = model_flops
  assert step / forward <= 2.2, f"train step {step / 1e6:.1f} MFLOP = {step / forward:.3f} x forward {forward / 1e6:.1f} MFLOP"

def test_forward_flops_near_analytic(model_flops):
  forward, _ = model_flops
  analytic = analytic_forward_flops(CFG, BATCH, SEQ, RANK)
  assert forward <= 1.25 * analytic, f"forward {forward / 1e6:.1f} MFLOP = {forward / analytic:.3f} x analytic"

def lora_layer(d=64, r=8, tokens=16) -> tuple[LoraLinear, Tensor, Tensor]:
  Tensor.manual_seed(0)
  layer = LoraLinear(nn.Linear(d, d, bias=False), r, scale=2.0, init=False)
  Tensor.realize(*nn.state.get_parameters(layer))
  return layer, Tensor.randn(tokens, d).realize(), Tensor.randn(tokens, d).realize()

def test_lora_linear_forward_kernels():
  layer, x, _ = lora_layer()
  base, _ = run_counted(lambda: layer.base(x).realize())
  lora, _ = run_counted(lambda: layer(x).realize())
  assert 1 <= lora - base <= 2, f"LoRA forward takes {lora} kernels, the base {base}"
  fused = layer.fuse()
  layer.merge()
  assert run_counted(lambda: layer(x).realize())[0] == base
  assert run_counted(lambda: fused(x).realize())[0] == base

def lora_outputs(fwd_bwd: bool) -> list[Tensor]:
  """A fresh LoRA linear's output and, with fwd_bwd, its input, A and B gradients (as training needs them)."""
  layer, x, g = lora_layer()
  y = layer(x)
  return [y, *(y * g).sum().gradient(x, layer.lora_A, layer.lora_B)] if fwd_bwd else [y]

@pytest.mark.parametrize("fwd_bwd", [False, True], ids=["forward", "forward+backward"])
def test_metal_renders_same_kernels(fwd_bwd):
  """Renders the LoRA schedule with tinygrad's Metal renderer (source only: MetalRenderer.__init__ loads a macOS
  library, which the subclass skips), so graphs Metal could not take fail here on Linux too."""
  try:
    from tinygrad.helpers import Target
    from tinygrad.device import Compiler
    from tinygrad.renderer.cstyle import MetalRenderer
    from tinygrad.codegen import to_program
    from tinygrad.codegen.opt import tc
  except ImportError as e: pytest.skip(f"tinygrad's Metal renderer is not importable here: {e}")
  class MetalSrcRenderer(MetalRenderer):
    def __init__(self, target: Target): self.target, self.compiler, self.tensor_cores = target, Compiler(), tc.metal
  outputs = lora_outputs(fwd_bwd)
  cpu, _ = run_counted(lambda: Tensor.realize(*outputs))
  kernels = [c.src[0] for c in Tensor.schedule_linear(*lora_outputs(fwd_bwd)).src if c.src[0].op is Ops.SINK]
  renderer = MetalSrcRenderer(Target(device="METAL", arch="Apple9"))
  sources = [next(s.arg for s in to_program(k, renderer).src if s.op is Ops.SOURCE) for k in kernels]
  assert sum(src.count("kernel void") for src in sources) == len(kernels) == cpu
