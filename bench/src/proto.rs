//! The generated wire types and gRPC stubs of `proto/graviton/proto/blob.proto`
//! (package `graviton.proto`), built by this crate's own `build.rs` so that the bench
//! never depends on the server crate.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

tonic::include_proto!("graviton.proto");
