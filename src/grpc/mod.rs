//! The gRPC front-end: `BlobService` and `UploadService` over the storage [`Engine`],
//! plus health and reflection, served by [`serve`].
//!
//! This module owns everything about the wire and nothing about storage: tonic types
//! stay here (the engine never sees them), and each request is validated here before it
//! reaches the engine. Guarantees, per `shared/CONTRACT.md`:
//!
//! - every failure reaches the client as the status code the contract names, built in
//!   one function (`failure::status`), with a message a person can act on;
//! - an upload is acknowledged as complete only once the engine made it durable, and an
//!   upload that ends any other way (bad stream, cancel, disconnect, deadline, shutdown)
//!   is aborted: it leaves no visible blob;
//! - the client's `grpc-timeout` bounds the whole call, streams included
//!   (`DEADLINE_EXCEEDED`);
//! - memory per stream is bounded: back-pressure from the engine stops reading the
//!   client's stream, and a slow reader slows the engine's reads;
//! - so is the number of everything that holds memory for a client: connections
//!   (`connections_max`; more wait in the listen backlog), streams per connection (512),
//!   uploads (`uploads_max`) and open `GetBlob`/`ListBlobs` responses (`reads_max`),
//!   the last two refused with `UNAVAILABLE` beyond their limit; calls whose request is
//!   being read or handled (`calls_max`, and `calls_per_connection_max` of them per
//!   connection; more wait), since tonic buffers a unary request whole, and that
//!   request's size (1 MiB for `BlobService`, beyond which it is `RESOURCE_EXHAUSTED`;
//!   64 KiB for health and reflection);
//! - on shutdown, calls in flight get a bounded drain period, then the engine is shut
//!   down (everything acknowledged is durable) before [`serve`] returns.
//!
//! [`Engine`]: crate::engine::Engine

mod auth;
mod blob;
mod connections;
mod convert;
mod deadline;
mod drain;
mod failure;
mod health;
mod limits;
mod server;
mod upload;

pub use server::{serve, ServeError, ServeOptions};
