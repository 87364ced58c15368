"""Compiled hot paths (built from the Cython sources in ``ext/``). Import them through ``soci_fs._select``."""
