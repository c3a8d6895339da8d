"""Crash-safe file writes and checked safetensors reads shared by adapters, checkpoints and merged models."""
from __future__ import annotations
import contextlib, hashlib, json, math, os, pathlib, struct, tempfile
from typing import Callable, Iterable, Iterator
import numpy as np
from tinylora.errors import LoraError

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary path in the same directory; on success it is flushed and renamed over `path`, so a crash at any
  moment leaves either the old file or the new one, never a partial file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  try:
    yield pathlib.Path(tmp)
    with open(tmp, "rb+") as f: os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable
      dfd = os.open(path.parent, os.O_RDONLY)
      try: os.fsync(dfd)
      finally: os.close(dfd)
  finally:
    with contextlib.suppress(FileNotFoundError): os.unlink(tmp)

def write_json(path: str | os.PathLike, obj) -> None:
  with atomic_path(path) as tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

def read_json(path: str | os.PathLike) -> dict:
  path = pathlib.Path(path)
  try: obj = json.loads(path.read_text())
  except FileNotFoundError: raise
  # ValueError: JSONDecodeError, UnicodeDecodeError, an integer over the digit limit; RecursionError: deep nesting
  except (ValueError, RecursionError) as e: raise LoraError(f"{path}: invalid JSON ({e})") from e
  if not isinstance(obj, dict): raise LoraError(f"{path}: expected a JSON object, found {type(obj).__name__}")
  return obj

_NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _NP_DTYPES.items()}
# Files tinylora writes carry a SHA-256 of their tensor entries and bytes in the metadata, checked on read: safetensors'
# structure checks cannot see a flipped bit inside a tensor. Files from other tools have none and are read as they are.
DIGEST = "tinylora.sha256"

def _tinylora_key(key: str) -> bool:
  """Whether a metadata key is one of tinylora's ("tinylora." keys), allowing for up to 3 damaged characters: a file
  whose digest key was hit must not read as another tool's file, whose tensors go unchecked."""
  return len(key) >= len("tinylora.") and sum(a != b for a, b in zip(key, "tinylora.")) <= 3

def _digest(entries: dict, chunks: Iterable) -> str:
  """SHA-256 of the tensor entries of a header (names, dtypes, shapes, offsets) and then of the tensor bytes."""
  h = hashlib.sha256(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode())
  for chunk in chunks: h.update(chunk)
  return h.hexdigest()

def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads a whole .safetensors file into numpy arrays (BF16 is widened to float32), checking the header and every
  offset, so a truncated or corrupt file raises LoraError naming the file instead of failing deep inside, and the
  SHA-256 of a file tinylora wrote (see DIGEST; it is not among the metadata returned)."""
  path = pathlib.Path(path)
  data = path.read_bytes()
  def bad(why: str) -> LoraError: return LoraError(f"{path}: not a valid safetensors file ({why})")
  if len(data) < 8: raise bad(f"{len(data)} bytes, shorter than the 8-byte header length")
  (n,) = struct.unpack("<Q", data[:8])
  if n > len(data) - 8: raise bad(f"header says {n} bytes but only {len(data) - 8} follow")
  try: header = json.loads(data[8:8 + n])
  except (ValueError, RecursionError) as e: raise bad(f"header is not JSON: {e}") from e
  if not isinstance(header, dict): raise bad("header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict): raise bad("__metadata__ is not an object")
  body, out = memoryview(data)[8 + n:], {}
  for key, info in header.items():
    try:
      dtype, shape, (start, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
      if any(s < 0 for s in shape): raise ValueError("negative dimension")
    except (TypeError, KeyError, ValueError) as e: raise bad(f"entry {key!r} is malformed: {e}") from e
    if dtype != "BF16" and (not isinstance(dtype, str) or dtype not in _NP_DTYPES):
      raise bad(f"tensor {key!r} has unsupported dtype {dtype}")
    itemsize = 2 if dtype == "BF16" else np.dtype(_NP_DTYPES[dtype]).itemsize
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= len(body)) or \
       end - start != itemsize * math.prod(shape):  # np.prod would wrap around
      raise bad(f"tensor {key!r} of dtype {dtype} and shape {shape} does not fit offsets [{start}, {end}) "
                f"in a {len(body)}-byte body")
    raw = body[start:end]
    if dtype == "BF16": arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
    else: arr = np.frombuffer(raw, _NP_DTYPES[dtype]).copy()
    out[key] = arr.reshape(shape)
  if (digest := metadata.pop(DIGEST, None)) is not None and digest != _digest(header, [body]):
    raise LoraError(f"{path}: its tensors do not match the SHA-256 tinylora saved with them (changed or damaged since)")
  if digest is None and any(map(_tinylora_key, metadata)):
    raise LoraError(f"{path}: written by tinylora (metadata keys {sorted(metadata)}) but its SHA-256 {DIGEST!r} is "
                    f"missing (damaged or edited since)")
  return out, {str(k): str(v) for k, v in metadata.items()}

def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """Writes numpy arrays as .safetensors atomically (keys sorted, as the safetensors library does), with their SHA-256
  in the metadata."""
  entries, offset, arrays = {}, 0, []
  for key in sorted(tensors):
    arr = np.ascontiguousarray(tensors[key])
    if arr.dtype not in _ST_NAMES: raise LoraError(f"tensor {key!r}: dtype {arr.dtype} cannot be written to safetensors")
    entries[key] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays.append(arr)
  digest = _digest(entries, (arr.reshape(-1).view(np.uint8) for arr in arrays))
  header = {"__metadata__": {**(metadata or {}), DIGEST: digest}, **entries}
  hb = json.dumps(header, separators=(",", ":")).encode()
  hb += b" " * (-len(hb) % 8)
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(hb)) + hb)
    for arr in arrays: f.write(arr.tobytes())

def check_arrays(where: str, arrays: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], ignored: Iterable[str] = (),
                 floats: bool = False, note: Callable[[str, tuple[int, ...]], str] | None = None) -> None:
  """The one check before a load assigns anything: raises LoraError naming `where` and the first key that `arrays` lacks,
  has beyond `expected` (and `ignored`), or holds in another shape; with `floats`, also a non-float or non-finite array.
  `note(key, found_shape)` may add a hint to a shape error."""
  if missing := sorted(set(expected) - set(arrays)):
    raise LoraError(f"{where}: tensor {missing[0]!r} of shape {tuple(expected[missing[0]])} is missing "
                    f"({len(missing)} missing in all)")
  if extra := sorted(set(arrays) - set(expected) - set(ignored)):
    raise LoraError(f"{where}: unexpected tensor {extra[0]!r} of shape {tuple(arrays[extra[0]].shape)} "
                    f"({len(extra)} unexpected in all)")
  for key, shape in expected.items():
    found = tuple(arrays[key].shape)
    if found != tuple(shape):
      raise LoraError(f"{where}: tensor {key!r} has shape {found}, expected {tuple(shape)}{note(key, found) if note else ''}")
    if floats and not np.issubdtype(arrays[key].dtype, np.floating):
      raise LoraError(f"{where}: tensor {key!r} has dtype {arrays[key].dtype}, expected a float type")
    if floats and not np.isfinite(arrays[key]).all(): raise LoraError(f"{where}: tensor {key!r} holds non-finite values (nan or inf)")
