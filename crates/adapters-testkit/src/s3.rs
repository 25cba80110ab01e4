//! An S3-compatible server for tests (s3s-fs over a folder).

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use std::path::Path;

/// The key and secret [`start_s3`]'s server accepts.
pub const S3_KEY: (&str, &str) = ("test-key", "test-secret");

/// The `object_store` options that reach [`start_s3`]'s server at `endpoint`.
pub fn s3_options(endpoint: &str) -> [(&'static str, &str); 5] {
    [
        ("aws_endpoint", endpoint),
        ("aws_allow_http", "true"),
        ("aws_access_key_id", S3_KEY.0),
        ("aws_secret_access_key", S3_KEY.1),
        ("aws_region", "us-east-1"),
    ]
}

/// An S3-compatible server (s3s-fs) over `root` on a free port, with bucket `adapters`;
/// its URL. It runs on the calling tokio runtime until the runtime ends.
pub async fn start_s3(root: &Path) -> String {
    std::fs::create_dir_all(root.join("adapters")).unwrap();
    let mut builder = s3s::service::S3ServiceBuilder::new(s3s_fs::FileSystem::new(root).unwrap());
    builder.set_auth(s3s::auth::SimpleAuth::from_single(S3_KEY.0, S3_KEY.1));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else { return };
            let conn = ConnBuilder::new(TokioExecutor::new()).serve_connection(TokioIo::new(socket), service.clone()).into_owned();
            tokio::spawn(conn);
        }
    });
    format!("http://{addr}")
}
