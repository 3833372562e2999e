"""Training side: vocabulary, synthetic data engine, model, training and evaluation."""
