//! Lingering close: the listener the service accepts connections on.
//!
//! A request refused before its body is read (413 for a declared length over the limit, 401
//! without a key, 408 for a stalled sender) is answered at once, and hyper then closes the
//! connection with the rest of the body unread. Closing a socket with unread input makes the
//! kernel send a reset, which can destroy the answer before the client has read it: the client
//! sees "connection reset" instead of the JSON error. So, as web servers do, the service shuts
//! down its sending side first and reads and discards what the client still sends, for at most
//! [`LINGER_TIME`] and [`LINGER_BYTES`], before it closes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

/// Longest a closing connection keeps reading what the client still sends.
pub const LINGER_TIME: Duration = Duration::from_secs(5);
/// Most bytes a closing connection reads and discards.
pub const LINGER_BYTES: u64 = 256 * 1024 * 1024;

/// A TCP listener whose connections linger on close.
pub struct LingeringListener {
    inner: TcpListener,
}

impl LingeringListener {
    pub fn new(inner: TcpListener) -> Self {
        Self { inner }
    }
}

impl axum::serve::Listener for LingeringListener {
    type Io = Lingering;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => return (Lingering { stream, state: State::Open }, addr),
                // Out of file descriptors and the like: wait rather than spin.
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection that drains its input when shut down.
pub struct Lingering {
    stream: TcpStream,
    state: State,
}

enum State {
    Open,
    Draining { deadline: Pin<Box<Sleep>>, left: u64 },
    Closed,
}

impl AsyncRead for Lingering {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Open => {
                    // Our answer is complete: send FIN, then keep reading.
                    ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
                    this.state = State::Draining { deadline: Box::pin(tokio::time::sleep(LINGER_TIME)), left: LINGER_BYTES };
                }
                State::Draining { deadline, left } => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        this.state = State::Closed;
                        continue;
                    }
                    let mut scratch = [0u8; 16 * 1024];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                        Poll::Pending => return Poll::Pending,
                        // The client closed its side (or the connection broke): done.
                        Poll::Ready(Err(_)) => this.state = State::Closed,
                        Poll::Ready(Ok(())) if buf.filled().is_empty() => this.state = State::Closed,
                        Poll::Ready(Ok(())) => {
                            *left = left.saturating_sub(buf.filled().len() as u64);
                            if *left == 0 {
                                this.state = State::Closed;
                            }
                        }
                    }
                }
                State::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_closing_connection_reads_what_the_peer_still_sends() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut listener = LingeringListener::new(listener);
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            // Keep sending after the server has answered and shut down.
            let mut answer = Vec::new();
            for _ in 0..64 {
                if s.write_all(&[1u8; 64 * 1024]).await.is_err() {
                    break;
                }
            }
            s.shutdown().await.unwrap();
            s.read_to_end(&mut answer).await.unwrap();
            answer
        });
        let (mut conn, _) = axum::serve::Listener::accept(&mut listener).await;
        let mut first = [0u8; 10];
        conn.read_exact(&mut first).await.unwrap();
        conn.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        conn.shutdown().await.unwrap();
        assert!(matches!(conn.state, State::Closed));
        drop(conn);
        let answer = client.await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 413"), "{:?}", String::from_utf8_lossy(&answer));
    }
}
