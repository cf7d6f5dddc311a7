//! How nodes and clients open gRPC channels: every outgoing connection goes through a [`Dialer`],
//! so that a simulation can carry the same code over a simulated network.
//!
//! [`Dialer::tcp`] connects over the operating system's TCP; [`Dialer::custom`] hands each
//! connection attempt (`HOST:PORT`) to a function that returns any byte stream. Both build
//! endpoints the same way ([`Dialer::endpoint`]): a connect timeout, and HTTP/2 keep-alive pings,
//! which are what notice a connection whose peer vanished without closing it (a crashed host, a
//! partition that swallowed the bytes in flight); the channel then reconnects on its next call.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tonic::transport::{Channel, Endpoint, Uri};

/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How often an HTTP/2 connection is pinged, busy or idle.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(3);
/// How long a ping may go unanswered before the connection counts as broken.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// A byte stream to a peer, as a custom dialer returns it.
pub trait Connection: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Connection for T {}

/// A boxed connection attempt.
pub type Connecting = Pin<Box<dyn Future<Output = io::Result<Box<dyn Connection>>> + Send>>;

type ConnectFn = dyn Fn(String) -> Connecting + Send + Sync;

/// Opens channels to `HOST:PORT` addresses. Cheap to clone.
#[derive(Clone, Default)]
pub struct Dialer {
    /// `None`: the operating system's TCP.
    custom: Option<Arc<ConnectFn>>,
}

impl fmt::Debug for Dialer {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(if self.custom.is_some() { "Dialer(custom)" } else { "Dialer(tcp)" })
    }
}

impl Dialer {
    /// Returns a dialer over the operating system's TCP.
    pub fn tcp() -> Self {
        Dialer { custom: None }
    }

    /// Returns a dialer that opens each connection with `connect`, given the `HOST:PORT` to
    /// reach.
    pub fn custom(connect: impl Fn(String) -> Connecting + Send + Sync + 'static) -> Self {
        Dialer { custom: Some(Arc::new(connect)) }
    }

    /// Returns the endpoint for `address` (`HOST:PORT`) with the connect timeout and keep-alive
    /// pings set; callers add their own request timeouts.
    ///
    /// # Errors
    ///
    /// The reason, if `address` does not form a valid URI.
    pub fn endpoint(address: &str) -> Result<Endpoint, String> {
        Ok(Endpoint::from_shared(format!("http://{address}"))
            .map_err(|error| error.to_string())?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true))
    }

    /// Connects to `endpoint` now.
    ///
    /// # Errors
    ///
    /// The transport error if the connection cannot be made.
    pub async fn connect(&self, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
        match &self.custom {
            None => endpoint.connect().await,
            Some(connect) => endpoint.connect_with_connector(connector(connect.clone())).await,
        }
    }

    /// Returns a channel to `endpoint` that connects on first use and reconnects after
    /// failures.
    pub fn connect_lazy(&self, endpoint: Endpoint) -> Channel {
        match &self.custom {
            None => endpoint.connect_lazy(),
            Some(connect) => endpoint.connect_with_connector_lazy(connector(connect.clone())),
        }
    }
}

/// Adapts a connect function to the `tower::Service<Uri>` that tonic expects.
fn connector(
    connect: Arc<ConnectFn>,
) -> impl tower::Service<
    Uri,
    Response = hyper_util::rt::TokioIo<Box<dyn Connection>>,
    Error = io::Error,
    Future = impl Future<Output = io::Result<hyper_util::rt::TokioIo<Box<dyn Connection>>>> + Send,
> + Send
+ Clone
+ 'static {
    tower::service_fn(move |uri: Uri| {
        let connect = connect.clone();
        async move {
            let authority =
                uri.authority().map(|authority| authority.to_string()).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("no address in {uri}"))
                })?;
            connect(authority).await.map(hyper_util::rt::TokioIo::new)
        }
    })
}
