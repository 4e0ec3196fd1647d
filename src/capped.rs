//! Learner connections read through `poco_core::cap`: no message past 16 MB and no answer past
//! 32 MB is ever buffered from a learner (a hostile server could otherwise make the platform's
//! process hold a 1 GB DataRow or rows without end, and an OOM-killed worker restarts the
//! whole cluster). Two layers: one on the socket (plain connections, and the plain messages
//! after a refused SSLRequest; it steps aside once TLS starts) and one over TLS (`CappedTls`).
//! Past a cap the waiting statement gets an ErrorResponse (SQLSTATE 54000) and the stream
//! ends. Written here rather than found in a crate: no crate caps tokio-postgres' reads.

use poco_core::cap::{Scanner, CAPS};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};

pub struct Capped<S> {
    inner: S,
    scan: Scanner,
    /// Bytes let through and not yet read by the client.
    out: Vec<u8>,
    at: usize,
    ended: bool,
}

impl<S> Capped<S> {
    /// `ssl_answer`: the client starts with an SSLRequest on this (socket) stream.
    pub fn new(inner: S, ssl_answer: bool) -> Capped<S> {
        Capped {
            inner,
            scan: Scanner::new(CAPS, ssl_answer),
            out: Vec::new(),
            at: 0,
            ended: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Capped<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.at < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.at);
                buf.put_slice(&this.out[this.at..this.at + n]);
                this.at += n;
                if this.at == this.out.len() {
                    this.out.clear();
                    this.at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.ended || this.scan.stopped() {
                return Poll::Ready(Ok(())); // the end of the stream
            }
            if this.scan.is_off() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut tmp = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut tmp);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.ended = true;
                continue;
            }
            this.scan.feed(rb.filled(), &mut this.out);
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Capped<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: TlsStream + Unpin> TlsStream for Capped<S> {
    fn channel_binding(&self) -> ChannelBinding {
        self.inner.channel_binding()
    }
}

/// A TLS connector whose streams are read through the caps (the messages inside TLS).
pub struct CappedTls<T>(pub T);

impl<S, T> TlsConnect<S> for CappedTls<T>
where
    T: TlsConnect<S>,
    T::Future: Send + 'static,
    T::Stream: Send + 'static,
    T::Error: Send + 'static,
{
    type Stream = Capped<T::Stream>;
    type Error = T::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Stream, Self::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let f = self.0.connect(stream);
        Box::pin(async move { f.await.map(|s| Capped::new(s, false)) })
    }
}
