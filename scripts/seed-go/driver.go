// The driver of the seed's Go client: calls the seed's UploadBlob and GetBlob, unchanged,
// against a live Graviton server and checks what they return.
//
// For each blob (0 B to 5 MiB, random content, so every run uploads new bytes):
//   - UploadBlob returns a 32-byte key;
//   - GetBlob of that key returns exactly the bytes uploaded;
//   - the bytes are written to -out/<hex key>, so that check.py can verify that each key
//     is the BLAKE3 digest of its content (Go's standard library has no BLAKE3).
//
// Then: the same content uploaded again gives the same key, and GetBlob of a key that is
// not stored fails with NOT_FOUND, of a malformed key with INVALID_ARGUMENT.
//
// Usage: seed-go -target HOST:PORT -out DIR. Exit status 1 on any failure.
package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"time"

	pb "graviton/proto"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

var (
	targetFlag = flag.String("target", "localhost:50051", "server address, HOST:PORT")
	outFlag    = flag.String("out", "", "directory for the uploaded blobs, named by key (required)")
)

// The seed's chunk size is 1 MiB: these sizes cover no chunk, one partial chunk, chunk
// boundaries and several chunks.
var sizes = []int{0, 1, 4095, 4096, 65536, 65537, 1 << 20, 1<<20 + 1, 5<<20 + 123}

const callTimeout = 60 * time.Second

func target() string {
	flag.Parse()
	if *outFlag == "" {
		fail("-out is required")
	}
	return *targetFlag
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "seed-go: "+format+"\n", args...)
	os.Exit(1)
}

func exit(code int) {
	os.Exit(code)
}

// run returns the exit status: 0 if every check held.
func run(ctx context.Context, blobs pb.BlobServiceClient, uploads pb.UploadServiceClient) int {
	failures := 0
	check := func(ok bool, format string, args ...interface{}) {
		if !ok {
			failures++
			fmt.Fprintf(os.Stderr, "seed-go: FAILED: "+format+"\n", args...)
		}
	}
	call := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(ctx, callTimeout)
	}

	seed := time.Now().UnixNano()
	fmt.Printf("seed-go: content seed %d\n", seed)
	random := rand.New(rand.NewSource(seed))
	var stored [][]byte
	var keys [][]byte
	for _, size := range sizes {
		data := make([]byte, size)
		random.Read(data)
		c, cancel := call()
		key, err := UploadBlob(c, uploads, data)
		cancel()
		if err != nil {
			check(false, "UploadBlob of %d bytes: %v", size, err)
			continue
		}
		if len(key) != 32 {
			check(false, "UploadBlob of %d bytes returned a %d-byte key", size, len(key))
			continue
		}
		before := failures
		c, cancel = call()
		got, err := GetBlob(c, blobs, key)
		cancel()
		check(err == nil, "GetBlob of the %d-byte blob: %v", size, err)
		check(err != nil || bytes.Equal(got, data),
			"GetBlob of the %d-byte blob returned %d different bytes", size, len(got))
		name := filepath.Join(*outFlag, hex.EncodeToString(key))
		if err := os.WriteFile(name, data, 0o644); err != nil {
			fail("writing %s: %v", name, err)
		}
		stored = append(stored, data)
		keys = append(keys, key)
		if failures == before {
			fmt.Printf("seed-go: %8d bytes  key %x  round trip ok\n", size, key)
		}
	}

	if len(stored) > 3 {
		c, cancel := call()
		again, err := UploadBlob(c, uploads, stored[3])
		cancel()
		check(err == nil && bytes.Equal(again, keys[3]),
			"uploading the same content again gave key %x (err %v), not %x", again, err, keys[3])
	}

	absent := bytes.Repeat([]byte{0xff}, 32)
	c, cancel := call()
	_, err := GetBlob(c, blobs, absent)
	cancel()
	check(status.Code(err) == codes.NotFound, "GetBlob of an absent key: want NOT_FOUND, got %v", err)

	c, cancel = call()
	_, err = GetBlob(c, blobs, []byte{1, 2, 3})
	cancel()
	check(status.Code(err) == codes.InvalidArgument,
		"GetBlob of a 3-byte key: want INVALID_ARGUMENT, got %v", err)

	if failures > 0 {
		fmt.Fprintf(os.Stderr, "seed-go: %d checks failed\n", failures)
		return 1
	}
	fmt.Printf("seed-go: %d blobs round-tripped; same content, same key; NOT_FOUND and INVALID_ARGUMENT as specified\n", len(keys))
	return 0
}
