//! The tonic [`Router`] as the engine's [`Handler`]: a served call becomes an
//! http request into the tonic-generated server it names, and the server's
//! http response becomes frames through the call's [`Reply`].

use futures_util::future::Either;
use tonic::Status;
use tonic::body::Body;

use super::Router;
use super::direct::ServeFuture;
use super::grpc::{
    BodyEvent, MessageReader, is_bare_ok, no_final_status, request_body, status_from_http,
    status_from_trailers,
};
use crate::conn::{Handler, Incoming, Reply};
use crate::metadata;

impl Handler for Router {
    // Direct services first. The http path's future is large and boxed: held
    // inline it would make every served call's future that large, and that
    // future is copied on its way into the connection's set of calls. Not an
    // `async fn`, which would hold `call` beside the future made from it.
    //
    // A tonic-path service that no layer wraps serves the call itself, its
    // future inside that one box; otherwise the call goes through the
    // router's layered stack.
    fn serve<'a>(
        &'a self,
        call: Incoming,
        reply: &'a mut Reply,
    ) -> impl std::future::Future<Output = ()> + Send + 'a {
        if let Some(service) = self.direct(&call.service) {
            return Either::Left(service.serve(call, reply));
        }
        Either::Right(match self.unlayered(&call.service) {
            Some(service) => service.serve(call, reply),
            None => {
                Box::pin(handle(call, reply, |request, _| self.call(request))) as ServeFuture<'a>
            }
        })
    }

    fn task_per_call(&self) -> bool {
        self.has_task_per_call()
    }
}

/// Serves one call: the call as an http request to `answer` (with the
/// call's method name), its http response as frames.
pub(super) async fn handle<F>(
    call: Incoming,
    out: &mut Reply,
    answer: impl FnOnce(http::Request<Body>, String) -> F,
) where
    F: Future<Output = http::Response<Body>>,
{
    let Incoming {
        peer,
        service,
        method,
        metadata: entries,
        timeout,
        input,
    } = call;
    let uri = match path_uri(&service, &method) {
        Some(uri) => uri,
        None => {
            out.status(Status::invalid_argument(format!(
                "service {service:?} / method {method:?} is not a valid name"
            )))
            .await;
            return;
        }
    };
    let mut http_request = http::Request::new(request_body(input));
    *http_request.method_mut() = http::Method::POST;
    *http_request.uri_mut() = uri;
    let headers = http_request.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    if let Some(timeout) = timeout {
        headers.insert(
            metadata::GRPC_TIMEOUT,
            metadata::format_grpc_timeout(timeout),
        );
    }
    if let Err(status) = metadata::append_key_values(headers, entries) {
        out.status(status).await;
        return;
    }
    http_request.extensions_mut().insert(peer);

    let response = answer(http_request, method).await;
    respond(out, response).await;
}

/// The uri `/{service}/{method}`, as `http::Uri::try_from` would parse it,
/// built without the formatter and without parsing it as a whole uri (the
/// path is all there is).
fn path_uri(service: &str, method: &str) -> Option<http::Uri> {
    let mut path = Vec::with_capacity(2 + service.len() + method.len());
    path.push(b'/');
    path.extend_from_slice(service.as_bytes());
    path.push(b'/');
    path.extend_from_slice(method.as_bytes());
    let mut parts = http::uri::Parts::default();
    parts.path_and_query =
        Some(http::uri::PathAndQuery::from_maybe_shared(bytes::Bytes::from(path)).ok()?);
    http::Uri::from_parts(parts).ok()
}

