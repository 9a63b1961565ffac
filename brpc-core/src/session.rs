//! The session handshake: the dialer's first call is `brpc.v1.Session/Hello`
//! (name, labels, protocol version); the answer carries the connection id.
//!
//! Both halves live here so the wire logic exists once; the server decides ids
//! and time limits, the client what to announce.

use bytes::Bytes;
use futures_util::future::Either;
use prost::Message;
use tonic::Status;

use crate::conn::{
    CallLimits, ConnectionId, Handler, Incoming, Input, Labels, MemoryBudget, Peer, PeerInfo,
    Reply, RequestBody, ResponseEvent, Side, accept_one,
};
use crate::wire::{self, HelloRequest, HelloResponse};

/// Proto service name of the handshake call.
pub const SERVICE: &str = wire::SESSION_SERVICE;
/// Method name of the handshake call.
pub const METHOD: &str = "Hello";
/// Method name of the going-away notice either side may send.
pub const METHOD_GOAWAY: &str = "GoAway";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Whether an acceptor serves a dialer that says Hello with `version`:
/// `FAILED_PRECONDITION`, saying both versions, if not.
///
/// # Errors
/// The status to answer the Hello with.
pub fn check_version(version: u32) -> Result<(), Status> {
    if version == PROTOCOL_VERSION {
        return Ok(());
    }
    Err(Status::failed_precondition(format!(
        "unsupported brpc protocol version {version}; this server speaks {PROTOCOL_VERSION}"
    )))
}

/// Default largest Hello frame a server accepts.
pub const DEFAULT_MAX_HELLO_SIZE: usize = 16 * 1024;

/// A handle on a connection for its Hello call alone, before Hello has
/// established who is at the other end: its id is 0, its name and labels
/// empty. Once Hello is done, the handle to keep is made with what it
/// established. Frames it receives are capped at `limits.max_message_size`
/// (a server's `max_hello_size`) and charged to `total`. (They never widen
/// the connection's receive window: see [`Peer::new`].)
pub fn greeter(
    connection: quinn::Connection,
    side: Side,
    limits: CallLimits,
    total: MemoryBudget,
) -> Peer {
    let info = PeerInfo {
        connection_id: ConnectionId(0),
        name: String::new(),
        labels: Labels::new(),
        connected_at: std::time::SystemTime::now(),
        identity: None,
    };
    Peer::new(connection, side, info, limits, total, None)
}

/// Dialer: says Hello, the connection's first call, through `greeter` (see
/// [`greeter`]) and returns the answer.
///
/// # Errors
/// The status the server answered with, or `UNAVAILABLE` if the connection failed.
pub async fn send_hello(greeter: &Peer, hello: HelloRequest) -> Result<HelloResponse, Status> {
    let answer = session_call(greeter, METHOD, hello.encode_to_vec().into()).await?;
    HelloResponse::decode(answer)
        .map_err(|e| Status::internal(format!("undecodable Hello answer: {e}")))
}

/// One unary call to the peer's built-in session service, through the
/// engine's calling half like any other call.
async fn session_call(peer: &Peer, method: &str, payload: Bytes) -> Result<Bytes, Status> {
    let body = RequestBody::<futures_util::stream::Empty<Result<Bytes, Status>>>::Single(payload);
    let mut call = peer
        .start_call(SERVICE, method, Vec::new(), None, body)
        .await?;
    loop {
        match call.next_event().await {
            ResponseEvent::End {
                status: Ok(()),
                message,
                ..
            } => return Ok(message.unwrap_or_default()),
            ResponseEvent::End {
                status: Err(status),
                ..
            } => return Err(status),
            ResponseEvent::Headers(_) => {}
            ResponseEvent::Message(_) => {
                return Err(Status::internal(format!(
                    "the peer answered {SERVICE}/{method} with a stream"
                )));
            }
        }
    }
}

/// Tells the peer this side is going away: it should open no new calls on
/// this connection (they would fail with `UNAVAILABLE`) and, if it is a
/// client, reconnect after its backoff. Calls in flight continue.
///
/// # Errors
/// `UNAVAILABLE` if the connection is gone, or the peer's answer.
pub async fn send_goaway(peer: &Peer, reason: &str) -> Result<(), Status> {
    let payload = GoAway {
        reason: reason.into(),
    }
    .encode_to_vec();
    session_call(peer, METHOD_GOAWAY, payload.into())
        .await
        .map(|_| ())
}

