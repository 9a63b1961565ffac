//! The router: hosts tonic-generated servers and dispatches each ttrpc call to the
//! one whose proto name matches the Request's `service`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;
use tower_service::Service;

type BoxedService = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Infallible>;

/// The services one side hosts, by fully qualified proto name.
///
/// Add any server `tonic-prost-build` generates (`FooServer::new(impl)`),
/// unchanged. Cheap to clone.
#[derive(Clone, Default)]
pub struct Router {
    services: Arc<HashMap<&'static str, BoxedService>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.services.keys().collect();
        names.sort();
        f.debug_struct("Router").field("services", &names).finish()
    }
}

impl Router {
    /// A router with no services.
    pub fn new() -> Self {
        Router::default()
    }

    /// Hosts `service` under its proto name ([`NamedService::NAME`]). A later
    /// service of the same name replaces the earlier one.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        Arc::make_mut(&mut self.services).insert(S::NAME, BoxCloneSyncService::new(service));
        self
    }

    /// Whether a service of this proto name is hosted.
    pub fn has_service(&self, name: &str) -> bool {
        self.services.contains_key(name)
    }

    /// The hosted service names, sorted.
    pub fn service_names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.services.keys().copied().collect();
        names.sort_unstable();
        names
    }

    /// Dispatches one request (path `/service/method`). Unknown services and
    /// methods get `UNIMPLEMENTED` naming what was missing.
    pub(crate) async fn call(&self, request: http::Request<Body>) -> http::Response<Body> {
        let path = request.uri().path();
        let (service, method) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .unwrap_or((path, ""));
        let Some(svc) = self.services.get(service) else {
            return Status::unimplemented(format!("service {service}")).into_http();
        };
        let method = method.to_owned();
        let response = match svc.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        // tonic's generated servers answer an unknown method with a bare
        // UNIMPLEMENTED; say which method, as ttrpc does.
        match Status::from_header_map(response.headers()) {
            Some(s) if s.code() == tonic::Code::Unimplemented && s.message().is_empty() => {
                Status::unimplemented(format!("method {method}")).into_http()
            }
            _ => response,
        }
    }
}
