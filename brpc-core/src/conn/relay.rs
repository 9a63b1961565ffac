//! A call served on one connection carried on as a call to another peer:
//! the messages pass through as the bytes they are (never decoded), the
//! Request's metadata and the time left go along, and the answer (headers,
//! messages, trailers, status) comes back frame by frame. Dropping the
//! served call (its caller cancelled, its deadline passed, its connection
//! closed) drops the onward call, which cancels it on the far side.
//!
//! How a server hands an operator's call to an agent (the admin service),
//! and the building block of node-to-node forwarding.

use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;
use tonic::Status;

use super::incoming::{Incoming, Input, Reply};
use super::outgoing::{RequestBody, ResponseEvent};
use super::peer::Peer;
use crate::wire::KeyValue;

type MessageBody = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

/// Carries `call` on to `to` as the same service and method with
/// `metadata` (the caller picks which of the call's own entries go on) and
/// the call's remaining time as its deadline, and answers the call through
/// `reply` with whatever `to` answers. Returns the status the call ended
/// with.
///
/// A streamed request is forwarded message by message as it arrives; a
/// streamed answer is forwarded the same way. The relayed call's own status
/// (code, message, details) reaches the caller unchanged; a failure to reach
/// `to` at all is `UNAVAILABLE`.
pub async fn relay(
    call: Incoming,
    to: &Peer,
    metadata: Vec<KeyValue>,
    reply: &mut Reply,
) -> Status {
    let Incoming {
        service,
        method,
        timeout,
        input,
        ..
    } = call;
    let deadline = timeout.map(|left| tokio::time::Instant::now() + left);
    let body: RequestBody<MessageBody> = match input {
        Input::Single(message) => RequestBody::Single(message),
        Input::Stream(stream) => RequestBody::Stream(Box::pin(futures_util::stream::unfold(
            stream,
            |mut stream| async move { stream.next().await.map(|item| (item, stream)) },
        ))),
    };
    let mut onward = match to
        .start_call(&service, &method, metadata, deadline, body)
        .await
    {
        Ok(onward) => onward,
        Err(status) => {
            reply.status(status.clone()).await;
            return status;
        }
    };
    loop {
        match onward.next_event().await {
            ResponseEvent::Headers(entries) => {
                if reply.headers(entries).await.is_err() {
                    return Status::cancelled("the relayed call's caller went away");
                }
            }
            ResponseEvent::Message(message) => {
                if reply.message(message).await.is_err() {
                    return Status::cancelled("the relayed call's caller went away");
                }
            }
            ResponseEvent::End {
                status,
                message,
                trailers,
            } => {
                let status = super::end_status(status);
                match message {
                    Some(message) if status.code() == tonic::Code::Ok => {
                        if reply.trailers(trailers).await.is_ok() {
                            reply.response(status.clone(), message).await;
                        }
                    }
                    _ => reply.end(status.clone(), trailers).await,
                }
                return status;
            }
        }
    }
}
