//! The router: hosts tonic-generated servers and dispatches each ttrpc call to the
//! one whose proto name matches the Request's `service`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use std::sync::OnceLock;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

use super::direct::DirectService;

use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, ServiceExt};
use tower_service::Service;

/// A type-erased service over tonic's http types that never fails: errors are
/// already `tonic::Status` responses.
pub type BoxedService = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Infallible>;

/// A service a [`Router`] can host: any server `tonic-prost-build` generates
/// (`FooServer::new(impl)`), one wrapped in a tonic interceptor
/// (`FooServer::with_interceptor(impl, check)`), or anything of the same
/// shape: any response body tonic's own router would accept.
pub trait HostedService:
    Service<
        http::Request<Body>,
        Response = http::Response<Self::ResponseBody>,
        Error = Infallible,
        Future: Send + 'static,
    > + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
    /// The body of the service's responses.
    type ResponseBody: http_body::Body<Data = bytes::Bytes, Error: Into<BoxError>> + Send + 'static;
}

impl<S, B> HostedService for S
where
    S: Service<
            http::Request<Body>,
            Response = http::Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    B: http_body::Body<Data = bytes::Bytes, Error: Into<BoxError>> + Send + 'static,
{
    type ResponseBody = B;
}

/// A tower layer that can wrap the calls a side serves (`ConcurrencyLimitLayer`,
/// `TimeoutLayer`, an auth layer, …): its service may fail with any error.
pub trait CallLayer: Layer<BoxedService, Service = Self::Layered> + Send + Sync + 'static {
    /// The wrapped service.
    type Layered: Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error: Into<BoxError> + Send,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static;
}

impl<L> CallLayer for L
where
    L: Layer<BoxedService> + Send + Sync + 'static,
    L::Service: Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error: Into<BoxError> + Send,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static,
{
    type Layered = L::Service;
}

type LayerFn = Arc<dyn Fn(BoxedService) -> BoxedService + Send + Sync>;

/// The services one side hosts, by fully qualified proto name, and the tower
/// layers every call to them passes through.
///
/// Add any server `tonic-prost-build` generates (`FooServer::new(impl)`),
/// unchanged. Cheap to clone; clones share the layered stack (so a
/// `ConcurrencyLimit` layer bounds all calls the side serves together).
///
/// ```
/// let router = brpc_core::Router::new()
///     // .add_service(GreeterServer::new(MyGreeter))
///     .layer(tower::limit::ConcurrencyLimitLayer::new(64));
/// assert!(router.service_names().is_empty());
/// ```
#[derive(Clone, Default)]
pub struct Router {
    services: Arc<HashMap<&'static str, BoxedService>>,
    direct: Arc<HashMap<&'static str, Arc<dyn DirectService>>>,
    layers: Vec<LayerFn>,
    stack: Arc<OnceLock<BoxedService>>,
    task_per_call: bool,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("services", &self.service_names())
            .field("layers", &self.layers.len())
            .finish()
    }
}

impl Router {
    /// A router with no services.
    pub fn new() -> Self {
        Router::default()
    }

    /// Hosts `service` under its proto name ([`NamedService::NAME`](tonic::server::NamedService::NAME)). A later
    /// service of the same name replaces the earlier one.
    pub fn add_service<S: HostedService>(mut self, service: S) -> Self {
        Arc::make_mut(&mut self.direct).remove(S::NAME);
        // tonic's Body::new passes a Body through unboxed; other bodies
        // (an interceptor's) are wrapped once.
        let service = service
            .map_response(|response: http::Response<S::ResponseBody>| response.map(Body::new));
        Arc::make_mut(&mut self.services).insert(S::NAME, BoxCloneSyncService::new(service));
        self.stack = Arc::default();
        self
    }

    /// Hosts a service on the direct path (what `brpc-build` generates:
    /// `GreeterService::new(impl Greeter)`): its calls are decoded straight
    /// into the tonic trait's requests, with no http types and none of the
    /// tower layers. A direct service replaces a tonic-path service of the
    /// same name and the other way round.
    pub fn add_direct<S: DirectService>(mut self, service: S) -> Self {
        let name = service.service_name();
        Arc::make_mut(&mut self.services).remove(name);
        Arc::make_mut(&mut self.direct).insert(name, Arc::new(service));
        self
    }

    /// With `true`, every call this side serves runs as a task of its own,
    /// as tonic's server runs each request: for handlers that block their
    /// thread or compute for long. By default (`false`) the calls of a
    /// connection are polled by the task serving it, which costs less per
    /// call (see [`serve`](crate::serve)).
    pub fn task_per_call(mut self, yes: bool) -> Self {
        self.task_per_call = yes;
        self
    }

