"""Converting through tinylora: a PEFT adapter saved in mlx-lm's format gives PEFT's logits in mlx-lm, and an mlx-lm
adapter saved in PEFT's format gives mlx-lm's logits in PEFT."""
import pytest
import tinylora as tl
from tinylora import LoraError
from tinylora import load_pretrained
from .common import assert_close, hf_logits, mlx_loading_saved, mlx_logits, peft_loading_saved
from .conftest import MLX_VARIANTS, PEFT_VARIANTS

pytestmark = pytest.mark.interop

@pytest.mark.usefixtures("needs_mlx")
@pytest.mark.parametrize("name", [n for n in PEFT_VARIANTS if n != "llama_patterns"])
def test_peft_to_mlx(peft_adapters, tmp_path, name):
  ref = peft_adapters[name]
  model = tl.load_adapter(load_pretrained(ref.base), ref.path)
  tl.save_adapter(model, tmp_path, format="mlx")
  assert_close(f"convert {name}: PEFT -> tinylora -> mlx-lm vs PeftModel",
               mlx_logits(mlx_loading_saved(model, ref.base, tmp_path)), ref.logits)

def test_peft_patterns_are_refused_by_mlx_format(peft_adapters, tmp_path):
  """mlx-lm has one rank and one scale per adapter: per-module ranks must be refused, not silently changed."""
  model = tl.load_adapter(load_pretrained(peft_adapters["llama_patterns"].base), peft_adapters["llama_patterns"].path)
  with pytest.raises(LoraError, match="one rank and scale"): tl.save_adapter(model, tmp_path, format="mlx")

@pytest.mark.usefixtures("needs_peft")
@pytest.mark.parametrize("name", MLX_VARIANTS)
def test_mlx_to_peft(mlx_adapters, tmp_path, name):
  ref = mlx_adapters[name]
  model = tl.load_adapter(load_pretrained(ref.base), ref.path)
  tl.save_adapter(model, tmp_path, format="peft")
  assert_close(f"convert {name}: mlx-lm -> tinylora -> PEFT vs mlx-lm",
               hf_logits(peft_loading_saved(model, ref.base, tmp_path)), ref.logits)
