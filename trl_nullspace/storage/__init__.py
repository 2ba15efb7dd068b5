"""What is written to disk and must be trusted when read back: the subspace cache (`cache`), the
fingerprints that tie it to a model and data (`fingerprint`), and checkpoint weights transformers
would not restore (`checkpoint_weights`)."""
