"""The paper's experiments: the small reproduction, memorization, activation fingerprints."""
