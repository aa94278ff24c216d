//! Graviton: a blob storage server. A gRPC front-end (`grpc`, over the generated
//! `proto` code) in front of a thread-per-core storage engine (`engine`).

#![deny(unsafe_code)]

pub mod client;
pub mod engine;
pub mod grpc;
pub mod proto;
