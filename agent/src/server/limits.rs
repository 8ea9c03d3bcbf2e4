//! What HTTP clients may hold: connections at once, time to send a
//! request, time to take a response. A listener that refuses past the limit
//! and a stream that cuts a client too slow, each logged.
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::{Instant, Sleep},
};

use super::lock;

/// What one HTTP connection may take. A scrape is one small request and a
/// response of some tens of KiB, written at once into the kernel's socket
/// buffers; anything slower is a client that is stuck or hostile, and each
/// connection it holds is a task and up to a rendered body of memory.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once; further ones get a 503 and are closed
    /// (logged, with a count).
    pub max_connections: usize,
    /// From a connection's accept, or a request's first byte, to the blank
    /// line that ends the request head (hyper's own header timeout needs a
    /// timer axum's server does not give it).
    pub head: Duration,
    /// How long a response may wait for the client to take any of it.
    pub stall: Duration,
    /// How long a kept-alive connection may sit with no bytes either way
    /// (above Prometheus's usual intervals, so its connections are reused).
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Far above a node's scrapers, well above 100 scraping at once.
            max_connections: 256,
            head: Duration::from_secs(5),
            stall: Duration::from_secs(10),
            idle: Duration::from_secs(90),
        }
    }
}

/// Why a connection is refused or cut.
#[derive(Clone, Copy)]
enum Cut {
    Refused,
    SlowHead,
    Stalled,
    Idle,
}

/// Connections refused or cut, for a log line of each kind now and then.
struct Tally {
    limits: Limits,
    /// By `Cut`: how many since the last line, and when that was (`None`:
    /// never; the first is logged at once).
    kinds: [(AtomicUsize, Mutex<Option<Instant>>); 4],
}

/// At most one line of a kind this often, however busy a flood of bad
/// clients is.
const TALLY_EVERY: Duration = Duration::from_secs(10);

impl Tally {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            kinds: Default::default(),
        }
    }

    fn note(&self, cut: Cut) {
        let (count, logged) = &self.kinds[cut as usize];
        count.fetch_add(1, Ordering::Relaxed);
        let mut logged = lock(logged);
        if logged.is_some_and(|t| t.elapsed() < TALLY_EVERY) {
            return;
        }
        *logged = Some(Instant::now());
        let n = count.swap(0, Ordering::Relaxed);
        let l = &self.limits;
        match cut {
            Cut::Refused => tracing::warn!(
                n,
                "HTTP: refused {n} connections over the limit of {} open at once (logged at most \
                 every {TALLY_EVERY:?})",
                l.max_connections
            ),
            Cut::SlowHead => tracing::warn!(
                n,
                "HTTP: closed {n} connections whose request head took over {:?} (logged at most \
                 every {TALLY_EVERY:?})",
                l.head
            ),
            Cut::Stalled => tracing::warn!(
                n,
                "HTTP: closed {n} connections that took none of their response for {:?} (logged \
                 at most every {TALLY_EVERY:?})",
                l.stall
            ),
            Cut::Idle => tracing::debug!(n, "HTTP: closed {n} connections idle for {:?}", l.idle),
        }
    }
}

/// A TCP listener that enforces [`Limits`] on what it accepts.
pub struct Limited {
    inner: TcpListener,
    limits: Limits,
    open: Arc<AtomicUsize>,
    /// Refused connections whose answer is being delivered.
    refusing: Arc<AtomicUsize>,
    tally: Arc<Tally>,
}

impl Limited {
    pub fn new(inner: TcpListener, limits: Limits) -> Self {
        Self {
            inner,
            limits,
            open: Arc::new(AtomicUsize::new(0)),
            refusing: Arc::new(AtomicUsize::new(0)),
            tally: Arc::new(Tally::new(limits)),
        }
    }

    /// A handle on the number of connections open.
    pub fn open(&self) -> Arc<AtomicUsize> {
        self.open.clone()
    }
}

const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\
content-length: 33\r\n\r\ntoo many connections to gopulse\r\n";

/// Refusals being delivered at most at once; past them a refused
/// connection is simply closed.
const REFUSING: usize = 64;

