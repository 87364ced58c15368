"""soci_grpc: the control plane of soci-py.

Owns the ``soci`` CLI, the ``soci-snapshotter-grpc`` daemon, configuration and the credential keychains.
It uses ``soci_fs`` for all format and data work.
"""
