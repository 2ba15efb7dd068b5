"""The real-model benchmarks' evaluation: prompt sources and splits, generation, refusal judges, the
training data builder and the `evaluate` command's report."""
