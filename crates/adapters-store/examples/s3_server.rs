//! An S3-compatible server (s3s-fs) over a folder, for trying the adapter library against
//! S3 without a cloud account, and for `cargo xtask chaos`, which stops and restarts it.
//!
//! ```sh
//! cargo run --release -p adapters-store --example s3_server -- ROOT PORT
//! ```
//!
//! Serves bucket `adapters` (a folder under ROOT) on 127.0.0.1:PORT with access key
//! `test-key` and secret `test-secret`, and prints `listening on http://127.0.0.1:PORT`.

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(root), Some(port)) = (args.next(), args.next().and_then(|p| p.parse::<u16>().ok())) else {
        eprintln!("usage: s3_server ROOT PORT");
        std::process::exit(2);
    };
    let root = std::path::PathBuf::from(root);
    std::fs::create_dir_all(root.join("adapters")).expect("creating the bucket folder");
    let mut builder = s3s::service::S3ServiceBuilder::new(s3s_fs::FileSystem::new(&root).expect("an s3s-fs root"));
    builder.set_auth(s3s::auth::SimpleAuth::from_single("test-key", "test-secret"));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("binding the port");
    println!("listening on http://{}", listener.local_addr().expect("an address"));
    loop {
        let Ok((socket, _)) = listener.accept().await else { continue };
        // Answers go out at once, as from a real S3 endpoint, not after the peer's delayed
        // acknowledgement (~40 ms a request on loopback).
        let _ = socket.set_nodelay(true);
        let conn = ConnBuilder::new(TokioExecutor::new()).serve_connection(TokioIo::new(socket), service.clone()).into_owned();
        tokio::spawn(conn);
    }
}
