"""Training data layer: one label vocabulary, real adapters, synthetic scenes, degradations, splits."""
