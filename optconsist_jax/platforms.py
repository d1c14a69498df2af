"""Which JAX backends a command initializes.

With libtpu installed (the planner needs it) JAX also tries the TPU backend
on a machine without TPU chips, and libtpu prints `Failed to find host
bounds` and `unexpected worker hostname` errors on every CPU/GPU command.
`select_default()`, called first thing by each command's main, leaves an
explicit choice (`JAX_PLATFORMS`, `--jax_platforms`) alone and otherwise
names only the platforms this machine has: TPU when TPU chips are attached
(found the way JAX's Cloud TPU setup finds them, on the PCI bus), else CUDA
when an NVIDIA GPU and JAX's CUDA plugin are present, else CPU. Only the
planner (tools/planner.py) loads libtpu on a CPU machine, on purpose.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import jax

_GOOGLE_PCI_VENDOR = "0x1ae0"


def _tpu_chips() -> int:
  """Google accelerators on the PCI bus (what JAX's cloud_tpu_init checks)."""
  n = 0
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor, encoding="ascii") as f:
        n += f.read().strip() == _GOOGLE_PCI_VENDOR
    except OSError:
      continue
  return n


def _cuda_usable() -> bool:
  has_gpu = any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl"))
  has_plugin = any(importlib.util.find_spec(m) is not None for m in (
      "jax_cuda13_plugin", "jax_cuda12_plugin"))
  return has_gpu and has_plugin


def default_platforms() -> str | None:
  """The platforms to initialize here; None = leave it to JAX (TPU VMs)."""
  if _tpu_chips():
    return None
  return "cuda,cpu" if _cuda_usable() else "cpu"


def select_default() -> str | None:
  """Sets jax_platforms (and JAX_PLATFORMS for subprocesses) unless given.

  Call before anything touches a device. Returns what was chosen (None: the
  user's choice or JAX's own).
  """
  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
    return None
  platforms = default_platforms()
  if platforms is not None:
    os.environ["JAX_PLATFORMS"] = platforms
    jax.config.update("jax_platforms", platforms)
  return platforms
