"""Evaluation as the paper measures it: Dreambench DINO / CLIP-I / CLIP-T (`python -m lambda_eclipse.evaluate`)."""
