"""Evaluation as the paper measures it: DINO / CLIP-I / CLIP-T on Dreambench and Multibench (`python -m lambda_eclipse.evaluate`)."""
