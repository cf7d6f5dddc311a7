//! How nodes and clients open gRPC channels: every outgoing connection goes through a [`Dialer`],
//! so that a simulation can carry the same code over a simulated network.
//!
//! [`Dialer::tcp`] connects over the operating system's TCP; [`Dialer::custom`] hands each
//! connection attempt (`HOST:PORT`) to a function that returns any byte stream. Both build
//! endpoints the same way ([`Dialer::endpoint`]): a connect timeout, and HTTP/2 keep-alive pings,
//! which are what notice a connection whose peer vanished without closing it (a crashed host, a
//! partition that swallowed the bytes in flight); the channel then reconnects on its next call.
//!
//! Every connection attempt goes through one connector, which marks its failures
//! ([`ConnectFailed`]): a request that failed that way never left this process, so a client
//! may send it again even if it is a write ([`is_connect_failure`]). Any other transport error
//! may have struck after the request was sent.

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
/// tonic's own connect timeout, a backstop behind the connector's (whose expiry is marked as a
/// connect failure, tonic's is not).
const TONIC_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
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

/// Why a connection attempt failed. A request that fails with this in its error's source
/// chain was never sent.
#[derive(Debug)]
pub struct ConnectFailed(pub io::Error);

impl fmt::Display for ConnectFailed {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "cannot connect: {}", self.0)
    }
}

impl std::error::Error for ConnectFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Returns whether `status` reports a failed connection attempt: the request never left, so
/// it had no effect anywhere.
pub fn is_connect_failure(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<ConnectFailed>() {
            return true;
        }
        // `io::Error::source` skips the error it wraps; look inside.
        if let Some(inner) = error.downcast_ref::<io::Error>().and_then(io::Error::get_ref)
            && inner.is::<ConnectFailed>()
        {
            return true;
        }
        source = error.source();
    }
    false
}

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
            .connect_timeout(TONIC_CONNECT_TIMEOUT)
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
        endpoint.connect_with_connector(connector(self.connect_fn())).await
    }

    /// Returns a channel to `endpoint` that connects on first use and reconnects after
    /// failures.
    pub fn connect_lazy(&self, endpoint: Endpoint) -> Channel {
        endpoint.connect_with_connector_lazy(connector(self.connect_fn()))
    }

    /// The function that opens one connection.
    fn connect_fn(&self) -> Arc<ConnectFn> {
        match &self.custom {
            Some(connect) => connect.clone(),
            None => Arc::new(|address: String| -> Connecting {
                Box::pin(async move {
                    let stream = tokio::net::TcpStream::connect(address).await?;
                    stream.set_nodelay(true)?;
                    Ok(Box::new(stream) as Box<dyn Connection>)
                })
            }),
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
            let marked = |error: io::Error| io::Error::new(error.kind(), ConnectFailed(error));
            match tokio::time::timeout(CONNECT_TIMEOUT, connect(authority)).await {
                Ok(Ok(connection)) => Ok(hyper_util::rt::TokioIo::new(connection)),
                Ok(Err(error)) => Err(marked(error)),
                Err(_) => Err(marked(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {CONNECT_TIMEOUT:?}"),
                ))),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused connection is told apart from other transport errors: the request never left.
    #[tokio::test]
    async fn refused_connections_are_marked() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        drop(listener);
        // A lazy channel fails the request itself.
        let channel = Dialer::tcp().connect_lazy(Dialer::endpoint(&address).expect("endpoint"));
        let mut client = crate::kv::kv_client::KvClient::new(channel);
        let request = crate::kv::GetRequest { range_id: 2, key: b"k".to_vec() };
        let status = client.get(request).await.expect_err("nobody listens");
        assert!(is_connect_failure(&status), "{status:?}");
        let status = tonic::Status::unavailable("x");
        assert!(!is_connect_failure(&status));
        let error = Dialer::tcp()
            .connect(Dialer::endpoint(&address).expect("endpoint"))
            .await
            .expect_err("nobody listens");
        let status = tonic::Status::from_error(Box::new(error));
        assert!(is_connect_failure(&status), "{status:?}");
    }
}