/// Answers 503 and closes. The request is read (a moment at most) before
/// the close: closing with unread bytes resets the connection, and the
/// client would likely lose the answer.
fn refuse(stream: TcpStream, refusing: &Arc<AtomicUsize>) {
    // Never waiting: the socket's send buffer is empty.
    let _ = stream.try_write(REFUSED);
    if refusing.fetch_add(1, Ordering::AcqRel) >= REFUSING {
        refusing.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    let refusing = refusing.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = stream;
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
        refusing.fetch_sub(1, Ordering::AcqRel);
    });
}

impl axum::serve::Listener for Limited {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Guarded, SocketAddr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather
                    // than spin (as axum's own listener does).
                    tracing::debug!("HTTP: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if self.open.fetch_add(1, Ordering::AcqRel) >= self.limits.max_connections {
                self.open.fetch_sub(1, Ordering::AcqRel);
                self.tally.note(Cut::Refused);
                refuse(stream, &self.refusing);
                continue;
            }
            let _ = stream.set_nodelay(true);
            return (
                Guarded::new(stream, self.limits, self.open.clone(), self.tally.clone()),
                addr,
            );
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection under [`Limits`]: it fails with `TimedOut` when a deadline
/// passes while it waits, and frees its place when dropped.
pub struct Guarded {
    io: TcpStream,
    limits: Limits,
    timer: Pin<Box<Sleep>>,
    /// Since when a request head has been awaited (accept, or a request's
    /// first byte), until its end is read.
    head_since: Option<Instant>,
    /// The last 3 bytes read, to find a head's end across reads.
    tail: [u8; 3],
    /// Since when a write has waited for the client to read.
    stalled_since: Option<Instant>,
    last_activity: Instant,
    open: Arc<AtomicUsize>,
    tally: Arc<Tally>,
}

impl Guarded {
    fn new(io: TcpStream, limits: Limits, open: Arc<AtomicUsize>, tally: Arc<Tally>) -> Self {
        let now = Instant::now();
        Self {
            io,
            limits,
            timer: Box::pin(tokio::time::sleep_until(now + limits.head)),
            head_since: Some(now),
            tail: [0; 3],
            stalled_since: None,
            last_activity: now,
            open,
            tally,
        }
    }

    /// The first deadline that applies now, and why.
    fn deadline(&self) -> (Instant, Cut) {
        let mut d = (self.last_activity + self.limits.idle, Cut::Idle);
        // A pipelined request's head may wait while earlier responses are
        // written: a stalled write is the client's, and the stall's limit.
        if let Some(t) = self.head_since
            && self.stalled_since.is_none()
            && t + self.limits.head < d.0
        {
            d = (t + self.limits.head, Cut::SlowHead);
        }
        if let Some(t) = self.stalled_since
            && t + self.limits.stall < d.0
        {
            d = (t + self.limits.stall, Cut::Stalled);
        }
        d
    }

    /// Called when the socket is not ready: an error once a deadline has
    /// passed, else arms the timer to wake the task at the deadline.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let (at, why) = self.deadline();
        if self.timer.deadline() != at {
            self.timer.as_mut().reset(at);
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            self.tally.note(why);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "HTTP connection past its deadline",
            ));
        }
        Ok(())
    }

    /// Follows request heads through the bytes read: a head ends at a blank
    /// line; bytes after it start the next (pipelined) one.
    fn saw(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let now = Instant::now();
        self.last_activity = now;
        let mut end = None;
        for (i, &b) in bytes.iter().enumerate() {
            let window = [self.tail[0], self.tail[1], self.tail[2], b];
            self.tail = [self.tail[1], self.tail[2], b];
            if &window == b"\r\n\r\n" {
                end = Some(i);
            }
        }
        match end {
            Some(i) if i + 1 == bytes.len() => self.head_since = None,
            Some(_) => self.head_since = Some(now),
            None => {
                self.head_since.get_or_insert(now);
            }
        }
    }

    /// After a write: not taken, it waits on the client (under the stall's
    /// deadline); taken, the client reads, and a head it has begun waited
    /// on the agent until now.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        let Poll::Ready(r) = r else {
            self.stalled_since.get_or_insert_with(Instant::now);
            self.check(cx)?;
            return Poll::Pending;
        };
        let now = Instant::now();
        self.stalled_since = None;
        self.last_activity = now;
        if self.head_since.is_some() {
            self.head_since = Some(now);
        }
        Poll::Ready(r)
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Pending => {
                this.check(cx)?;
                Poll::Pending
            }
            Poll::Ready(Ok(())) => {
                this.saw(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
