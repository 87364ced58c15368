"""soci_fs: the data plane of soci-py.

Owns the SOCI formats (zTOC, checkpoints, index manifests), span arithmetic and extraction, the local content
store, the registry client and (later) the lazy FUSE filesystem. It never imports ``soci_grpc``.
"""

__version__ = "0.1.0"
