"""A client built only from transfer.proto (no fedsqueeze.wire code) fetches a model.

This is what another gRPC implementation sees: it compiles the .proto on its own, calls
the service by its path, and verifies the segments with the manifest's digests.
"""

from __future__ import annotations

import hashlib
from typing import Any

import grpc
import pytest
import torch
from google.protobuf import descriptor_pool, message_factory

from fedsqueeze.codec import Segment, join_segments
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

    GetManifestRequest, GetManifestResponse = cls("GetManifestRequest"), cls("GetManifestResponse")
    StreamSegmentsRequest = cls("StreamSegmentsRequest")
    StreamSegmentsResponse = cls("StreamSegmentsResponse")
    enum = pool.FindEnumTypeByName("fedsqueeze.v1.FloatFormat").values_by_name

    source = InMemoryModelSource()
    g = torch.Generator().manual_seed(0)
    source.publish({"w": torch.randn(700, 700, generator=g), "b": torch.randn(700, generator=g)})
    server = TransferServer(
        source, UpdateStore(), TokenTable({"foreign": "f" * 32}), plaintext=True
    )
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            md = ((AUTHORIZATION_KEY, "Bearer " + "f" * 32), (EDGE_ID_KEY, "foreign"))
            get_manifest = channel.unary_unary(
                "/fedsqueeze.v1.ModelTransfer/GetManifest",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=GetManifestResponse.FromString,
            )
            request = GetManifestRequest(model="global", edge_id="foreign")
            request.codec_spec.float_format = enum["FLOAT_FORMAT_FP32"].number
            request.codec_spec.entropy_level = 0
            request.codec_spec.targets.append("*weight")
            request.codec_spec.min_ndim = 2
            manifest = get_manifest(request, metadata=md, timeout=10).manifest
            stream = channel.unary_stream(
                "/fedsqueeze.v1.ModelTransfer/StreamSegments",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=StreamSegmentsResponse.FromString,
            )
            payloads = {}
            for response in stream(
                StreamSegmentsRequest(manifest_id=manifest.manifest_id, edge_id="foreign"),
                metadata=md,
                timeout=10,
            ):
                payloads[response.segment.segment_id] = response.segment.payload
    finally:
        server.stop(grace=0)
    descriptors = {s.segment_id: s for s in manifest.segments}
    assert sorted(payloads) == list(range(len(descriptors)))
    for segment_id, payload in payloads.items():
        assert hashlib.sha256(payload).digest() == descriptors[segment_id].sha256
        assert len(payload) == descriptors[segment_id].byte_length
    whole = b"".join(payloads[i] for i in range(len(payloads)))
    assert hashlib.sha256(whole).digest() == manifest.encoded_sha256
    assert len(whole) == manifest.encoded_bytes
    # What the bytes mean is the codec's business: fedsqueeze's decoder reads them.
    segments = [Segment(i, (), i, 0, payloads[i]) for i in range(len(payloads))]
    assert len(join_segments(segments).records) == 2
