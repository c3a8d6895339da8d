"""Decoder layers as tinygrad functions: the same loss and LoRA gradients as the inlined layers, one compiled body for
every layer, and with grad_checkpoint the activations of each layer recomputed in the backward (less memory, more
FLOPs), as TrainConfig(grad_checkpoint=True) asks."""
import numpy as np, pytest
from tinygrad import GlobalCounters, Tensor
from tinygrad.helpers import Context
import tinylora as tl
from tinylora.errors import LoraError
from tinylora.engine import peak_memory
from tinylora.models import Model
from tinylora.train import Trainer, TrainConfig

CONFIG = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False)
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 32)).astype(np.int32)

def step(mode: str) -> tuple[float, list[np.ndarray], int, int]:
  """(loss, LoRA gradients, FLOPs, peak bytes) of one forward + backward with the layers run as `mode`."""
  Tensor.manual_seed(0)
  model = Model.from_config(CONFIG)
  tl.inject(model, tl.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
  model.layers_as_functions, model.grad_checkpoint = mode == "function", mode == "checkpoint"
  params = tl.trainable_parameters(model)
  GlobalCounters.reset()
  with Context(TRAINING=1), peak_memory() as peak:
    loss = model(Tensor(TOKENS)).logsumexp(-1).mean()
    grads = loss.gradient(*params)
    Tensor.realize(loss, *grads)
  flops = GlobalCounters.global_ops  # read first: reading a function's outputs again may run it again
  return loss.item(), [g.numpy() for g in grads], flops, peak.added

@pytest.mark.slow  # compiles three variants of the model's forward and backward: 1.5-2.5 minutes on 2 cores
def test_function_and_checkpointed_layers_equal_inlined_layers():
  loss, grads, flops, mem = step("inline")
  f_loss, f_grads, f_flops, f_mem = step("function")
  c_loss, c_grads, c_flops, c_mem = step("checkpoint")
  assert loss == f_loss == c_loss
  for g, f, c in zip(grads, f_grads, c_grads):
    np.testing.assert_allclose(f, g, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(c, g, rtol=1e-6, atol=1e-7)
  assert f_flops <= 1.05 * flops  # the backward reuses the forward's saved intermediates
  assert 1.15 * f_flops < c_flops < 1.6 * f_flops  # checkpointing recomputes each layer's forward
  assert c_mem < 0.85 * f_mem, (c_mem, f_mem)

def test_trainer_option_and_its_refusal(tiny_lm):
  Tensor.manual_seed(0)
  model = Model.from_config(CONFIG)
  tl.inject(model, tl.LoraConfig(r=4, target_modules="all-linear"))
  Trainer(model, TrainConfig(grad_checkpoint=True))
  assert not model.grad_checkpoint  # set only while the Trainer's steps run (tests/test_train.py)
  tl.inject(tiny_lm, tl.LoraConfig(r=2, target_modules=["q_proj"]))
  with pytest.raises(LoraError, match="does not support grad_checkpoint"): Trainer(tiny_lm, TrainConfig(grad_checkpoint=True))
