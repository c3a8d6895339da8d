"""DPO and ORPO on one batch of pairs, one model and one PEFT adapter: tinylora's loss and LoRA gradients against TRL's
(ORPO: ORPOTrainer's own concatenated_forward, get_batch_logps and odds_ratio_loss; DPO: DPOTrainer's sigmoid loss on
sequence log-probabilities summed over the completion mask, the reference being the PEFT model with its adapter
disabled, as DPOTrainer computes it for a PEFT model without ref_model). Both sides get the same token ids and masks."""
from types import SimpleNamespace
import numpy as np, pytest
from tinygrad import Tensor
import tinylora as tl
from tinylora import load_pretrained
from tinylora.preference import dpo_loss, make_pair_batch, orpo_loss
from .common import assert_close, peft_model

pytestmark = pytest.mark.interop
BETA, SEQ = 0.1, 8

@pytest.fixture(scope="module")
def needs_trl(needs_peft):
  pytest.importorskip("trl", reason="trl is not installed; pip install -e '.[interop]'")

def pairs(seed=0, n=3):
  rng, out = np.random.default_rng(seed), []
  for _ in range(n):
    prompt = rng.integers(0, 64, 3).tolist()
    out.append(tuple((prompt + r, [0] * 3 + [1] * len(r)) for r in (rng.integers(0, 64, rng.integers(2, 5)).tolist() for _ in "cr")))
  return out

def hf_batch(ps):
  """TRL ORPO's tokenized batch: chosen_/rejected_ input_ids, attention_mask and labels (-100 on prompt and padding)."""
  import torch
  batch = {}
  for side, k in (("chosen", 0), ("rejected", 1)):
    rows = [p[k] for p in ps]
    ids = [seq + [0] * (SEQ - len(seq)) for seq, _ in rows]
    batch[f"{side}_input_ids"] = torch.tensor(ids)
    batch[f"{side}_attention_mask"] = torch.tensor([[1] * len(seq) + [0] * (SEQ - len(seq)) for seq, _ in rows])
    batch[f"{side}_labels"] = torch.tensor([[t if w else -100 for t, w in zip(seq, ws)] + [-100] * (SEQ - len(seq)) for seq, ws in rows])
  return batch

def peft_grads(pm) -> dict[str, np.ndarray]:
  return {n.removeprefix("base_model.model.").replace(".default", ""): p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}

def tl_grads(model, loss) -> tuple[float, dict[str, np.ndarray]]:
  layers = tl.lora_layers(model)
  params = [getattr(l, f"lora_{n}") for l in layers.values() for n in "AB"]
  grads = loss.gradient(*params)
  Tensor.realize(loss, *grads)
  names = [f"{path}.lora_{n}.weight" for path in layers for n in "AB"]
  return loss.item(), {k: g.numpy() for k, g in zip(names, grads)}

def compare(name, tl_loss, tl_g, torch_loss, torch_g):
  assert_close(f"preference: {name} loss (tinylora vs TRL)", np.array(tl_loss), np.array(torch_loss), atol=1e-5)
  assert sorted(tl_g) == sorted(torch_g)
  scale = max(np.abs(g).max() for g in torch_g.values())
  assert_close(f"preference: {name} LoRA gradients, relative to the largest (tinylora vs TRL)",
               np.concatenate([tl_g[k].ravel() for k in sorted(tl_g)]) / scale,
               np.concatenate([torch_g[k].ravel() for k in sorted(tl_g)]) / scale, atol=1e-5)

def test_orpo_matches_trl(needs_trl, peft_adapters):
  import torch
  from trl.experimental.orpo.orpo_trainer import ORPOTrainer
  ref, ps = peft_adapters["llama_std"], pairs(0)
  pm = peft_model(ref.base, ref.path, is_trainable=True)
  acc = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
  trl = SimpleNamespace(beta=BETA, accelerator=acc, is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False,
                        concatenated_inputs=ORPOTrainer.concatenated_inputs, get_batch_logps=ORPOTrainer.get_batch_logps)
  trl.concatenated_forward = lambda model, batch: ORPOTrainer.concatenated_forward(trl, model, batch)
  trl.odds_ratio_loss = lambda c, r: ORPOTrainer.odds_ratio_loss(trl, c, r)
  loss, metrics = ORPOTrainer.get_batch_loss_metrics(trl, pm, hf_batch(ps))
  loss.backward()
  model = tl.load_adapter(load_pretrained(ref.base), ref.path)
  tokens, targets, mask = (Tensor(x) for x in make_pair_batch(ps, SEQ))
  tl_loss, tl_metrics = orpo_loss(BETA)(model, tokens, targets, mask)
  compare("ORPO", *tl_grads(model, tl_loss), loss.item(), peft_grads(pm))
  for k in ("rewards/margins", "nll_loss", "log_odds_chosen"):
    assert_close(f"preference: ORPO {k} (tinylora vs TRL)", np.array(tl_metrics[k].item()), np.array(metrics[k]), atol=1e-5)

def test_dpo_matches_trl(needs_trl, peft_adapters):
  import torch, torch.nn.functional as F
  ref, ps = peft_adapters["llama_std"], pairs(1)
  pm = peft_model(ref.base, ref.path, is_trainable=True)
  b = hf_batch(ps)
  ids = torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]])  # DPOTrainer's layout: chosen rows, then rejected
  attn, labels = torch.cat([b["chosen_attention_mask"], b["rejected_attention_mask"]]), torch.cat([b["chosen_labels"], b["rejected_labels"]])
  def logps(model):
    out = model(input_ids=ids, attention_mask=attn).logits[:, :-1].log_softmax(-1)
    lab = labels[:, 1:]
    return (out.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (lab != -100)).sum(1).chunk(2)
  with torch.no_grad(), pm.disable_adapter(): ref_c, ref_r = logps(pm)
  pol_c, pol_r = logps(pm)
  loss = -F.logsigmoid(BETA * ((pol_c - ref_c) - (pol_r - ref_r))).mean()  # DPOTrainer._compute_loss, loss_type "sigmoid"
  loss.backward()
  model = tl.load_adapter(load_pretrained(ref.base), ref.path)
  tokens, targets, mask = (Tensor(x) for x in make_pair_batch(ps, SEQ))
  tl_loss, metrics = dpo_loss(BETA)(model, tokens, targets, mask)
  compare("DPO", *tl_grads(model, tl_loss), loss.item(), peft_grads(pm))
  margin = (BETA * ((pol_c - ref_c) - (pol_r - ref_r))).mean().item()
  assert_close("preference: DPO rewards/margins (tinylora vs TRL)", np.array(metrics["rewards/margins"].item()), np.array(margin), atol=1e-5)
  assert abs(margin) > 1e-3  # the adapter moves the policy away from the reference
