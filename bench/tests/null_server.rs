//! End to end: every scenario against a null server on 127.0.0.1:0, through the same
//! code path the binary uses, and the null server's answers to broken upload streams.

use bytes::Bytes;
use clap::Parser;
use graviton_bench::client::{Client, Read};
use graviton_bench::null_server::{null_key, serve, Http2};
use graviton_bench::proto::{
    upload_message::Message, upload_service_client::UploadServiceClient, StartUpload, UploadAck,
    UploadChunk, UploadMessage,
};
use graviton_bench::scenario::{self, Common, Scenario};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

async fn start_null_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(serve(listener, Http2::default(), std::future::pending()));
    addr
}

async fn run(addr: &str, args: &str) -> scenario::ScenarioResult {
    let argv = format!("bench --addr {addr} --target null --pool-bytes 4MiB {args}");
    let args = Args::try_parse_from(argv.split_whitespace()).unwrap();
    scenario::run(&args.common, &args.scenario).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_against_the_null_server() {
    let addr = start_null_server().await;
    let cases = [
        (
            "upload --size 3MiB --streams 2 --chunk 1MiB",
            "upload-2x3MiB",
            2,
            6 << 20,
        ),
        (
            "download --size 2500000 --streams 3",
            "download-3x2500000B",
            3,
            7_500_000,
        ),
        (
            "put-small --concurrency 4 --ops 50",
            "put-small-4KiB-c4",
            50,
            50 * 4096,
        ),
        (
            "get-small --concurrency 4 --blobs 10 --ops 40",
            "get-small-4KiB-c4",
            40,
            40 * 4096,
        ),
        (
            "ranged --blob-size 8MiB --range 64KiB --concurrency 3 --ops 30",
            "ranged-64KiB-of-8MiB-c3",
            30,
            30 * 65536,
        ),
    ];
    for (args, name, ops, bytes) in cases {
        let result = run(&addr, args).await;
        assert_eq!(result.name, name);
        assert_eq!(result.figures.ops, ops, "{name}");
        assert_eq!(result.figures.bytes, bytes, "{name}");
        assert!(result.figures.latency_us.p50 > 0 && result.figures.throughput_mib_s > 0.0);
    }
    let mixed = run(
        &addr,
        "mixed --read-percent 50 --blobs 5 --concurrency 4 --duration 0.3 --warmup 0.1",
    )
    .await;
    assert!(mixed.figures.ops > 0);
    assert_eq!(mixed.by_kind.len(), 2, "gets and puts are reported apart");
    assert_eq!(
        mixed.by_kind["get"].ops + mixed.by_kind["put"].ops,
        mixed.figures.ops
    );
}

/// Acks of one upload of `size` bytes in `chunk`-byte chunks: (received_bytes, complete?).
async fn acks_of(addr: &str, size: usize, chunk: usize) -> Vec<(u64, bool)> {
    let mut uploads = UploadServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let data = Bytes::from(vec![1u8; size]);
    let mut messages = vec![Message::Start(StartUpload {
        total_size: size as i64,
        attributes: Default::default(),
    })];
    for offset in (0..size).step_by(chunk) {
        let data = data.slice(offset..(offset + chunk).min(size));
        messages.push(Message::Chunk(UploadChunk {
            data,
            offset: offset as i64,
        }));
    }
    messages.push(Message::Complete(Default::default()));
    let requests = futures::stream::iter(
        messages
            .into_iter()
            .map(|m| UploadMessage { message: Some(m) }),
    );
    let mut acks = uploads.upload(requests).await.unwrap().into_inner();
    let mut seen = Vec::new();
    while let Some(ack) = acks.message().await.unwrap() {
        seen.push((ack.received_bytes, ack.complete.is_some()));
    }
    seen
}

#[tokio::test]
async fn null_server_acks_like_graviton() {
    let addr = start_null_server().await;
    assert_eq!(acks_of(&addr, 4096, 4096).await, [(0, false), (4096, true)]);
    let mib = 1 << 20;
    let expected = [
        (0, false),
        (mib, false),
        (2 * mib, false),
        (3 * mib, false),
        (3 * mib, true),
    ];
    assert_eq!(acks_of(&addr, 3 << 20, 512 << 10).await, expected);
}

#[tokio::test]
async fn null_server_honours_ranges_and_rejects_what_graviton_rejects() {
    let addr = start_null_server().await;
    let client = Client::connect(&addr, 1, false).await.unwrap();
    let key = null_key(10 << 20, 0);
    let read = Read {
        ranged: true,
        offset: 5,
        length_bytes: (3 << 20) + 7,
    };
    assert_eq!(
        client.download(0, key.clone(), read, None).await.unwrap(),
        (3 << 20) + 7
    );
    let past_end = Read {
        ranged: true,
        offset: 10 << 20,
        length_bytes: 1,
    };
    let error = client
        .download(0, key, past_end, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("InvalidArgument"), "{error}");
    let error = client
        .download(0, Bytes::from(vec![7u8; 32]), Read::whole(1), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("NotFound"), "{error}");

    let mut uploads = UploadServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let start = Message::Start(StartUpload {
        total_size: 10,
        attributes: Default::default(),
    });
    let bad_offset = Message::Chunk(UploadChunk {
        data: Bytes::from_static(b"abc"),
        offset: 4,
    });
    let ack = Message::Ack(UploadAck::default());
    for (messages, expected) in [
        (vec![start.clone(), bad_offset], "not the next byte"),
        (vec![start, ack], "server-to-client"),
    ] {
        let requests = futures::stream::iter(
            messages
                .into_iter()
                .map(|m| UploadMessage { message: Some(m) }),
        );
        let mut acks = uploads.upload(requests).await.unwrap().into_inner();
        let status = loop {
            match acks.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without an error"),
                Err(status) => break status,
            }
        };
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(expected), "{}", status.message());
    }
}
