"""The wire format of the data plane, ``fedsqueeze.v1`` (``proto/fedsqueeze/v1/``).

* ``transfer_pb2`` / ``transfer_pb2_grpc`` (and their ``.pyi`` stubs): generated from
  ``proto/fedsqueeze/v1/transfer.proto`` by :mod:`fedsqueeze.wire.generate`, committed;
  a test regenerates them and fails on any difference.
* :mod:`fedsqueeze.wire.types`: the Python values of the messages (frozen dataclasses).
* :mod:`fedsqueeze.wire.convert`: the only conversions between the two
  (``x_to_proto`` / ``x_from_proto``), with :mod:`~fedsqueeze.wire.spec_convert` for the
  codec spec and :mod:`~fedsqueeze.wire.segment_reader` for the payload-heavy segments.
"""
