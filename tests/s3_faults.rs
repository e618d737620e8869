//! Backups to S3 through a small TCP proxy in front of moto: one that drops connections
//! part-way through uploads (the backup retries, or fails cleanly with no `completed` record
//! and no multipart upload left), and one that records the requests so their headers and
//! checksums can be checked byte for byte.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use common::{assert_same_tree, moto, restored, Sandbox};
use sha2::Digest;

/// Forwards connections to moto. A connection that has sent more than `cut_after` bytes
/// upstream is cut (both directions, at once) while `cuts_left` lasts.
struct Proxy {
    port: u16,
    cuts_left: Arc<AtomicUsize>,
    cuts: Arc<AtomicUsize>,
    /// What each connection sent upstream, when recording.
    sent: Option<Arc<Mutex<Vec<ConnectionLog>>>>,
}

type ConnectionLog = Arc<Mutex<Vec<u8>>>;

impl Proxy {
    fn start(cut_after: usize, cuts_left: usize, record: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = Proxy {
            port,
            cuts_left: Arc::new(AtomicUsize::new(cuts_left)),
            cuts: Arc::new(AtomicUsize::new(0)),
            sent: record.then(Default::default),
        };
        let (cuts_left, cuts, sent) = (
            proxy.cuts_left.clone(),
            proxy.cuts.clone(),
            proxy.sent.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", moto::port())) else {
                    continue;
                };
                let log = sent.as_ref().map(|s| {
                    let log = Arc::new(Mutex::new(Vec::new()));
                    s.lock().unwrap().push(log.clone());
                    log
                });
                let (cuts_left, cuts) = (cuts_left.clone(), cuts.clone());
                std::thread::spawn(move || {
                    let (mut from_up, mut to_client) =
                        (upstream.try_clone().unwrap(), client.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from_up, &mut to_client);
                        let _ = to_client.shutdown(Shutdown::Write);
                    });
                    let (mut client, mut upstream) = (client, upstream);
                    let mut buf = vec![0u8; 64 << 10];
                    let mut total = 0;
                    loop {
                        let n = match client.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        total += n;
                        let cut = total > cut_after
                            && cuts_left
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                                    c.checked_sub(1)
                                })
                                .is_ok();
                        if cut {
                            cuts.fetch_add(1, Ordering::SeqCst);
                            let _ = client.shutdown(Shutdown::Both);
                            let _ = upstream.shutdown(Shutdown::Both);
                            return;
                        }
                        if let Some(log) = &log {
                            log.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                        if upstream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = upstream.shutdown(Shutdown::Write);
                });
            }
        });
        proxy
    }

    /// An S3 URL whose endpoint is this proxy.
    fn url(&self, bucket: &str) -> String {
        format!(
            "s3://{bucket}/backups?region=us-east-1&endpoint=http://127.0.0.1:{}&part-size-mib=5",
            self.port
        )
    }

    /// Every request sent through the proxy, parsed.
    fn requests(&self) -> Vec<Request> {
        let sent = self.sent.as_ref().expect("recording proxy");
        let mut out = Vec::new();
        for log in sent.lock().unwrap().iter() {
            let data = log.lock().unwrap();
            let mut at = 0;
            while let Some((request, used)) = Request::parse(&data[at..]) {
                out.push(request);
                at += used;
            }
        }
        out
    }
}

struct Request {
    line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn parse(data: &[u8]) -> Option<(Request, usize)> {
        let end = data.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = std::str::from_utf8(&data[..end]).ok()?;
        let mut lines = head.split("\r\n");
        let line = lines.next()?.to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.parse().ok())
            .unwrap_or(Some(0))?;
        let body = data.get(end + 4..end + 4 + len)?.to_vec();
        Some((
            Request {
                line,
                headers,
                body,
            },
            end + 4 + len,
        ))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn sha256_b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(data))
}

fn files_sandbox(proxy: &Proxy, bucket: &str, storage: &str) -> (Sandbox, std::path::PathBuf) {
    let sb = Sandbox::with_repository(&proxy.url(bucket), "");
    let src = sb.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut data = vec![0u8; 12 << 20];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(src.join("big.bin"), &data).unwrap();
    std::fs::write(src.join("small.txt"), b"hello").unwrap();
    sb.policy(
        "tree",
        &format!(
            "name: tree\nsource:\n  kind: files\n  paths: [{:?}]\n{storage}",
            src.display().to_string()
        ),
    );
    (sb, src)
}

fn uploads_left(bucket: &str) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(moto::multipart_uploads(&moto::client("us-east-1"), bucket))
}

