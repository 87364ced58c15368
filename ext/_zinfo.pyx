# cython: language_level=3
"""Placeholder: the checkpointed inflate lands here (see soci_fs/zinfo.py for the API)."""
