//! A recording proxy for request-level assertions on what drctl asks AWS.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A TCP proxy in front of moto that records the operations (`X-Amz-Target`, lowercase, e.g.
/// `trentservice.encrypt`) of the AWS JSON requests passing through.
pub struct RecordingProxy {
    pub url: String,
    ops: Arc<Mutex<Vec<String>>>,
    open: Arc<AtomicUsize>,
}

impl RecordingProxy {
    pub fn start() -> RecordingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let upstream = super::moto::endpoint()
            .trim_start_matches("http://")
            .to_owned();
        let ops = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(AtomicUsize::new(0));
        let (thread_ops, thread_open) = (ops.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let mut client = client.unwrap();
                let mut server = TcpStream::connect(&upstream).unwrap();
                let (ops, open) = (thread_ops.clone(), thread_open.clone());
                open.fetch_add(1, Ordering::SeqCst);
                let (mut client_back, mut server_back) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut server_back, &mut client_back);
                });
                std::thread::spawn(move || {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 64 * 1024];
                    loop {
                        match client.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                seen.extend_from_slice(&buf[..n]);
                                if server.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = server.shutdown(std::net::Shutdown::Both);
                    let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
                    let found = text
                        .lines()
                        .filter_map(|l| l.strip_prefix("x-amz-target:"))
                        .map(|v| v.trim().to_owned());
                    ops.lock().unwrap().extend(found);
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        RecordingProxy { url, ops, open }
    }

    /// The operations seen so far (once every connection has closed), and forgets them.
    pub fn take(&self) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.open.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::mem::take(&mut *self.ops.lock().unwrap())
    }
}