#[test]
fn backup_retries_through_dropped_connections_and_restores() {
    // Part uploads are 5 MiB: the first three connections die 1 MiB into one.
    let proxy = Proxy::start(1 << 20, 3, false);
    let bucket = moto::bucket("flaky");
    let (sb, src) = files_sandbox(&proxy, &bucket, "");
    let id = sb.backup("tree");
    assert_eq!(
        proxy.cuts.load(Ordering::SeqCst),
        3,
        "the proxy cut uploads"
    );
    assert_eq!(sb.status(&id), "completed");
    assert_eq!(uploads_left(&bucket), Vec::<String>::new());

    let target = sb.path().join("restore");
    sb.run(&[
        "restore",
        "-p",
        "tree",
        "-b",
        &id,
        "--target",
        target.to_str().unwrap(),
    ])
    .ok();
    assert_same_tree(&src, &restored(&target, &src));
}

#[test]
fn backup_fails_cleanly_when_uploads_keep_breaking() {
    // init and small requests pass; every connection that carries more than 1 MiB dies.
    let proxy = Proxy::start(1 << 20, usize::MAX, false);
    let bucket = moto::bucket("broken");
    let (sb, _src) = files_sandbox(&proxy, &bucket, "");
    let run = sb.run(&["backup", "--policy", "tree"]).code(1);
    assert!(
        run.stderr.contains("S3 did not answer") && run.stderr.contains("upload part"),
        "{}",
        run.stderr
    );
    assert!(
        proxy.cuts.load(Ordering::SeqCst) >= 5,
        "retried before failing"
    );

    let records = sb.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["status"], "failed", "{records:?}");
    assert_eq!(uploads_left(&bucket), Vec::<String>::new());
    // Nothing of the backup is in the bucket.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listed = rt.block_on(async {
        moto::client("us-east-1")
            .list_objects_v2()
            .bucket(&bucket)
            .prefix("backups/test/")
            .send()
            .await
            .unwrap()
    });
    assert_eq!(listed.contents().len(), 0, "{listed:?}");
}

#[test]
fn uploads_send_sha256_per_part_and_the_policy_object_options() {
    let bucket = moto::bucket("wire");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        moto::client("us-east-1")
            .create_bucket()
            .bucket(&bucket)
            .object_lock_enabled_for_bucket(true)
            .send()
            .await
            .unwrap()
    });
    let proxy = Proxy::start(usize::MAX, 0, true);
    let storage = "storage:\n  class: STANDARD_IA\n  sse-kms-key-id: alias/backups\n  object-lock:\n    mode: compliance\n    days: 3\n";
    let (sb, _src) = files_sandbox(&proxy, &bucket, storage);
    let id = sb.backup("tree");
    let requests = proxy.requests();
    let data_key = format!("/{bucket}/backups/test/tree/{id}/data.tar.zst.age");

    let creates: Vec<&Request> = requests
        .iter()
        .filter(|r| r.line.starts_with(&format!("POST {data_key}?uploads")))
        .collect();
    assert_eq!(creates.len(), 1, "one CreateMultipartUpload for the data");
    let parts: Vec<&Request> = requests
        .iter()
        .filter(|r| {
            r.line.starts_with(&format!("PUT {data_key}?")) && r.line.contains("partNumber=")
        })
        .collect();
    // 12 MiB of random data, encrypted: three parts of at most 5 MiB.
    assert_eq!(parts.len(), 3);
    let puts: Vec<&Request> = requests
        .iter()
        .filter(|r| {
            r.line.starts_with("PUT ")
                && r.line.contains(&format!("/{id}/"))
                && !r.line.contains("partNumber=")
        })
        .collect();
    assert_eq!(puts.len(), 2, "index and manifest in one PutObject each");

    for r in creates.iter().chain(&puts) {
        for (name, value) in [
            ("x-amz-storage-class", "STANDARD_IA"),
            ("x-amz-server-side-encryption", "aws:kms"),
            (
                "x-amz-server-side-encryption-aws-kms-key-id",
                "alias/backups",
            ),
            ("x-amz-object-lock-mode", "COMPLIANCE"),
        ] {
            assert_eq!(r.header(name), Some(value), "{name} of {}", r.line);
        }
        assert!(
            r.header("x-amz-object-lock-retain-until-date").is_some(),
            "{}",
            r.line
        );
    }
    assert_eq!(
        creates[0].header("x-amz-checksum-algorithm"),
        Some("SHA256")
    );
    for r in parts.iter().chain(&puts) {
        assert_eq!(
            r.header("x-amz-checksum-sha256"),
            Some(sha256_b64(&r.body).as_str()),
            "checksum of {}",
            r.line
        );
        assert!(r.body.len() <= 5 << 20, "{}", r.line);
    }
    let complete = requests
        .iter()
        .find(|r| r.line.starts_with(&format!("POST {data_key}?uploadId=")))
        .expect("CompleteMultipartUpload");
    let xml = String::from_utf8_lossy(&complete.body);
    for part in &parts {
        let sum = part.header("x-amz-checksum-sha256").unwrap();
        assert!(
            xml.contains(&format!("<ChecksumSHA256>{sum}</ChecksumSHA256>")),
            "{xml}"
        );
    }
}
