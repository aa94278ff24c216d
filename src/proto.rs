//! Code generated from `proto/graviton/proto/blob.proto` (the wire contract) by
//! `build.rs`: messages, the `BlobService` and `UploadService` servers and clients.
//!
//! `bytes` fields are `bytes::Bytes` and map fields `BTreeMap<String, String>`.
//! Nothing here is written by hand; change the `.proto` instead.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

tonic::include_proto!("graviton.proto");

/// The encoded `FileDescriptorSet` of the contract and its imports, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("graviton_descriptor");
