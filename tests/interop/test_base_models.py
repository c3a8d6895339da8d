"""tinylora's forward equals transformers' on checkpoints transformers wrote and on checkpoints tests/test_models.py
writes (fp32)."""
import json
import pytest
from tinylora import load_pretrained, save_pretrained
from test_models import VARIANTS, hf_weights, logits_of, tiny_config, tokens_np, write_checkpoint
from .common import assert_close, hf_logits, hf_model, tl_logits

pytestmark = pytest.mark.interop

@pytest.mark.parametrize("name", ["llama", "qwen2", "llama_tied"])
def test_logits_equal_transformers(hf_models, name):
  assert_close(f"base {name}: tinylora vs transformers", tl_logits(load_pretrained(hf_models[name])),
               hf_logits(hf_model(hf_models[name])))

def test_rope_theta_is_read_from_rope_parameters(hf_models):
  """transformers 5 writes the theta only under rope_parameters; 1000 (not the default 10000) must reach the model."""
  cfg = json.loads((hf_models["llama"] / "config.json").read_text())
  if "rope_theta" in cfg: pytest.skip("this transformers version writes a top-level rope_theta")
  assert cfg["rope_parameters"]["rope_theta"] == 1000.0
  assert load_pretrained(hf_models["llama"]).config.rope_theta == 1000.0

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 4}

@pytest.mark.parametrize("name", ["llama_gqa", "mistral_mha", "qwen2_bias_tied", "head_dim_given", "llama3_scaling"])
def test_config_variants_equal_transformers(needs_transformers, tmp_path, name):
  """Checkpoints written by tests/test_models.py's helpers (MHA, head_dim given, llama3 RoPE scaling with positions past
  the original length): transformers' logits, and again after save_pretrained."""
  import torch
  cfg = VARIANTS.get(name) or tiny_config(rope_scaling=LLAMA3_SCALING)
  write_checkpoint(tmp_path / "ours", cfg, hf_weights(cfg))
  with torch.no_grad(): expected = hf_model(tmp_path / "ours")(torch.tensor(tokens_np()).long()).logits.numpy()
  assert_close(f"base {name}: tinylora vs transformers", logits_of(load_pretrained(tmp_path / "ours"), tokens_np()), expected)
  save_pretrained(load_pretrained(tmp_path / "ours"), tmp_path / "saved")
  with torch.no_grad(): saved = hf_model(tmp_path / "saved")(torch.tensor(tokens_np()).long()).logits.numpy()
  assert_close(f"base {name}: tinylora-saved checkpoint in transformers", saved, expected)
