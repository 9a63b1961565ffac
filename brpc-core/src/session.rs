//! The session handshake: the dialer's first call is `brpc.v1.Session/Hello`
//! (name, labels, protocol version); the answer carries the connection id.
//!
//! Both halves live here so the wire logic exists once; the server decides ids
//! and time limits, the client what to announce.

use bytes::Bytes;
use prost::Message;
use quinn::{Connection, SendStream};
use tonic::Status;

use crate::conn::{ConnectionId, FrameReader, write_frame};
use crate::wire::{
    self, CallState, Flags, FrameType, HelloRequest, HelloResponse, Inbound, Request, Response,
};

/// Proto service name of the handshake call.
pub const SERVICE: &str = "brpc.v1.Session";
/// Method name of the handshake call.
pub const METHOD: &str = "Hello";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Default largest Hello frame a server accepts.
pub const DEFAULT_MAX_HELLO_SIZE: usize = 64 * 1024;

/// Dialer: sends Hello on the connection's first stream and returns the answer.
///
/// # Errors
/// The status the server answered with, or `UNAVAILABLE` if the connection failed.
pub async fn send_hello(
    connection: &Connection,
    hello: HelloRequest,
    max_message_size: usize,
) -> Result<HelloResponse, Status> {
    let lost = |e: &dyn std::fmt::Display| {
        Status::unavailable(format!("connection lost during Hello: {e}"))
    };
    let (mut send, recv) = connection.open_bi().await.map_err(|e| lost(&e))?;
    let stream_id = wire::stream_id(send.id().index(), true);
    let request = Request {
        service: SERVICE.into(),
        method: METHOD.into(),
        payload: hello.encode_to_vec().into(),
        ..Default::default()
    };
    write_frame(
        &mut send,
        stream_id,
        FrameType::Request,
        Flags::EMPTY,
        request.encode_to_vec().into(),
    )
    .await
    .map_err(|e| lost(&e))?;
    let _ = send.finish();
    let mut reader = FrameReader::new(recv, max_message_size);
    let mut call = CallState::caller(stream_id);
    loop {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return Err(Status::internal("server ended Hello without an answer")),
            Err(e) => return Err(e.to_status()),
        };
        match call.recv(frame)? {
            Inbound::Finished {
                message: Some(payload),
                ..
            } => {
                return HelloResponse::decode(payload)
                    .map_err(|e| Status::internal(format!("undecodable Hello answer: {e}")));
            }
            Inbound::Finished { status, .. } => return Err(status),
            Inbound::Ignored => continue,
            _ => return Err(Status::internal("server answered Hello with a stream")),
        }
    }
}

/// Acceptor: a received Hello waiting for its answer.
#[derive(Debug)]
pub struct HelloCall {
    /// What the dialer announced.
    pub request: HelloRequest,
    send: SendStream,
    stream_id: u32,
}

/// Acceptor: reads the connection's first call, which must be Hello.
///
/// # Errors
/// The status the dialer was answered with (already sent when possible): any
/// other first call, an undecodable or oversized Hello, or a lost connection.
pub async fn receive_hello(
    connection: &Connection,
    max_hello_size: usize,
) -> Result<HelloCall, Status> {
    let (mut send, recv) = connection
        .accept_bi()
        .await
        .map_err(|e| Status::unavailable(format!("connection lost before Hello: {e}")))?;
    let id = recv.id();
    let stream_id = wire::stream_id(id.index(), id.initiator() == quinn::Side::Client);
    let mut reader = FrameReader::new(recv, max_hello_size);
    let mut call = CallState::callee(stream_id);
    let outcome = loop {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => break Err(Status::invalid_argument("stream ended before Hello")),
            Err(e) => break Err(e.to_status()),
        };
        match call.recv(frame) {
            Ok(Inbound::Open {
                request,
                first_message,
                ..
            }) => {
                if request.service != SERVICE || request.method != METHOD {
                    break Err(Status::failed_precondition(format!(
                        "the first call on a brpc connection must be {SERVICE}/{METHOD}, got {}/{}",
                        request.service, request.method
                    )));
                }
                break HelloRequest::decode(first_message.unwrap_or_default())
                    .map_err(|e| Status::invalid_argument(format!("undecodable Hello: {e}")));
            }
            Ok(_) => continue,
            Err(status) => break Err(status),
        }
    };
    match outcome {
        Ok(request) => Ok(HelloCall {
            request,
            send,
            stream_id,
        }),
        Err(status) => {
            reader.stop(crate::conn::codes::STREAM_PROTOCOL_ERROR);
            if respond(&mut send, stream_id, &status, Bytes::new())
                .await
                .is_ok()
            {
                delivered(&send).await;
            }
            Err(status)
        }
    }
}

async fn respond(
    send: &mut SendStream,
    stream_id: u32,
    status: &Status,
    payload: Bytes,
) -> Result<(), quinn::WriteError> {
    let response = Response {
        status: Some(crate::status::to_wire(status)),
        payload,
    };
    write_frame(
        send,
        stream_id,
        FrameType::Response,
        Flags::EMPTY,
        response.encode_to_vec().into(),
    )
    .await?;
    let _ = send.finish();
    Ok(())
}

/// Waits up to a second for the peer to acknowledge everything sent on `send`.
async fn delivered(send: &SendStream) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send.stopped()).await;
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
        respond(
            &mut self.send,
            self.stream_id,
            &Status::ok(""),
            answer.encode_to_vec().into(),
        )
        .await
        .map_err(|e| Status::unavailable(format!("cannot answer Hello: {e}")))
    }

    /// Refuses the session with `status`.
    /// Refuses the session with `status`, waiting (briefly) until the dialer
    /// has the answer so that closing the connection next does not discard it.
    pub async fn reject(mut self, status: Status) {
        if respond(&mut self.send, self.stream_id, &status, Bytes::new())
            .await
            .is_ok()
        {
            delivered(&self.send).await;
        }
    }
}
