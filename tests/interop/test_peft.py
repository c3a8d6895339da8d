"""Adapters written by HF PEFT give PeftModel's logits in tinylora (unmerged, merged, fused), and the adapters tinylora
saves load in PEFT with every tensor and give the same logits."""
import json
import pytest
import tinylora as tl
from tinylora import load_pretrained
from .common import assert_close, hf_logits, peft_loading_saved, tl_logits
from .conftest import PEFT_VARIANTS

pytestmark = pytest.mark.interop

def test_peft_writes_what_tinylora_reads(peft_adapters):
  """The PEFT 0.21 config fields these tests cover: "all-linear" is saved as resolved full paths, patterns as given."""
  def cfg(name): return json.loads((peft_adapters[name].path / "adapter_config.json").read_text())
  all_linear = cfg("llama_alllinear")["target_modules"]
  assert len(all_linear) == 14 and "model.layers.1.mlp.down_proj" in all_linear
  assert cfg("llama_layer1")["layers_to_transform"] == [1] and cfg("llama_rslora")["use_rslora"] is True
  assert cfg("llama_patterns")["rank_pattern"] == {"q_proj": 8, "model.layers.1.mlp.down_proj": 2}
  assert cfg("llama_patterns")["alpha_pattern"] == {"v_proj": 32, "layers.0.mlp.up_proj": 3}

@pytest.mark.parametrize("name", PEFT_VARIANTS)
def test_peft_adapter_logits(peft_adapters, name):
  ref = peft_adapters[name]
  model = tl.load_adapter(load_pretrained(ref.base), ref.path)
  assert_close(f"peft {name}: load_adapter vs PeftModel", tl_logits(model), ref.logits)
  tl.merge(model)
  assert_close(f"peft {name}: tl.merge vs PeftModel", tl_logits(model), ref.logits)
  tl.merge_and_unload(model)
  assert not tl.lora_layers(model)
  assert_close(f"peft {name}: tl.merge_and_unload vs PEFT merge_and_unload", tl_logits(model), ref.merged)

@pytest.mark.parametrize("name", PEFT_VARIANTS)
def test_saved_peft_adapter_loads_in_peft(peft_adapters, tmp_path, name):
  ref = peft_adapters[name]
  model = tl.load_adapter(load_pretrained(ref.base), ref.path)
  tl.save_adapter(model, tmp_path, format="peft")
  pm = peft_loading_saved(model, ref.base, tmp_path)
  assert_close(f"peft {name}: tinylora-saved adapter in PeftModel vs original", hf_logits(pm), ref.logits)
