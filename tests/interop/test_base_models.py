"""tinylora's forward equals transformers' on checkpoints transformers wrote (fp32)."""
import json
import pytest
from tinylora.models import load_pretrained
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
