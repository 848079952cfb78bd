"""Inference: conform images to network space, run the models, return world transforms."""
