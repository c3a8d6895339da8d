"""The main job's files in the tools whose commands it prints: after `examples/finetune.py` (the default run on
SmolLM2), transformers on `merged-hf` and transformers + PEFT on the base and `adapter/` give tinylora's greedy
held-out answers word for word; llama.cpp on `merged-f16.gguf` (float16 weights) and on the Q4_1 base with
`--lora adapter.gguf` (its quantized matmuls) answer every held-out question right."""
import json, pathlib, subprocess, sys
import pytest
from tinylora import load_tokenizer

pytestmark = pytest.mark.interop
EXAMPLE = pathlib.Path(__file__).parents[2] / "examples" / "finetune.py"
sys.path.insert(0, str(EXAMPLE.parent))
import finetune  # noqa: E402

@pytest.fixture(scope="module")
def job(tmp_path_factory):
  """The default run's output directory, SmolLM2's tokenizer, the held-out prompts' token ids and the answers tinylora
  gave after training."""
  out = tmp_path_factory.mktemp("finetune")
  proc = subprocess.run([sys.executable, str(EXAMPLE), "--out", str(out)], capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  tokenizer = load_tokenizer(finetune.smollm2_gguf())
  prompts = [tokenizer.encode(finetune.prompt_of(row, tokenizer)) for row in finetune.island_dataset()[1]]
  return out, tokenizer, prompts, json.loads((out / "metrics.json").read_text())["heldout_answers_after"]

def test_merged_hf_and_peft_adapter_in_transformers(needs_peft, job):
  import torch
  from transformers import AutoModelForCausalLM
  from peft import PeftModel
  out, tokenizer, prompts, answers = job
  merged = AutoModelForCausalLM.from_pretrained(out / "merged-hf").eval()
  base = AutoModelForCausalLM.from_pretrained(finetune.smollm2_gguf().parent, gguf_file=finetune.smollm2_gguf().name)
  adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
  eos = merged.config.eos_token_id
  for model in (merged, adapted):
    got = []
    for prompt in prompts:
      with torch.no_grad():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=eos)
      got.append(tokenizer.decode([t for t in ids[0, len(prompt):].tolist() if t != eos], skip_special_tokens=True).strip())
    assert got == answers

def test_merged_gguf_and_gguf_adapter_in_llama_cpp(job):
  llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[interop]'")
  out, tokenizer, prompts, _ = job
  keys = [finetune.answer_key(row) for row in finetune.island_dataset()[1]]
  for model, lora in ((out / "merged-f16.gguf", None), (finetune.smollm2_gguf(), out / "adapter.gguf")):
    llm = llama_cpp.Llama(str(model), n_ctx=128, verbose=False, lora_path=str(lora) if lora else None)
    got = []
    for prompt in prompts:
      ids = []
      for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if t == tokenizer.eos_id or len(ids) == 16: break
        ids.append(t)
      got.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    assert all(key.lower() in a.lower() for key, a in zip(keys, got)), f"{model.name} + {lora}: {got}"
