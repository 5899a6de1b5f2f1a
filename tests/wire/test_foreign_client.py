"""A client built only from transfer.proto (no fedsqueeze.wire code) fetches a model.

This is what another gRPC implementation sees: it compiles the .proto on its own, calls
the service by its path (Fetch, then StreamSegments to resume a broken stream), and
verifies the segments with the manifest's digests.
"""

from __future__ import annotations

import hashlib
from typing import Any

import grpc
import pytest
import torch
from google.protobuf import descriptor_pool, message_factory

from fedsqueeze.codec import Segment, decode_state, join_segments, state_digest
from fedsqueeze.transport import InMemoryModelSource, TokenTable, TransferServer, UpdateStore
from fedsqueeze.transport.auth import AUTHORIZATION_KEY, EDGE_ID_KEY
from tests.wire.protoc import descriptor_set

pytestmark = pytest.mark.timeout(60)


def test_foreign_client_fetches_and_verifies(tmp_path):
    pool = descriptor_pool.DescriptorPool()  # not the default pool fedsqueeze uses
    for file in descriptor_set(tmp_path).file:
        pool.Add(file)

    def cls(name: str) -> Any:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"fedsqueeze.v1.{name}"))

    FetchRequest, FetchResponse = cls("FetchRequest"), cls("FetchResponse")
    StreamSegmentsRequest = cls("StreamSegmentsRequest")
    StreamSegmentsResponse = cls("StreamSegmentsResponse")
    enum = pool.FindEnumTypeByName("fedsqueeze.v1.FloatFormat").values_by_name

    source = InMemoryModelSource()
    g = torch.Generator().manual_seed(0)
    # About 2 MB of float32: segments of at most 1 MiB.
    source.publish({"w": torch.randn(700, 700, generator=g), "b": torch.randn(700, generator=g)})
    server = TransferServer(
        source, UpdateStore(), TokenTable({"foreign": "f" * 32}), plaintext=True
    )
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            md = ((AUTHORIZATION_KEY, "Bearer " + "f" * 32), (EDGE_ID_KEY, "foreign"))
            fetch = channel.unary_stream(
                "/fedsqueeze.v1.ModelTransfer/Fetch",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=FetchResponse.FromString,
            )
            request = FetchRequest(model="global")
            request.codec_spec.float_format = enum["FLOAT_FORMAT_FP32"].number
            request.codec_spec.entropy_level = 0
            request.codec_spec.targets.append("*weight")
            request.codec_spec.min_ndim = 2
            # The stream breaks after the manifest and one segment (the client cancels).
            responses = fetch(request, metadata=md, timeout=10)
            first = next(responses)
            assert first.WhichOneof("part") == "manifest"
            manifest = first.manifest
            second = next(responses)
            responses.cancel()
            assert second.WhichOneof("part") == "segment"
            payloads = {second.segment.segment_id: second.segment.payload}
            # Resume: only the segments not held come.
            stream = channel.unary_stream(
                "/fedsqueeze.v1.ModelTransfer/StreamSegments",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=StreamSegmentsResponse.FromString,
            )
            resume = StreamSegmentsRequest(
                manifest_key=manifest.manifest_key, held_segment_ids=list(payloads)
            )
            for response in stream(resume, metadata=md, timeout=10):
                assert response.segment.segment_id not in payloads
                payloads[response.segment.segment_id] = response.segment.payload
    finally:
        server.stop(grace=0)
    # Asked by track and encoded as asked: the manifest names the model, not the spec;
    # a lossless full model decodes to the model itself.
    assert len(manifest.model_digest) == 32 and not manifest.HasField("codec_spec")
    assert not manifest.delta and manifest.decoded_digest == b""
    descriptors = {s.segment_id: s for s in manifest.segments}
    assert len(descriptors) >= 2
    assert sorted(payloads) == list(range(len(descriptors)))
    for segment_id, payload in payloads.items():
        assert hashlib.sha256(payload).digest() == descriptors[segment_id].sha256
        assert len(payload) == descriptors[segment_id].byte_length
    # What the bytes mean is the codec's business: fedsqueeze's decoder reads them.
    segments = [Segment(i, (), i, 0, payloads[i]) for i in range(len(payloads))]
    model = join_segments(segments)
    assert len(model.records) == 2
    assert state_digest(decode_state(model)) == manifest.model_digest
