"""Tokenizers with one interface: a dependency-free byte tokenizer, and Hugging Face tokenizers (a `tokenizers.Tokenizer`
with its tokenizer_config.json), with chat templates rendered with jinja2. Reading and writing their files is
tinylora.formats' (load_tokenizer; formats/hf.py, formats/gguf.py)."""
from __future__ import annotations
import datetime, json, re
from typing import Any, Mapping, Protocol
from tinylora.errors import LoraError
from tinylora.tree import FrozenMapping

class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int | None
  eos_id: int | None
  pad_id: int | None
  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...
  def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...
  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str: ...

def tokenizers_package():
  """The optional `tokenizers` package (HF tokenizer.json files, and the tokenizers built from GGUF metadata)."""
  try: import tokenizers
  except ImportError as e: raise ImportError("load_tokenizer needs the 'tokenizers' package: pip install tinylora[tokenizers]") from e
  return tokenizers

def _check_messages(messages: list[dict]) -> None:
  """Each message has a string role and string content (an assistant message that calls tools may have none)."""
  for i, m in enumerate(messages):
    calls_tools = isinstance(m, dict) and bool(m.get("tool_calls")) and m.get("content") is None
    if not (isinstance(m, dict) and isinstance(m.get("role"), str) and (isinstance(m.get("content"), str) or calls_tools)):
      raise LoraError(f"message {i} must be a dict with string 'role' and 'content', found {m!r}")

class ByteTokenizer:
  """UTF-8 bytes are ids 0-255; then <|pad|> 256, <|bos|> 257, <|eos|> 258. `encode` turns those three strings into
  their ids wherever they appear in the text.

  Chat template: "<|bos|>" then, per message, "<|{role}|>\\n{content}<|eos|>\\n"; with add_generation_prompt it ends
  with "<|assistant|>\\n". Role markers are plain bytes; <|eos|> ends each turn, so generation stops on it."""
  SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")
  pad_id, bos_id, eos_id = 256, 257, 258
  vocab_size = 259
  _split = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Ids of `text`; with add_special_tokens a bos id is prepended."""
    ids = [self.bos_id] if add_special_tokens else []
    for part in self._split.split(text):
      ids.extend([256 + self.SPECIALS.index(part)] if part in self.SPECIALS else part.encode())
    return ids

  def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids`; invalid UTF-8 (e.g. a sequence cut mid-character) becomes U+FFFD."""
    out, run = [], bytearray()
    for i in ids:
      if not 0 <= i < self.vocab_size: raise LoraError(f"token id {i} is outside the byte vocabulary of {self.vocab_size}")
      if i < 256: run.append(i)
      else:
        out.append(run.decode(errors="replace"))
        run = bytearray()
        if not skip_special_tokens: out.append(self.SPECIALS[i - 256])
    return "".join(out) + run.decode(errors="replace")

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
    _check_messages(messages)
    if tools: raise LoraError("the byte tokenizer's chat template has no place for tools; use the model's own tokenizer")
    text = "<|bos|>" + "".join(f"<|{m['role']}|>\n{m['content']}<|eos|>\n" for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text

def token_text(token) -> str | None:
  """tokenizer_config.json writes special tokens as a string or as an AddedToken dict with 'content'."""
  return token.get("content") if isinstance(token, dict) else token

class HFTokenizer:
  """A Hugging Face `tokenizer.json` (via the `tokenizers` package) with its `tokenizer_config.json`, if any.
  bos/eos/pad ids come from that config's bos_token/eos_token/pad_token (None when absent; pad falls back to eos).
  `file_metadata`: the `tokenizer.*` metadata of the GGUF it was built from (empty otherwise), read-only, written as it
  is into GGUF files saved with this tokenizer."""
  def __init__(self, tokenizer, config: dict, file_metadata: Mapping[str, Any] | None = None):
    self.tokenizer, self.config = tokenizer, config
    self.file_metadata: Mapping[str, Any] = FrozenMapping(file_metadata)
    self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
    self.bos_token, self.eos_token = token_text(config.get("bos_token")), token_text(config.get("eos_token"))
    self.bos_id = tokenizer.token_to_id(self.bos_token) if self.bos_token else None
    self.eos_id = tokenizer.token_to_id(self.eos_token) if self.eos_token else None
    pad_token = token_text(config.get("pad_token"))
    # many HF tokenizers define no pad token; eos is the usual stand-in (padding is masked out of the loss anyway)
    self.pad_id = tokenizer.token_to_id(pad_token) if pad_token else self.eos_id
    self.chat_template = config.get("chat_template")
    if isinstance(self.chat_template, list):  # named templates: [{"name": "default", "template": ...}, ...]
      self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Ids of `text`; add_special_tokens applies the tokenizer's post-processor (e.g. prepends bos for Llama)."""
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
    """Renders the Jinja chat template as transformers does (sandboxed, trim_blocks, lstrip_blocks), with `tools` (a
    list of JSON-schema tool objects) where the template takes them."""
    _check_messages(messages)
    if not self.chat_template: raise LoraError("tokenizer_config.json has no chat_template")
    try: from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e: raise ImportError("chat templates need the 'jinja2' package: pip install tinylora[tokenizers]") from e
    def raise_exception(message: str): raise LoraError(f"chat template: {message}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                       tools=tools, bos_token=self.bos_token or "", eos_token=self.eos_token or "")
