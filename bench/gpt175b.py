"""A model file for ``varprobe predict``: GPT-3 175B's shape (96 layers, d_model 12288).

``varprobe predict bench/gpt175b.py`` builds it on the meta device: 175B parameters,
no weight memory. (Its folder is on sys.path while it loads, hence the plain import.)
"""

from models import gpt3_175b as build_model  # noqa: F401
