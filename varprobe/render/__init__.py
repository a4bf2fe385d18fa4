"""Rendering: the only package that imports rich and matplotlib."""
