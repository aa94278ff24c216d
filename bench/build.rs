//! Generates the gRPC client and server code for `graviton.proto` from the workspace's
//! proto file, with the vendored `protoc` (nothing installed on the host is needed).
//! `bytes` fields become `bytes::Bytes` so chunks move through without copies.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure().bytes(".").compile_protos(
        &["../proto/graviton/proto/blob.proto"],
        &[
            "../proto",
            well_known.to_str().ok_or("non-UTF-8 include path")?,
        ],
    )?;
    println!("cargo:rerun-if-changed=../proto/graviton/proto/blob.proto");
    Ok(())
}
