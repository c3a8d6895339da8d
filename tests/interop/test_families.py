"""Every family tinylora's decoder runs, against the libraries themselves on tiny random checkpoints transformers writes
(conftest.FAMILIES): transformers' logits (eager, float32) and greedy generation past every sliding window, the
checkpoints tinylora saves loading back in transformers, PEFT adapters both ways, a LoRA training step against torch +
PEFT, and mlx-lm adapters both ways where mlx-lm has the architecture."""
import numpy as np, pytest
import tinylora as tl
from tinylora.models.architectures import FULL, SLIDING
from tinylora import load_pretrained, save_pretrained
from tinylora.generate import generate
from .common import (ATOL, MAX_DIFFS, TOKENS, assert_close, hf_generate, hf_logits, hf_model, mlx_loading_saved, mlx_logits,
                     peft_loading_saved, peft_model, tl_logits)
from .conftest import FAMILIES, MLX_FAMILIES, PHI4_MINI_ROPE

pytestmark = pytest.mark.interop

# prompts longer than phi3_longrope's original_max_position_embeddings, so it decodes with the long factors throughout
PROMPTS = [[1, 5, 9, 33, 2, 60], [3, 3, 41, 0, 12, 8, 63, 17]]
NEW_TOKENS = 12  # every sequence reaches 18-20 positions, several windows long

@pytest.mark.parametrize("name", FAMILIES)
def test_logits_equal_transformers(family_models, tmp_path, name):
  """tinylora's logits equal transformers', and the checkpoint save_pretrained writes loads in transformers with them."""
  model = load_pretrained(family_models[name])
  got = tl_logits(model)
  assert_close(f"family {name}: tinylora vs transformers", got, hf_logits(hf_model(family_models[name])))
  save_pretrained(model, tmp_path)
  assert_close(f"family {name}: tinylora-saved checkpoint in transformers vs tinylora", hf_logits(hf_model(tmp_path)), got)

def test_longrope_short_factors(family_models):
  """A sequence within original_max_position_embeddings runs with LongRoPE's short factors (TOKENS, longer, the long)."""
  short = TOKENS[:, :int(PHI4_MINI_ROPE["original_max_position_embeddings"])]
  path = family_models["phi3_longrope"]
  assert_close("family phi3_longrope, short factors: tinylora vs transformers", tl_logits(load_pretrained(path), short),
               hf_logits(hf_model(path), short))

# (family, config override): each family feature the checks above rely on, switched off in transformers' own model
FEATURES = [("mistral", {"sliding_window": 64}), ("qwen2", {"sliding_window": 64}), ("gemma2", {"sliding_window": 64}),
            ("gemma2", {"attn_logit_softcapping": None}), ("gemma2", {"final_logit_softcapping": None}),
            ("gemma2", {"query_pre_attn_scalar": 8}), ("gemma3_text", {"sliding_window": 64}),
            ("gemma3_text", {"rope_parameters": {t: {"rope_type": "default", "rope_theta": 1e6} for t in (FULL, SLIDING)}}),
            ("gemma3_text_linear", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
            ("phi3", {"sliding_window": 64}),
            ("phi3_longrope", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75}}),
            ("smollm3", {"no_rope_layers": [1, 1, 1, 1]}), ("granite", {"embedding_multiplier": 1.0}),
            ("granite", {"residual_multiplier": 1.0}), ("granite", {"attention_multiplier": 8 ** -0.5}),
            ("granite", {"logits_scaling": 1.0})]

@pytest.mark.parametrize("name, override", FEATURES, ids=[f"{n}-{next(iter(o))}" for n, o in FEATURES])
def test_features_show_in_the_logits(family_models, name, override):
  """The tiny checkpoints exercise what they are meant to: switching a feature off in transformers moves its logits on
  TOKENS by far more than the tolerance of the checks above, so tinylora missing that feature would fail them."""
  from transformers import AutoModelForCausalLM
  path = family_models[name]
  off = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype="float32", **override).eval()
  moved = float(np.abs(hf_logits(off) - hf_logits(hf_model(path))).max())
  assert moved > 100 * ATOL, f"{name}: {override} moves transformers' logits by only {moved:.2e}"