/// Dialer over a byte stream: says Hello to find out whether the acceptor is
/// brpc. A plain ttrpc acceptor answers with an error.
pub(crate) async fn hello_bytestream(
    peer: &Peer,
    hello: HelloRequest,
) -> Result<HelloResponse, Status> {
    tokio::time::timeout(std::time::Duration::from_secs(10), send_hello(peer, hello))
        .await
        .map_err(|_| Status::deadline_exceeded("no answer to Hello"))?
}

/// A [`Handler`] that answers the built-in session service itself and hands
/// every other call to the handler it wraps.
#[derive(Clone, Debug)]
pub struct WithSession<H>(pub H);

impl<H: Handler> Handler for WithSession<H> {
    fn serve<'a>(
        &'a self,
        call: Incoming,
        reply: &'a mut Reply,
    ) -> impl std::future::Future<Output = ()> + Send + 'a {
        // Either future, not one wrapping the other: the wrapped handler's
        // future is large and is moved by value at every level.
        if call.service != SERVICE {
            return Either::Left(self.0.serve(call, reply));
        }
        // Boxed: rare (Hello, GoAway), and its future is large.
        Either::Right(Box::pin(async move {
            let payload = match call.input {
                Input::Single(payload) => payload,
                Input::Stream(_) => Bytes::new(),
            };
            let (status, payload) = handle_session_call(&call.peer, &call.method, payload);
            reply.response(status, payload).await;
        }))
    }

    fn task_per_call(&self) -> bool {
        self.0.task_per_call()
    }
}

/// Serves the peer's calls on its connection with `handler` (the
/// [`Router`](crate::Router) of the services this side hosts) until the
/// connection closes, answering the built-in session service (GoAway, and
/// Hello on byte streams) itself. Every handler still running when the
/// connection closes is dropped.
///
/// (Not an `async fn`: one would hold `peer` and `handler` beside the
/// future it awaits, in the task of every connection.)
pub fn serve<H: Handler>(peer: Peer, handler: H) -> impl Future<Output = ()> + Send + 'static {
    crate::conn::serve(peer, WithSession(handler))
}

/// The answer to a call on the built-in session service after the session
/// started: GoAway marks the peer as going away; Hello is answered once on a
/// byte stream (where it is how brpc peers recognise each other) and refused
/// otherwise; anything else is `UNIMPLEMENTED`.
fn handle_session_call(peer: &Peer, method: &str, payload: Bytes) -> (Status, Bytes) {
    match method {
        METHOD_GOAWAY => {
            let reason = GoAway::decode(payload)
                .map(|g| g.reason)
                .unwrap_or_default();
            tracing::debug!(peer = %peer.connection_id(), %reason, "peer is going away");
            let reason = if reason.is_empty() {
                "no reason given".to_owned()
            } else {
                reason
            };
            peer.mark_going_away(reason);
            (Status::ok(""), Bytes::new())
        }
        METHOD => match peer.quic_connection() {
            None if peer.side() == Side::Acceptor && !peer.remote_is_brpc() => {
                let checked = HelloRequest::decode(payload)
                    .map_err(|e| Status::invalid_argument(format!("bad Hello: {e}")))
                    .and_then(|hello| check_version(hello.protocol_version));
                if let Err(status) = checked {
                    return (status, Bytes::new());
                }
                peer.set_remote_is_brpc();
                let answer = HelloResponse {
                    connection_id: peer.connection_id().0,
                    protocol_version: PROTOCOL_VERSION,
                };
                (Status::ok(""), answer.encode_to_vec().into())
            }
            _ => (
                Status::failed_precondition("Hello was already exchanged on this connection"),
                Bytes::new(),
            ),
        },
        other => (
            Status::unimplemented(format!("method {other}")),
            Bytes::new(),
        ),
    }
}

/// `brpc.v1.GoAway`: the payload of `brpc.v1.Session/GoAway`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GoAway {
    /// Why the sender is going away, for logs.
    #[prost(string, tag = "1")]
    pub reason: String,
}

/// Acceptor: a received Hello waiting for its answer.
#[derive(Debug)]
pub struct HelloCall {
    /// What the dialer announced.
    pub request: HelloRequest,
    reply: Reply,
}

