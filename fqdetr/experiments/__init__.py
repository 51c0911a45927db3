"""Experiment drivers built on the engine's loops: the demo (docs/METHOD.md sections 1-4) and the
reproduction of the findings over seeds (section 6). The loops themselves (train, QAT,
evaluation) live in fqdetr.engine."""
