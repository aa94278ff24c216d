//! Generates the gRPC code for `proto/graviton/proto/blob.proto`.
//!
//! Uses the `protoc` binary and the well-known-type includes (`google/protobuf/*.proto`)
//! vendored by the `protoc-bin-vendored` crate, so nothing has to be installed by hand.
//! `bytes` fields become `bytes::Bytes` (decoded as slices of the receive buffer, not
//! copied) and map fields `BTreeMap` (the engine keeps attributes in one). The encoded
//! `FileDescriptorSet` (with imports) is written to `OUT_DIR/graviton_descriptor.bin` for
//! server reflection.

use std::path::PathBuf;

const PROTO_ROOT: &str = "proto";
const PROTO_FILE: &str = "proto/graviton/proto/blob.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("cargo sets OUT_DIR")?);
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known_types = protoc_bin_vendored::include_path()?;

    // Equivalent to setting PROTOC for prost-build, without mutating this process's
    // environment.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);

    tonic_prost_build::configure()
        .bytes(".")
        .btree_map(".")
        .file_descriptor_set_path(out_dir.join("graviton_descriptor.bin"))
        .compile_with_config(
            config,
            &[PathBuf::from(PROTO_FILE)],
            &[PathBuf::from(PROTO_ROOT), well_known_types],
        )?;
    println!("cargo:rerun-if-changed=build.rs");
    Ok(())
}
