"""Generated gRPC code: ``proto/<dir>/*.proto`` becomes the sub-package ``soci_grpc._proto.<dir>``.

Everything below this package except this file is written by ``setup.py``'s ``build_py`` step
(``grpc_tools.protoc``, also run by ``pip install -e``) and is not tracked by git. Import the modules as
``from soci_grpc._proto.soci import snapshots_pb2``.
"""