    /// Whether every call runs as a task of its own.
    pub(crate) fn has_task_per_call(&self) -> bool {
        self.task_per_call
    }

    /// The direct service of this name, if one is hosted.
    pub(crate) fn direct(&self, name: &str) -> Option<&dyn DirectService> {
        // Among a few services, comparing names costs less than hashing one
        // (SipHash, on every served call).
        if self.direct.len() <= 8 {
            return self
                .direct
                .iter()
                .find(|(hosted, _)| **hosted == name)
                .map(|(_, s)| &**s);
        }
        self.direct.get(name).map(|s| &**s)
    }

    /// Passes every served call through a tower `layer` (tower's
    /// `ConcurrencyLimitLayer`, `TimeoutLayer`, an auth layer, …). The first
    /// layer added is the outermost. Layers are http middleware: calls to
    /// services added with [`add_direct`](Router::add_direct) skip them. A layer's error becomes the call's status:
    /// a `tonic::Status` as is, tower's timeout `DEADLINE_EXCEEDED`, load
    /// shedding `UNAVAILABLE`, anything else `UNKNOWN`.
    pub fn layer<L: CallLayer>(mut self, layer: L) -> Self {
        self.layers.push(Arc::new(move |inner: BoxedService| {
            let layered = layer.layer(inner);
            BoxCloneSyncService::new(tower::service_fn(move |request| {
                let service = layered.clone();
                async move {
                    Ok::<_, Infallible>(match service.oneshot(request).await {
                        Ok(response) => response,
                        Err(error) => layer_error_status(error.into()).into_http(),
                    })
                }
            }))
        }));
        self.stack = Arc::default();
        self
    }

    /// Whether a service of this proto name is hosted (either way).
    pub fn has_service(&self, name: &str) -> bool {
        self.services.contains_key(name) || self.direct.contains_key(name)
    }

    /// The hosted service names, sorted.
    pub fn service_names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self
            .services
            .keys()
            .chain(self.direct.keys())
            .copied()
            .collect();
        names.sort_unstable();
        names
    }

    /// Dispatches one request (path `/service/method`) through the layers.
    pub(crate) async fn call(&self, request: http::Request<Body>) -> http::Response<Body> {
        if self.layers.is_empty() {
            // No layers: skip the boxed stack and its per-call clone.
            return dispatch(&self.services, request).await;
        }
        let stack = self.stack.get_or_init(|| {
            let services = self.services.clone();
            let dispatch = BoxCloneSyncService::new(tower::service_fn(move |request| {
                let services = services.clone();
                async move { Ok::<_, Infallible>(dispatch(&services, request).await) }
            }));
            self.layers
                .iter()
                .rev()
                .fold(dispatch, |inner, layer| layer(inner))
        });
        match stack.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }
}

/// Routes by service name. Unknown services and methods get `UNIMPLEMENTED`
/// naming what was missing.
async fn dispatch(
    services: &HashMap<&'static str, BoxedService>,
    request: http::Request<Body>,
) -> http::Response<Body> {
    let path = request.uri().path();
    let (service, method) = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .unwrap_or((path, ""));
    let Some(svc) = services.get(service) else {
        return Status::unimplemented(format!("service {service}")).into_http();
    };
    let method_start = path.len() - method.len();
    // A refcount, not a copy: only read again if the method turns out unknown.
    let uri = request.uri().clone();
    let response = match svc.clone().oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    // tonic's generated servers answer an unknown method with a bare
    // UNIMPLEMENTED (trailers-only); say which method, as ttrpc does.
    if response.headers().contains_key("grpc-status")
        && let Some(s) = Status::from_header_map(response.headers())
        && s.code() == tonic::Code::Unimplemented
        && s.message().is_empty()
    {
        let method = uri.path().get(method_start..).unwrap_or_default();
        return Status::unimplemented(format!("method {method}")).into_http();
    }
    response
}

fn layer_error_status(error: BoxError) -> Status {
    if error.is::<tower::timeout::error::Elapsed>() {
        return Status::deadline_exceeded(format!("timed out in a server layer: {error}"));
    }
    if error.is::<tower::load_shed::error::Overloaded>() {
        return Status::unavailable(format!("overloaded: {error}"));
    }
    match error.downcast::<Status>() {
        Ok(status) => *status,
        Err(other) => Status::from_error(other),
    }
}
