"""Text to tokens: corpora, samples, offline assets, calibration passes and their statistics."""
