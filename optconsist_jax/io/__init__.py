"""Weights in and out: Hugging Face folders and Hub ids, nanoGPT checkpoints, Orbax runs."""