@pytest.mark.parametrize("name", FAMILIES)
def test_generate_equals_transformers(family_models, name):
  """Greedy decoding with the KV cache, one prompt and a batch of two prompts of different lengths, each row against
  transformers' generate on that prompt alone."""
  model, ref = load_pretrained(family_models[name]), hf_model(family_models[name])
  want = [hf_generate(ref, p, NEW_TOKENS) for p in PROMPTS]
  single = generate(model, PROMPTS[0], NEW_TOKENS)
  assert single == want[0], f"{name}: tinylora {single} != transformers {want[0]}"
  batch = generate(model, PROMPTS, NEW_TOKENS)
  assert batch == want, f"{name}: tinylora batch {batch} != transformers {want}"

@pytest.mark.parametrize("name", FAMILIES)
def test_peft_adapter_both_ways(family_peft_adapters, tmp_path, name):
  ref = family_peft_adapters[name]
  model = tl.load_adapter(load_pretrained(ref.base), ref.path)
  assert_close(f"family {name}: PEFT adapter, load_adapter vs PeftModel", tl_logits(model), ref.logits)
  tl.save_adapter(model, tmp_path, format="peft")
  assert_close(f"family {name}: tinylora-saved adapter in PeftModel vs original",
               hf_logits(peft_loading_saved(model, ref.base, tmp_path)), ref.logits)

GRAD_RTOL = 1e-4  # max |difference| of the gradients over the largest |gradient|

@pytest.mark.parametrize("name", ["qwen3", "gemma3_text", "phi3"])
def test_train_step_equals_torch_peft(family_peft_adapters, name):
  """One step of tinylora's Trainer (TinyJit'd forward and backward) from the same PEFT adapter on the same batch gives
  torch + PEFT's loss (mean next-token cross-entropy) and gradient of every LoRA tensor."""
  import torch
  from tinylora.train import TrainConfig, Trainer
  ref = family_peft_adapters[name]
  batch = np.random.default_rng(1).integers(0, 64, (2, 13))
  tokens, targets = batch[:, :-1], batch[:, 1:]  # 12 positions: past every sliding window

  pm = peft_model(ref.base, ref.path, is_trainable=True)
  logits = pm(torch.tensor(tokens)).logits
  torch_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(targets).reshape(-1))
  torch_loss.backward()
  torch_grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad.numpy()
                 for n, p in pm.named_parameters() if p.requires_grad}

  model = tl.load_adapter(load_pretrained(ref.base), ref.path)
  trainer = Trainer(model, TrainConfig(lr=1e-2, iters=1, warmup=0, min_lr_ratio=1.0, weight_decay=0.0, grad_clip=0))
  loss, _ = trainer.train_step([(tokens, targets, np.ones(targets.shape, np.float32))])
  names = [f"{path}.lora_{n}.weight" for path in tl.lora_layers(model) for n in "AB"]
  assert sorted(names) == sorted(torch_grads) and len(names) == len(trainer.grads)

  rel = abs(loss / torch_loss.item() - 1)
  MAX_DIFFS[f"family {name}: train step loss, relative (tinylora Trainer vs torch + PEFT)"] = rel
  assert rel < 1e-5, f"{name}: loss {loss} vs torch {torch_loss.item()}"
  got = np.concatenate([g.numpy().ravel() for g in trainer.grads])
  want = np.concatenate([torch_grads[n].ravel() for n in names])
  scale = float(np.abs(want).max())
  assert_close(f"family {name}: train step LoRA gradients / max |gradient| (tinylora vs torch + PEFT)",
               got / scale, want / scale, atol=GRAD_RTOL)

@pytest.mark.parametrize("name", MLX_FAMILIES)
def test_mlx_adapter_both_ways(family_mlx_adapters, tmp_path, name):
  ref, tokens = family_mlx_adapters[name], MLX_FAMILIES[name]
  model = tl.load_adapter(load_pretrained(ref.base), ref.path)
  assert_close(f"family {name}: mlx-lm adapter, load_adapter vs mlx-lm", tl_logits(model, tokens), ref.logits)
  tl.save_adapter(model, tmp_path, format="mlx")
  assert_close(f"family {name}: tinylora-saved adapter in mlx-lm vs original",
               mlx_logits(mlx_loading_saved(model, ref.base, tmp_path), tokens), ref.logits)
