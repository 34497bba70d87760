"""Triton kernels, installed as `maskdit_fast.kernels`. Import the op modules lazily: importing
triton is slow and must follow TRITON_INTERPRET being set (tests/conftest.py does that on CPU)."""
