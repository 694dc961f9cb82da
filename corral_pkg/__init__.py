"""Corral: pool the GPUs of a LAN into one llama.cpp model."""

__version__ = "0.1.0"
