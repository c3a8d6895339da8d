"""Tokenizers with one interface: a dependency-free byte tokenizer, and HF `tokenizer.json` files through the optional
`tokenizers` package (chat templates from `tokenizer_config.json` rendered with jinja2)."""
from __future__ import annotations
import datetime, json, os, pathlib, re
from typing import Protocol
from tinylora.errors import LoraError
from tinylora.io import atomic_path, read_json, write_json

class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int | None
  eos_id: int | None
  pad_id: int | None
  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...
  def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...
  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str: ...

def _check_messages(messages: list[dict]) -> None:
  for i, m in enumerate(messages):
    if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
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

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    _check_messages(messages)
    text = "<|bos|>" + "".join(f"<|{m['role']}|>\n{m['content']}<|eos|>\n" for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text

def _token_text(token) -> str | None:
  """tokenizer_config.json writes special tokens as a string or as an AddedToken dict with 'content'."""
  return token.get("content") if isinstance(token, dict) else token

class HFTokenizer:
  """A Hugging Face `tokenizer.json` (via the `tokenizers` package) with its `tokenizer_config.json`, if any.
  bos/eos/pad ids come from that config's bos_token/eos_token/pad_token (None when absent; pad falls back to eos)."""
  def __init__(self, tokenizer, config: dict):
    self.tokenizer, self.config = tokenizer, config
    self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
    self.bos_token, self.eos_token = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    self.bos_id = tokenizer.token_to_id(self.bos_token) if self.bos_token else None
    self.eos_id = tokenizer.token_to_id(self.eos_token) if self.eos_token else None
    pad_token = _token_text(config.get("pad_token"))
    # many HF tokenizers define no pad token; eos is the usual stand-in (padding is masked out of the loss anyway)
    self.pad_id = tokenizer.token_to_id(pad_token) if pad_token else self.eos_id
    self.chat_template = config.get("chat_template")
    if isinstance(self.chat_template, list):  # named templates: [{"name": "default", "template": ...}, ...]
      self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)

  def save(self, directory: str | os.PathLike) -> None:
    """Writes tokenizer.json and tokenizer_config.json (special tokens, chat template) for transformers and tinylora."""
    directory = pathlib.Path(directory)
    with atomic_path(directory / "tokenizer.json") as tmp: self.tokenizer.save(str(tmp))
    config = {k: v for k, v in self.config.items() if k not in ("bos_token", "eos_token", "pad_token", "chat_template")}
    config |= {"tokenizer_class": config.get("tokenizer_class", "PreTrainedTokenizerFast"), "bos_token": self.bos_token,
               "eos_token": self.eos_token, "pad_token": _token_text(self.config.get("pad_token")),
               "chat_template": self.chat_template}
    write_json(directory / "tokenizer_config.json", {k: v for k, v in config.items() if v is not None})

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Ids of `text`; add_special_tokens applies the tokenizer's post-processor (e.g. prepends bos for Llama)."""
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Renders the Jinja chat template as transformers does (sandboxed, trim_blocks, lstrip_blocks)."""
    _check_messages(messages)
    if not self.chat_template: raise LoraError("tokenizer_config.json has no chat_template")
    try: from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e: raise ImportError("chat templates need the 'jinja2' package: pip install tinylora[tokenizers]") from e
    def raise_exception(message: str): raise LoraError(f"chat template: {message}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                       bos_token=self.bos_token or "", eos_token=self.eos_token or "")

def _tokenizers():
  try: import tokenizers
  except ImportError as e: raise ImportError("load_tokenizer needs the 'tokenizers' package: pip install tinylora[tokenizers]") from e
  return tokenizers

def load_tokenizer(path: str | os.PathLike) -> HFTokenizer:
  """Loads `tokenizer.json` (and `tokenizer_config.json` when present) from a model directory or the file itself, or
  the tokenizer and chat template in a `.gguf` file's metadata. Needs the optional packages: pip install
  tinylora[tokenizers]."""
  path = pathlib.Path(path)
  file = path / "tokenizer.json" if path.is_dir() else path
  if not file.exists(): raise FileNotFoundError(f"tokenizer file not found: {file}")
  if file.suffix == ".gguf":
    from tinylora.models.gguf import read_gguf
    return gguf_tokenizer(read_gguf(file)[0], str(file))
  config_file = file.parent / "tokenizer_config.json"
  config = read_json(config_file) if config_file.exists() else {}
  tokenizers = _tokenizers()
  try: tokenizer = tokenizers.Tokenizer.from_file(str(file))
  except Exception as e: raise LoraError(f"{file}: not a valid tokenizer.json ({e})") from e
  return HFTokenizer(tokenizer, config)

# pre-tokenizer splits of byte-level GGUF vocabularies by `tokenizer.ggml.pre`, as transformers' GGUF loader applies them
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
GGUF_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
               "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}

def _byte_alphabet() -> set[str]:
  """The 256 characters byte-level BPE spells bytes with (GPT-2's bytes_to_unicode)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  return {chr(b) for b in printable} | {chr(256 + i) for i in range(256 - len(printable))}

def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
  """BPE merges of a SentencePiece vocabulary that has scores but no merges (transformers' generate_merges)."""
  merges = []
  for piece, score in scores.items():
    local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
    merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
  return [(l, r) for l, r, _ in sorted(merges, key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)]

def gguf_tokenizer(kv: dict, where: str = "GGUF") -> HFTokenizer:
  """The tokenizer in GGUF metadata, built as transformers' GGUF loader builds it: byte-level BPE ("gpt2": Llama 3,
  Qwen2, SmolLM, ...) or SentencePiece BPE ("llama": Llama 2, Mistral), with control tokens special, user-defined
  tokens added, bos/eos added as `add_bos_token` / `add_eos_token` say, and the chat template."""
  from tinylora.models.gguf import CONTROL, USER_DEFINED
  tk = _tokenizers()
  kind, tokens = kv.get("tokenizer.ggml.model"), kv.get("tokenizer.ggml.tokens")
  if kind not in ("gpt2", "llama") or not tokens:
    raise LoraError(f"{where}: GGUF tokenizer model {kind!r} is not supported (byte-level 'gpt2' or SentencePiece 'llama')")
  vocab, types = {t: i for i, t in enumerate(tokens)}, kv.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  merges = [tuple(m.split(" ", 1)) for m in kv["tokenizer.ggml.merges"]] if "tokenizer.ggml.merges" in kv else None
  if kind == "gpt2":
    tokenizer = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges or [], dropout=None, continuing_subword_prefix="",
                                           end_of_word_suffix="", fuse_unk=False))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split := GGUF_SPLITS.get(kv.get("tokenizer.ggml.pre")):
      tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence([tk.pre_tokenizers.Split(tk.Regex(split), behavior="isolated"),
                                                            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = tk.decoders.ByteLevel()
    alphabet = _byte_alphabet()
    control = [t for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= alphabet]
  else:
    if merges is None: merges = _merges_from_scores(vocab, dict(zip(tokens, kv.get("tokenizer.ggml.scores", [0.0] * len(tokens)))))
    tokenizer = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = tk.decoders.Sequence([tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(), tk.decoders.Fuse(),
                                              tk.decoders.Strip(" ", 1, 0)])
    control = [t for t, ty in zip(tokens, types) if ty == CONTROL]
  special = {name: tokens[i] for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                                               ("pad_token", "padding"))
             if isinstance(i := kv.get(f"tokenizer.ggml.{key}_token_id"), int) and 0 <= i < len(tokens)}
  tokenizer.add_special_tokens([tk.AddedToken(t, normalized=False, special=True) for t in control + list(special.values())])
  tokenizer.add_tokens([tk.AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])
  add_bos = kv.get("tokenizer.ggml.add_bos_token", kind == "llama") and "bos_token" in special
  add_eos = kv.get("tokenizer.ggml.add_eos_token", False) and "eos_token" in special
  bos, eos = special.get("bos_token"), special.get("eos_token")
  single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
  pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
  tokenizer.post_processor = tk.processors.TemplateProcessing(
    single=single, pair=pair, special_tokens=[(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on])
  out = HFTokenizer(tokenizer, {**special, "chat_template": kv.get("tokenizer.chat_template")})
  out.gguf_metadata = {k: v for k, v in kv.items() if k.startswith("tokenizer.")}
  return out
