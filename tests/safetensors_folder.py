"""Reads a Hugging Face folder's safetensors with numpy (test helper)."""

import os

import safetensors


def read_all(folder) -> dict:
  """HF tensor name -> numpy array, over single-file or sharded folders."""
  out = {}
  for f in sorted(os.listdir(folder)):
    if f.endswith(".safetensors"):
      with safetensors.safe_open(os.path.join(folder, f), "numpy") as h:
        for k in h.keys():
          out[k] = h.get_tensor(k)
  return out
