//! Graviton's benchmark harness: a load generator (`graviton-bench`), a null server
//! with the same API and no storage (`graviton-null-server`), and the report that sets
//! Graviton's figures against the null server's (the transport ceiling) and fio's (the
//! disk). It speaks only the wire contract, `proto/graviton/proto/blob.proto`, and does
//! not depend on the server crate.
//!
//! Modules: `payload` (content), `client` (the two RPCs every scenario is made of),
//! `runner` (closed-loop load), `stats` (histograms and figures), `scenario` (what each
//! scenario sets up and times), `host` (server memory, page cache), `null_server`,
//! `report` (ratios, table, SVG), `size` (byte-count flags).

pub mod client;
pub mod error;
pub mod host;
pub mod null_server;
pub mod payload;
pub mod proto;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod size;
pub mod stats;
