"""Entry points: ``soci`` (``soci.py``) and ``soci-snapshotter-grpc`` (``daemon.py``)."""