/// Acceptor: reads the connection's first call, which must be Hello,
/// through `greeter` (see [`greeter`]) and the engine's serving half like
/// any other call.
///
/// # Errors
/// The status the dialer was answered with (already sent when possible): any
/// other first call, an undecodable or oversized Hello, or a lost connection.
pub async fn receive_hello(greeter: &Peer) -> Result<HelloCall, Status> {
    let (call, mut reply) = accept_one(greeter).await.map_err(|status| {
        status.unwrap_or_else(|| Status::unavailable("connection lost before Hello"))
    })?;
    let request = if call.service != SERVICE || call.method != METHOD {
        Err(Status::failed_precondition(format!(
            "the first call on a brpc connection must be {SERVICE}/{METHOD}, got {}/{}",
            call.service, call.method
        )))
    } else {
        match call.input {
            Input::Single(payload) => HelloRequest::decode(payload)
                .map_err(|e| Status::invalid_argument(format!("undecodable Hello: {e}"))),
            Input::Stream(_) => Err(Status::invalid_argument(
                "Hello must be a unary call, not a stream",
            )),
        }
    };
    match request {
        Ok(request) => Ok(HelloCall { request, reply }),
        Err(status) => {
            reply.status(status.clone()).await;
            reply.delivered().await;
            Err(status)
        }
    }
}

impl HelloCall {
    /// Answers with the assigned connection id.
    ///
    /// # Errors
    /// `UNAVAILABLE` if the answer could not be sent.
    pub async fn accept(mut self, id: ConnectionId) -> Result<(), Status> {
        let answer = HelloResponse {
            connection_id: id.0,
            protocol_version: PROTOCOL_VERSION,
        };
        self.reply.ok_message(&answer).await;
        if self.reply.is_ended() {
            Ok(())
        } else {
            Err(Status::unavailable(
                "cannot answer Hello: the connection is gone",
            ))
        }
    }

    /// Refuses the session with `status`, waiting (briefly) until the dialer
    /// has the answer so that closing the connection next does not discard it.
    pub async fn reject(mut self, status: Status) {
        self.reply.status(status).await;
        self.reply.delivered().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Flags, Frame, FrameType, KeyValue, Request, RequestParts, Response};
    use bytes::BytesMut;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    fn encode(frame: Frame) -> Vec<u8> {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf).unwrap();
        buf.to_vec()
    }

    /// The byte examples of PROTOCOL.md §6.
    #[test]
    fn protocol_md_hello_bytes() {
        let hello = HelloRequest {
            protocol_version: PROTOCOL_VERSION,
            name: "agent-1".into(),
            labels: vec![KeyValue::new("region", "eu")],
        };
        let request = Request {
            service: SERVICE.into(),
            method: METHOD.into(),
            payload: hello.encode_to_vec().into(),
            ..Default::default()
        };
        // What the engine's calling half sends for it (see `send_hello`).
        let payload = hello.encode_to_vec();
        let sent = crate::wire::encode_request_parts(
            &RequestParts {
                service: SERVICE,
                method: METHOD,
                payload: &payload,
                timeout_nano: 0,
                metadata: &[],
            },
            crate::wire::DEFAULT_MAX_MESSAGE_SIZE,
        )
        .unwrap();
        assert_eq!(sent, request.encode_to_vec());
        let frame = Frame::new(
            1,
            FrameType::Request,
            Flags::EMPTY,
            request.encode_to_vec().into(),
        );
        assert_eq!(
            encode(frame),
            hex(
                "00 00 00 33 00 00 00 01 01 00 0a 0f 62 72 70 63 2e 76 31 2e 53 65 73 73 69 6f 6e \
                 12 05 48 65 6c 6c 6f 1a 19 08 01 12 07 61 67 65 6e 74 2d 31 1a 0c 0a 06 72 65 67 \
                 69 6f 6e 12 02 65 75"
            )
        );
        let answer = Response {
            status: Some(crate::wire::Status::default()),
            payload: HelloResponse {
                connection_id: 7,
                protocol_version: PROTOCOL_VERSION,
            }
            .encode_to_vec()
            .into(),
        };
        let frame = Frame::new(
            1,
            FrameType::Response,
            Flags::EMPTY,
            answer.encode_to_vec().into(),
        );
        assert_eq!(
            encode(frame),
            hex("00 00 00 08 00 00 00 01 02 00 0a 00 12 04 08 07 10 01")
        );
    }

    #[test]
    fn protocol_md_error_response_bytes() {
        let response = Response {
            status: Some(crate::status::to_wire(&Status::not_found("no such key"))),
            payload: Bytes::new(),
        };
        let frame = Frame::new(
            3,
            FrameType::Response,
            Flags::EMPTY,
            response.encode_to_vec().into(),
        );
        assert_eq!(
            encode(frame),
            hex("00 00 00 11 00 00 00 03 02 00 0a 0f 08 05 12 0b 6e 6f 20 73 75 63 68 20 6b 65 79")
        );
    }
}
