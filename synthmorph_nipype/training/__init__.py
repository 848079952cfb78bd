"""Losses and training loops for SynthMorph-style models."""
