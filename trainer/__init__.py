"""Standalone training of the λ-ECLIPSE prior."""
