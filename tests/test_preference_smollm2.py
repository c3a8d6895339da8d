"""DPO on the real SmolLM2-135M-Instruct (slow group): a small preference task (the chosen reply opens with "Sure! ",
the rejected one does not) whose held-out pairs' log-probability margin, chosen over rejected, goes up."""
import pathlib, sys
import pytest
from tinygrad import dtypes
import tinylora as tl
from tinylora import load_pretrained, load_tokenizer
from tinylora.preference import LOSSES, encode_pair, pair_batch_at, pair_eval_batches
from tinylora.train import Trainer, TrainConfig, fit

pytestmark = pytest.mark.slow
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
import finetune  # noqa: E402  (smollm2_gguf: the model the set-up installs)

QA = [("What color is the sky?", "It is blue."), ("How many legs does a cat have?", "A cat has four legs."),
      ("What is the capital of France?", "Paris."), ("What do bees make?", "Bees make honey."),
      ("What is 2 plus 2?", "It is 4."), ("Which animal barks?", "A dog barks."),
      ("What falls from clouds?", "Rain falls from clouds."), ("What do we breathe?", "We breathe air."),
      ("Where do fish live?", "Fish live in water."), ("What is ice made of?", "Ice is frozen water."),
      ("What color is grass?", "Grass is green."), ("What shines at night?", "The moon shines at night.")]

def pair(question: str, answer: str) -> dict:
  return {"prompt": [{"role": "user", "content": question}], "chosen": [{"role": "assistant", "content": "Sure! " + answer}],
          "rejected": [{"role": "assistant", "content": answer}]}

def test_dpo_raises_the_held_out_margin_on_smollm2():
  path = finetune.smollm2_gguf()
  model, tokenizer = load_pretrained(path, dtype=dtypes.float32, dequantize=True), load_tokenizer(path)
  n = model.config.num_hidden_layers
  tl.inject(model, tl.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", layers_to_transform=list(range(n - 8, n))))
  model.layers_as_functions = True
  pairs = [encode_pair(pair(q, a), tokenizer) for q, a in QA]
  train, held_out = pairs[:8], pairs[8:]
  trainer = Trainer(model, TrainConfig(lr=5e-4, iters=10, warmup=0), loss_fn=LOSSES["dpo"](beta=0.1))
  eval_batches = pair_eval_batches(held_out, 4, 48, tokenizer.pad_id or 0)
  trainer.evaluate(eval_batches)
  before = trainer.eval_metrics
  fit(trainer, train, None, 4, 48, pad_id=tokenizer.pad_id or 0, draw=pair_batch_at, draw_eval=pair_eval_batches, progress=False)
  trainer.evaluate(eval_batches)
  after = trainer.eval_metrics
  margin = lambda m: m["logps/chosen"] - m["logps/rejected"]
  print(f"held-out log-probability margin {margin(before):.2f} -> {margin(after):.2f} nats, reward margin "
        f"{before['rewards/margins']:.3f} -> {after['rewards/margins']:.3f}, accuracy {after['rewards/accuracies']:.2f}")
  assert before["rewards/margins"] == pytest.approx(0, abs=1e-4)  # B = 0: the policy is the reference
  assert margin(after) > margin(before) + 1.0 and after["rewards/margins"] > 0.1 and after["rewards/accuracies"] == 1.0