/// Sends the handler's http response as ttrpc frames. One message followed at
/// once by OK trailers is a unary-style Response; anything else streams as
/// Data frames, closed by Data remote-closed (OK) or a Response (error).
/// Response headers go first in a Headers frame, trailers in a Trailers frame
/// just before the end (both brpc extensions, sent only when needed).
async fn respond(out: &mut Reply, response: http::Response<Body>) {
    let (parts, body) = response.into_parts();
    // Whether the body may end without trailers and the call still be OK.
    let ends_ok = match Status::from_header_map(&parts.headers) {
        Some(status) if status.code() != tonic::Code::Ok => {
            // Trailers-only: the headers are the status and its metadata.
            if out
                .trailers(metadata::to_key_values(&parts.headers))
                .await
                .is_ok()
            {
                out.status(status).await;
            }
            return;
        }
        // Trailers-only OK: the status is already given.
        Some(_) => true,
        // A plain http answer, such as an auth layer's 401.
        None if parts.status != http::StatusCode::OK => {
            out.status(status_from_http(parts.status)).await;
            return;
        }
        None => false,
    };
    let mut body = MessageReader::new(body, out.max_message_size());
    let mut ready = body.next_now();
    let headers = metadata::to_key_values(&parts.headers);
    // A Headers frame also tells a waiting caller that the handler has
    // answered, as HTTP/2 response headers do: when nothing else is ready,
    // or when the body fails before its first message (as over HTTP/2, the
    // call itself then succeeds and its stream ends with the error; a
    // handler's own error comes as a Trailers-Only answer, above).
    let fails_at_once = match &ready {
        Some(Err(_)) => true,
        Some(Ok(BodyEvent::Trailers(trailers))) => {
            !is_bare_ok(trailers) && status_from_trailers(trailers).code() != tonic::Code::Ok
        }
        _ => false,
    };
    if (!headers.is_empty() || ready.is_none() || fails_at_once)
        && out.headers(headers).await.is_err()
    {
        return;
    }
    let mut streaming = false;
    loop {
        let event = match ready.take() {
            Some(event) => event,
            None => body.next().await,
        };
        let message = match event {
            Ok(BodyEvent::Message(m)) => m,
            Ok(BodyEvent::Trailers(trailers)) => {
                out.end(
                    status_from_trailers(&trailers),
                    metadata::to_key_values(&trailers),
                )
                .await;
                return;
            }
            Ok(BodyEvent::End) if ends_ok => {
                out.end(Status::ok(""), Vec::new()).await;
                return;
            }
            Ok(BodyEvent::End) => {
                out.status(no_final_status()).await;
                return;
            }
            Err(status) => {
                out.status(status).await;
                return;
            }
        };
        if streaming {
            if out.message(message).await.is_err() {
                return;
            }
            continue;
        }
        // The first message: is the handler done already (unary, client-streaming)?
        match body.next_now() {
            Some(Ok(BodyEvent::Trailers(trailers))) => {
                // How tonic ends an OK unary reply: no `Status` to build.
                if is_bare_ok(&trailers) {
                    out.ok_response(message).await;
                    return;
                }
                let status = status_from_trailers(&trailers);
                if status.code() == tonic::Code::Ok {
                    if out
                        .trailers(metadata::to_key_values(&trailers))
                        .await
                        .is_ok()
                    {
                        out.response(status, message).await;
                    }
                } else if out.message(message).await.is_ok() {
                    out.end(status, metadata::to_key_values(&trailers)).await;
                }
                return;
            }
            Some(Ok(BodyEvent::End)) => {
                if ends_ok {
                    out.ok_response(message).await;
                } else if out.message(message).await.is_ok() {
                    out.status(no_final_status()).await;
                }
                return;
            }
            Some(Ok(BodyEvent::Message(second))) => {
                streaming = true;
                if out.message(message).await.is_err() || out.message(second).await.is_err() {
                    return;
                }
            }
            Some(Err(status)) => {
                if out.message(message).await.is_ok() {
                    out.status(status).await;
                }
                return;
            }
            None => {
                streaming = true;
                if out.message(message).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::path_uri;

    #[test]
    fn a_path_uri_is_the_uri_parsed_from_the_same_path() {
        for (service, method) in [
            ("test.echo.v1.Echo", "Unary"),
            ("a", "b"),
            ("svc", "m?q=1"),
            ("spaced name", "m"),
            ("svc", "m\u{e9}"),
        ] {
            let parsed = http::Uri::try_from(format!("/{service}/{method}")).ok();
            assert_eq!(path_uri(service, method), parsed, "{service:?} {method:?}");
        }
        let uri = path_uri("test.echo.v1.Echo", "Unary").unwrap();
        assert_eq!(uri.path(), "/test.echo.v1.Echo/Unary");
        assert!(uri.scheme().is_none() && uri.authority().is_none());
    }
}
