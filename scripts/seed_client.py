#!/usr/bin/env python3
"""Runs the seed's Python client against a live Graviton server and checks round trips.

The block between the SEED-BEGIN and SEED-END lines is copied verbatim from the
"Python Client" section of shared/seed/grpc-api.md (trailing spaces included); with
--seed-doc this script checks that it still is. The contract (shared/CONTRACT.md) says
those functions must work unchanged against the server, generated from
proto/graviton/proto/blob.proto with the stock tools.

One adaptation, outside the verbatim block: the seed connects to 'localhost:50051'.
scripts/interop.sh runs the server there when that port is free, and then nothing is
changed. When it is not free, the server runs on another port, given as --target, and
this script rebinds the seed's module-level `channel` and `stub` to it after the seed
block ran. The seed's functions read those globals when called, so their code is
untouched.

Usage: seed_client.py --stubs DIR [--target HOST:PORT] [--seed-doc PATH]
DIR holds the generated graviton/proto/blob_pb2.py and blob_pb2_grpc.py.
"""

import argparse
import os
import sys

SEED_TARGET = "localhost:50051"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stubs", required=True, help="directory of the generated stubs")
    parser.add_argument("--target", default=SEED_TARGET, help="server address, HOST:PORT")
    parser.add_argument("--seed-doc", help="shared/seed/grpc-api.md, to check the copy")
    return parser.parse_args()


ARGS = parse_args()
sys.path.insert(0, ARGS.stubs)

# SEED-BEGIN
import grpc
from graviton.proto import blob_pb2, blob_pb2_grpc

# Create channel
channel = grpc.insecure_channel('localhost:50051')
stub = blob_pb2_grpc.BlobServiceStub(channel)

# Get a blob
def get_blob(key: bytes) -> bytes:
    request = blob_pb2.GetBlobRequest(key=key)
    chunks = stub.GetBlob(request)
    return b''.join(chunk.data for chunk in chunks)

# Upload a blob
def upload_blob(data: bytes) -> bytes:
    upload_stub = blob_pb2_grpc.UploadServiceStub(channel)
    
    def request_iterator():
        # Start
        yield blob_pb2.UploadMessage(
            start=blob_pb2.StartUpload(total_size=len(data))
        )
        
        # Chunks (1MB each)
        chunk_size = 1024 * 1024
        for i in range(0, len(data), chunk_size):
            chunk = data[i:i + chunk_size]
            yield blob_pb2.UploadMessage(
                chunk=blob_pb2.UploadChunk(data=chunk, offset=i)
            )
        
        # Complete
        yield blob_pb2.UploadMessage(
            complete=blob_pb2.CompleteUpload()
        )
    
    # Send and receive
    responses = upload_stub.Upload(request_iterator())
    
    for response in responses:
        if response.HasField('complete'):
            return response.complete.key
# SEED-END


def seed_block_of(text, begin, end):
    start = text.index(begin) + len(begin)
    return text[start:text.index(end, start)]


def check_verbatim(seed_doc):
    """The block above must equal the seed document's Python client, byte for byte."""
    with open(seed_doc, encoding="utf-8") as f:
        doc = f.read()
    section = doc[doc.index("### Python Client"):]
    seed = seed_block_of(section, "```python\n", "```")
    with open(os.path.abspath(__file__), encoding="utf-8") as f:
        ours = seed_block_of(f.read(), "# SEED-BEGIN\n", "# SEED-END")
    if ours != seed:
        raise SystemExit(f"the seed block in {__file__} differs from {seed_doc}")
    print(f"seed block is verbatim from {seed_doc}")


def blake3_or_none(data):
    try:
        import blake3  # optional: checks that the key is the content's BLAKE3 digest
    except ImportError:
        return None
    return blake3.blake3(data).digest()


def main():
    global channel, stub
    if ARGS.seed_doc:
        check_verbatim(ARGS.seed_doc)
    if ARGS.target != SEED_TARGET:
        # The one adaptation (see the module doc): point the seed's globals elsewhere.
        channel = grpc.insecure_channel(ARGS.target)
        stub = blob_pb2_grpc.BlobServiceStub(channel)
    print(f"seed client -> {ARGS.target}")

    mib = 1024 * 1024
    sizes = [0, 1, 1000, 4096, mib, mib + 1, 5 * mib + 123]
    passed = failed = 0
    keys = {}
    for size in sizes:
        data = os.urandom(size)
        try:
            key = upload_blob(data)
            assert isinstance(key, bytes) and len(key) == 32, f"key {key!r} is not 32 bytes"
            digest = blake3_or_none(data)
            assert digest is None or key == digest, "the key is not the content's BLAKE3 digest"
            got = get_blob(key)
            assert got == data, f"read back {len(got)} bytes that differ from the {size} sent"
            keys[size] = (key, data)
            passed += 1
            print(f"ok   {size:>9} bytes  key {key.hex()}")
        except Exception as error:  # report every size, then fail
            failed += 1
            print(f"FAIL {size:>9} bytes: {error!r}")
    # The same content twice: the same key (content addressing).
    if mib + 1 in keys:
        key, data = keys[mib + 1]
        try:
            assert upload_blob(data) == key, "a second upload of the same bytes got another key"
            passed += 1
            print("ok   same content, same key")
        except Exception as error:
            failed += 1
            print(f"FAIL same content twice: {error!r}")
    channel.close()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
