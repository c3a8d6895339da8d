"""The main job end to end (slow group): `examples/finetune.py` with no arguments fine-tunes the real SmolLM2 model to
the held-out accuracy targets and writes every file it promises, whose merged models hold the adapted model; and the
`--model tiny` demo runs."""
import json, pathlib, subprocess, sys
import numpy as np, pytest
from tinygrad import Tensor, dtypes
import tinylora as tl
from tinylora import load_pretrained, load_tokenizer
from tinylora.formats.gguf import read_gguf

pytestmark = pytest.mark.slow
EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "finetune.py"
sys.path.insert(0, str(EXAMPLE.parent))
import finetune  # noqa: E402

def run_example(*args: str) -> str:
  proc = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout

def test_main_job_on_smollm2(tmp_path):
  stdout = run_example("--out", str(tmp_path))
  m = json.loads((tmp_path / "metrics.json").read_text())
  assert m["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and m["steps"] == 12 and m["train_tokens_per_s"] > 0
  assert m["heldout_accuracy_after"] >= 0.6 and m["heldout_accuracy_after"] >= m["heldout_accuracy_before"] + 0.4
  assert m["val_loss_after"] < m["val_loss_before"] and m["seconds"] > 0
  assert "llama-cli -m" in stdout and "--lora" in stdout
  for f in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter.gguf", "merged-hf/config.json",
            "merged-hf/tokenizer.json", "merged-f16.gguf"):
    assert (tmp_path / f).is_file(), f
  # base + the saved PEFT adapter, the merged HF model and the merged f16 GGUF give the same next tokens
  heldout = finetune.island_dataset()[1][0]
  tokenizer = load_tokenizer(tmp_path / "merged-hf")
  prompt = Tensor([tokenizer.encode(finetune.prompt_of(heldout, tokenizer))])
  adapted = tl.load_adapter(load_pretrained(finetune.smollm2_gguf(), dtype=dtypes.float32, dequantize=True), tmp_path / "adapter")
  want = adapted(prompt).numpy()
  merged = load_pretrained(tmp_path / "merged-hf")(prompt).numpy()
  np.testing.assert_allclose(merged, want, atol=1e-3, rtol=0)  # float32 merge: reassociated sums only
  f16 = load_pretrained(tmp_path / "merged-f16.gguf", dtype=dtypes.float32)(prompt).numpy()
  assert np.abs(f16 - want).max() < 0.25 and (f16.argmax(-1) == want.argmax(-1)).mean() > 0.9  # float16 weights
  _, tensors = read_gguf(tmp_path / "adapter.gguf")
  assert len(tensors) == 2 * 7 * 16  # lora_a and lora_b of seven projections in the last 16 layers

def test_tiny_demo_runs(tmp_path):
  run_example("--model", "tiny", "--iters", "4", "--out", str(tmp_path))
  m = json.loads((tmp_path / "metrics.json").read_text())
  assert m["model"] == "tiny" and m["steps"] == 4 and (tmp_path / "merged-hf" / "config.json").is_file()
