"""Every family's GGUF in llama.cpp (llama-cpp-python): the files tinylora writes give tinylora's logits in llama.cpp,
and files written as llama.cpp's converter writes them (tests/test_gguf_families.py, which loads them in tinylora) give
the same model's logits in llama.cpp. Phi-3: llama.cpp runs it without its sliding window (its loader turns "Phi SWA"
off), so llama.cpp's logits equal those of the model without the window, and the windowed model's only inside it."""
import pathlib
import numpy as np, pytest
import tinylora as tl
from test_gguf_families import FAMILIES, GGUF_ARCH, TOKENS, make, write_like_converter
from .common import assert_close

pytestmark = pytest.mark.interop
WINDOW = FAMILIES["phi3"]["sliding_window"]

def llama_cpp_logits(path: pathlib.Path) -> np.ndarray:
  llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install llama-cpp-python")
  llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0)  # float32 KV cache
  llm.eval(TOKENS.numpy()[0].tolist())
  return np.array(llm.scores[:TOKENS.shape[1]])[None]

def model(model_type: str, **changes):
  """The family's test model; Gemma 3 with six layers, so that one of them is a full-attention layer with the global RoPE."""
  return make(model_type, **({"num_hidden_layers": 6} if model_type == "gemma3_text" else {}), **changes)

def as_llama_cpp_runs_it(model_type: str) -> np.ndarray:
  """The logits of the family's test model as llama.cpp runs its GGUF: Phi-3 without its sliding window."""
  return model(model_type, **({"sliding_window": None} if model_type == "phi3" else {}))(TOKENS).numpy()

@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_tinylora_written_gguf_runs_in_llama_cpp(model_type, tmp_path):
  m = model(model_type)
  tl.save_pretrained(m, tmp_path / "m.gguf", format="gguf", quantization="f32")
  got = llama_cpp_logits(tmp_path / "m.gguf")
  assert_close(f"{model_type}: tinylora-written f32 GGUF in llama.cpp", got, as_llama_cpp_runs_it(model_type), atol=2e-3)
  if model_type == "phi3":  # the window is all that differs
    windowed = m(TOKENS).numpy()
    assert_close("phi3: llama.cpp inside the sliding window", got[:, :WINDOW], windowed[:, :WINDOW], atol=2e-3)
    assert np.abs(got[:, WINDOW:] - windowed[:, WINDOW:]).max() > 1e-2

@pytest.mark.parametrize("model_type", list(GGUF_ARCH))
def test_converter_named_gguf_runs_in_llama_cpp(model_type, tmp_path):
  write_like_converter(tmp_path / "m.gguf", model(model_type), model_type)
  assert_close(f"{model_type}: converter-named GGUF in llama.cpp", llama_cpp_logits(tmp_path / "m.gguf"),
               as_llama_cpp_runs_it(model_type), atol=2e-3)
