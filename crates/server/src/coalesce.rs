//! Write coalescing for HTTP/2 connections: the frames of many responses leave in one
//! `writev` instead of one each.
//!
//! ## Why
//! hyper runs each HTTP/2 stream as its own task and the connection as another. When a
//! stream's response is ready it queues its frames and wakes the connection task, and
//! tokio runs a task woken this way next (its LIFO slot), so the connection task flushed
//! each response on its own: measured at 1.65 `writev` calls per exchange under load, each
//! a trip through both ends' TCP stacks. A group commit finishes dozens of exchanges at
//! once; their responses should share a write.
//!
//! [`Coalescing`] takes what the connection writes into a buffer and, when asked to
//! flush, first yields once (wakes itself and returns `Pending`), so the other tasks
//! already waiting to run (the rest of the batch) queue their frames too; the next flush
//! writes everything in one call. An idle connection pays one extra task poll per flush,
//! no timer and no wait: the yield puts the task at the back of the run queue, not to
//! sleep.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes held before a write goes out without waiting for a flush.
const MAX_PENDING: usize = 256 * 1024;
/// Buffer capacity kept between flushes; a larger buffer is freed once written.
const RETAINED: usize = 64 * 1024;

/// An I/O object whose writes are gathered until a flush, which yields once before it
/// writes. See the module documentation.
#[derive(Debug)]
pub struct Coalescing<T> {
    io: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    written: usize,
    /// This flush has yielded once already.
    yielded: bool,
}

impl<T> Coalescing<T> {
    /// Wrap `io`.
    pub fn new(io: T) -> Self {
        Self {
            io,
            buf: Vec::new(),
            written: 0,
            yielded: false,
        }
    }

    fn pending(&self) -> usize {
        self.buf.len() - self.written
    }
}

impl<T: AsyncWrite + Unpin> Coalescing<T> {
    /// Write out everything buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        // A burst (or a peer that stopped reading) may have grown the buffer; an idle
        // connection should not keep it.
        if self.buf.capacity() > RETAINED {
            self.buf = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalescing<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalescing<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending() >= MAX_PENDING {
            ready!(this.poll_drain(cx))?;
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending() >= MAX_PENDING {
            ready!(this.poll_drain(cx))?;
        }
        let mut n = 0;
        for b in bufs {
            this.buf.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending() > 0 {
            if !this.yielded {
                this.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(this.poll_drain(cx))?;
        }
        this.yielded = false;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Coalescing<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_wait_for_flush_then_leave_together() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Coalescing::new(a);
        w.write_all(b"one ").await.unwrap();
        w.write_all(b"two").await.unwrap();
        assert_eq!(w.pending(), 7, "nothing written before a flush");
        w.flush().await.unwrap();
        assert_eq!(w.pending(), 0);
        let mut got = [0u8; 7];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"one two");
    }

    #[tokio::test]
    async fn a_full_buffer_goes_out_without_a_flush() {
        let (a, mut b) = tokio::io::duplex(4 * MAX_PENDING);
        let mut w = Coalescing::new(a);
        let chunk = vec![7u8; MAX_PENDING];
        w.write_all(&chunk).await.unwrap();
        w.write_all(b"x").await.unwrap();
        assert_eq!(
            w.pending(),
            1,
            "the full buffer was written before taking more"
        );
        let mut got = vec![0u8; MAX_PENDING];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, chunk);
    }

    #[tokio::test]
    async fn a_slow_reader_gets_everything_in_order() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut w = Coalescing::new(a);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            for piece in data.chunks(333) {
                w.write_all(piece).await.unwrap();
                w.flush().await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn write_errors_reach_the_caller() {
        let (a, b) = tokio::io::duplex(64);
        drop(b);
        let mut w = Coalescing::new(a);
        w.write_all(b"lost").await.unwrap();
        assert!(w.flush().await.is_err(), "the peer is gone");
    }
}
