//! A stand-in for the Hugging Face hub on loopback, for `HF_ENDPOINT`: it answers what `hf-hub`
//! asks of `/<repo>/resolve/<revision>/<file>` (a one-byte range for the metadata: commit, etag
//! and size; then the file from an offset) with the files of a local model folder, and sends the
//! weights in pieces a pause apart, so a download takes long enough to follow.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The hub's commit id of every file it serves.
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A running stand-in (it stops with the test process).
pub struct FakeHub {
    /// For `HF_ENDPOINT`.
    pub url: String,
    /// `"<file> <range>"` of every request, in order (`-` without a range).
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeHub {
    /// Serves the files of `dir` as the repository `repo` (any revision), `model.safetensors` in
    /// `pieces` parts `pause` apart.
    pub fn serve(repo: &str, dir: &Path, pieces: usize, pause: Duration) -> Self {
        Self::serve_private(repo, dir, None, pieces, pause)
    }

    /// [`FakeHub::serve`], answering 401 to a request without `Authorization: Bearer <token>`
    /// when there is a `token` (a gated or private model).
    pub fn serve_private(repo: &str, dir: &Path, token: Option<&str>, pieces: usize, pause: Duration) -> Self {
        Self::start(repo, dir, token, Pacing { pieces, pause }, None)
    }

    /// [`FakeHub::serve`], but the first time it sends the weights it closes the connection
    /// after `after` of the pieces, as a network failing mid-download does.
    pub fn serve_cutting_once(repo: &str, dir: &Path, pieces: usize, pause: Duration, after: usize) -> Self {
        Self::start(repo, dir, None, Pacing { pieces, pause }, Some(after))
    }

    /// Serves, with the first sending of the weights closed after `cut_once_after` pieces.
    fn start(repo: &str, dir: &Path, token: Option<&str>, pacing: Pacing, cut_once_after: Option<usize>) -> Self {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (prefix, dir, seen) = (format!("/{repo}/resolve/"), dir.to_path_buf(), requests.clone());
        let cut = Arc::new(Mutex::new(cut_once_after));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (prefix, dir, seen, bearer, cut) = (prefix.clone(), dir.clone(), seen.clone(), bearer.clone(), cut.clone());
                std::thread::spawn(move || answer(stream, &prefix, &dir, &seen, bearer.as_deref(), &pacing, &cut));
            }
        });
        FakeHub { url, requests }
    }

    /// The environment that sends hf-hub to this stand-in, online, with its cache in `hf_home`.
    pub fn env(&self, hf_home: &Path) -> Vec<(String, String)> {
        [("HF_ENDPOINT", self.url.clone()), ("HF_HOME", hf_home.to_string_lossy().into_owned()), ("HF_HUB_OFFLINE", "0".into())]
            .map(|(k, v)| (k.to_string(), v))
            .to_vec()
    }

    /// The first byte that request `request` (as [`FakeHub::requests_for`] gives it) asked for
    /// from there on (`"<file> <n>-"`), if it was such a request.
    pub fn range_start(request: &str) -> Option<u64> {
        request.split_once(' ')?.1.strip_suffix('-')?.parse().ok()
    }

    /// The requests for `file`, as `"<file> <range>"`.
    pub fn requests_for(&self, file: &str) -> Vec<String> {
        self.requests.lock().unwrap().iter().filter(|r| r.split(' ').next() == Some(file)).cloned().collect()
    }
}

/// The etag the stand-in sends for a file of `bytes` (a hash of them), which hf-hub names the
/// file's blob in its cache after.
pub fn etag_of(bytes: &[u8]) -> String {
    format!("{:016x}", bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3)))
}

/// How the weights are sent.
#[derive(Clone, Copy)]
struct Pacing {
    pieces: usize,
    pause: Duration,
}

/// Answers one request (and closes the connection).
fn answer(mut stream: TcpStream, prefix: &str, dir: &Path, seen: &Mutex<Vec<String>>, bearer: Option<&str>, pacing: &Pacing, cut: &Mutex<Option<usize>>) {
    let Pacing { pieces, pause } = *pacing;
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let path = line.split(' ').nth(1).unwrap_or("").to_string();
    let (mut range, mut authorization) = (None, None);
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap() == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                range = value.trim().strip_prefix("bytes=").map(str::to_string);
            } else if name.eq_ignore_ascii_case("authorization") {
                authorization = Some(value.trim().to_string());
            }
        }
    }
    if bearer.is_some_and(|b| authorization.as_deref() != Some(b)) {
        let _ = stream.write_all(b"HTTP/1.1 401 Unauthorized\r\nx-error-code: GatedRepo\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        return;
    }
    // `<revision>/<file>` after the repository's prefix.
    let file = path.strip_prefix(prefix).and_then(|rest| rest.split_once('/')).map(|(_, f)| f.to_string()).unwrap_or_default();
    seen.lock().unwrap().push(format!("{file} {}", range.as_deref().unwrap_or("-")));
    let local: PathBuf = dir.join(&file);
    let Ok(bytes) = std::fs::read(&local).map_err(|_| ()).and_then(|b| if file.is_empty() || file.contains("..") { Err(()) } else { Ok(b) }) else {
        let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nx-error-code: EntryNotFound\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        return;
    };
    let len = bytes.len();
    let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
        Some((from, to)) => (from.parse().unwrap_or(0), to.parse::<usize>().map_or(len, |t| (t + 1).min(len))),
        None => (0, len),
    };
    let etag = etag_of(&bytes);
    let status = if range.is_some() { "206 Partial Content" } else { "200 OK" };
    let head = format!(
        "HTTP/1.1 {status}\r\nx-repo-commit: {COMMIT}\r\netag: \"{etag}\"\r\ncontent-range: bytes {start}-{}/{len}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        end.saturating_sub(1),
        end - start
    );
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    let body = &bytes[start..end];
    let paced = file == "model.safetensors" && body.len() > 1;
    let size = if paced { body.len().div_ceil(pieces.max(1)) } else { body.len().max(1) };
    let cut_after = if paced { cut.lock().unwrap().take() } else { None };
    for (i, piece) in body.chunks(size).enumerate() {
        if cut_after == Some(i) {
            // Cut short: the client has fewer bytes than the length it was told.
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
        if paced && i > 0 {
            std::thread::sleep(pause);
        }
        if stream.write_all(piece).and_then(|_| stream.flush()).is_err() {
            return;
        }
    }
    // Drain what the client may still send, so closing does not reset the connection.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = reader.read(&mut [0u8; 64]);
}
