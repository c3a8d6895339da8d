class LoraError(ValueError):
  """Bad configuration, adapter file or model input for tinylora. The message names what was expected and what was found."""
