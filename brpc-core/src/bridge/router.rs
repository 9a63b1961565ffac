//! The router: hosts tonic-generated servers and dispatches each ttrpc call to the
//! one whose proto name matches the Request's `service`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use std::sync::OnceLock;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

use super::direct::{DirectService, ServeFuture};
use super::serve::handle;
use crate::conn::{BoxFuture, Incoming, Reply};

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
    services: Arc<HashMap<&'static str, Arc<dyn Hosted>>>,
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
        Arc::make_mut(&mut self.services).insert(S::NAME, Arc::new(Tonic(service)));
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
        find(&self.direct, name).map(|s| &**s)
    }

    /// The tonic-path service of this name, if one is hosted and no layer
    /// wraps the calls to it.
    pub(crate) fn unlayered(&self, name: &str) -> Option<&dyn Hosted> {
        if !self.layers.is_empty() {
            return None;
        }
        find(&self.services, name).map(|s| &**s)
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

/// The entry of this name. Among a few entries, comparing names costs less
/// than hashing one (SipHash, on every served call).
fn find<'m, V>(map: &'m HashMap<&'static str, V>, name: &str) -> Option<&'m V> {
    if map.len() <= 8 {
        return map
            .iter()
            .find(|(hosted, _)| **hosted == name)
            .map(|(_, v)| v);
    }
    map.get(name)
}

/// A service hosted on the tonic path, kept as its own type behind the
/// trait: a call that passes through no layer goes straight into it, with
/// no boxed clone of the service and no boxed future of its own (what
/// tower's type-erased service costs on every call).
pub(crate) trait Hosted: Send + Sync + 'static {
    /// Serves one call to this service.
    fn serve<'a>(&'a self, call: Incoming, reply: &'a mut Reply) -> ServeFuture<'a>;

    /// Answers one http request (the path names this service).
    fn call(&self, request: http::Request<Body>) -> BoxFuture<'static, http::Response<Body>>;
}

/// A hosted tonic-generated server (or anything of its shape).
struct Tonic<S>(S);

impl<S: HostedService> Tonic<S> {
    /// The service's answer to `request`, its body as tonic's. tonic's
    /// `Body::new` passes a `Body` through unboxed; other bodies (an
    /// interceptor's) are wrapped once.
    /// `method` is the method the request's path names: an unknown one is
    /// named in the answer.
    fn answer(
        &self,
        request: http::Request<Body>,
        method: String,
    ) -> impl Future<Output = http::Response<Body>> + use<S> {
        let service = self.0.clone();
        async move {
            // tonic's generated servers are always ready; others may not be.
            let response = match service.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            named_unknown_method(&method, response.map(Body::new))
        }
    }
}

impl<S: HostedService> Hosted for Tonic<S> {
    fn serve<'a>(&'a self, call: Incoming, reply: &'a mut Reply) -> ServeFuture<'a> {
        Box::pin(handle(call, reply, |request, method| {
            self.answer(request, method)
        }))
    }

    fn call(&self, request: http::Request<Body>) -> BoxFuture<'static, http::Response<Body>> {
        // The path is `/{service}/{method}`.
        let method = request
            .uri()
            .path()
            .get(S::NAME.len() + 2..)
            .unwrap_or_default()
            .to_owned();
        Box::pin(self.answer(request, method))
    }
}

/// tonic's generated servers answer an unknown method with a bare
/// UNIMPLEMENTED (trailers-only); the answer says which method, as ttrpc's.
fn named_unknown_method(method: &str, response: http::Response<Body>) -> http::Response<Body> {
    if response
        .headers()
        .contains_key(crate::metadata::GRPC_STATUS)
        && let Some(s) = Status::from_header_map(response.headers())
        && s.code() == tonic::Code::Unimplemented
        && s.message().is_empty()
    {
        return Status::unimplemented(format!("method {method}")).into_http();
    }
    response
}

/// Routes by service name. Unknown services and methods get `UNIMPLEMENTED`
/// naming what was missing.
async fn dispatch(
    services: &HashMap<&'static str, Arc<dyn Hosted>>,
    request: http::Request<Body>,
) -> http::Response<Body> {
    let path = request.uri().path();
    let service = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .map_or(path, |(service, _)| service);
    match services.get(service) {
        Some(hosted) => hosted.call(request).await,
        None => Status::unimplemented(format!("service {service}")).into_http(),
    }
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
