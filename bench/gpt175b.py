"""A model file for ``varprobe predict``: GPT-3 175B's shape (96 layers, d_model 12288)."""

from bench.models import gpt3_175b as build_model  # noqa: F401
