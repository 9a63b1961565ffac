//! [`ConnectionError`]: how a connection ended, as one opaque value with
//! predicates (hyper's style), whatever carried it.

use std::fmt;

use super::Side;
use crate::wire::codes;

/// How a connection ended. Opaque: ask it with [`code`](Self::code) and the
/// `is_*` predicates; print it for a person (it names who did what from the
/// point of view of the side that observed it).
#[derive(Debug, Clone)]
pub struct ConnectionError {
    kind: Kind,
    /// The side that observed the end.
    observer: Side,
}

#[derive(Debug, Clone)]
enum Kind {
    /// Closed by an application with a brpc close code (see
    /// [`codes`](crate::wire::codes)), by this side (`local`) or the other.
    Closed {
        code: u32,
        reason: String,
        local: bool,
    },
    /// Nothing was heard from the other side for the idle timeout.
    TimedOut,
    /// The other side answered with a stateless reset: it forgot the
    /// connection (it restarted).
    Reset,
    /// A QUIC or TLS failure.
    Transport(String),
    /// The byte stream carrying the connection ended.
    StreamEnded(String),
}

impl ConnectionError {
    /// From quinn's view of a QUIC connection's end, seen by `observer`;
    /// `local` is this side's own close (code and reason), if it closed it.
    pub(crate) fn from_quinn(
        error: &quinn::ConnectionError,
        observer: Side,
        local: Option<(u32, String)>,
    ) -> Self {
        use quinn::ConnectionError as E;
        let kind = match (error, local) {
            (E::LocallyClosed, Some((code, reason))) => Kind::Closed {
                code,
                reason,
                local: true,
            },
            (E::LocallyClosed, None) => Kind::Closed {
                code: codes::CONN_NORMAL,
                reason: String::new(),
                local: true,
            },
            (E::ApplicationClosed(close), _) => Kind::Closed {
                code: u32::try_from(close.error_code.into_inner()).unwrap_or(u32::MAX),
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
                local: false,
            },
            (E::TimedOut, _) => Kind::TimedOut,
            (E::Reset, _) => Kind::Reset,
            (other, _) => Kind::Transport(other.to_string()),
        };
        ConnectionError { kind, observer }
    }

    /// How a client's QUIC connection ended while it was being admitted
    /// (before there is a [`Peer`](crate::Peer) to ask).
    #[doc(hidden)]
    pub fn from_quinn_closed(error: &quinn::ConnectionError) -> Self {
        Self::from_quinn(error, Side::Dialer, None)
    }

    /// A byte-stream connection's end, seen by `observer`.
    pub(crate) fn from_stream(
        reason: String,
        observer: Side,
        local: Option<(u32, String)>,
    ) -> Self {
        let kind = match local {
            Some((code, reason)) => Kind::Closed {
                code,
                reason,
                local: true,
            },
            None => Kind::StreamEnded(reason),
        };
        ConnectionError { kind, observer }
    }

    /// The application close code (see [`codes`](crate::wire::codes)), if
    /// the connection was closed with one.
    pub fn code(&self) -> Option<u32> {
        match &self.kind {
            Kind::Closed { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The reason text given with a close code (empty if none was given).
    pub fn reason(&self) -> Option<&str> {
        match &self.kind {
            Kind::Closed { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// Whether the connection was closed as going away (a server shutting
    /// down: at the end of a graceful shutdown, or closed at once):
    /// reconnect later or elsewhere.
    pub fn is_going_away(&self) -> bool {
        self.code() == Some(codes::CONN_GOING_AWAY)
    }

    /// Whether the server refused the client (its authorization said no):
    /// reconnecting will not help.
    pub fn is_unauthorized(&self) -> bool {
        self.code() == Some(codes::CONN_UNAUTHORIZED)
    }

    /// Whether nothing was heard from the other side for the idle timeout
    /// (it vanished, or the network between is down).
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, Kind::TimedOut)
    }

    /// Whether the other side forgot the connection (a stateless reset: it
    /// restarted).
    pub fn is_reset(&self) -> bool {
        matches!(self.kind, Kind::Reset)
    }

    /// Whether this side closed the connection.
    pub fn is_local(&self) -> bool {
        matches!(self.kind, Kind::Closed { local: true, .. })
    }

    fn this_side(&self) -> &'static str {
        match self.observer {
            Side::Acceptor => "the server",
            Side::Dialer => "the client",
        }
    }

    fn other_side(&self) -> &'static str {
        match self.observer {
            Side::Acceptor => "the client",
            Side::Dialer => "the server",
        }
    }
}

impl fmt::Display for ConnectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Closed {
                code,
                reason,
                local,
            } => {
                let who = if *local {
                    self.this_side()
                } else {
                    self.other_side()
                };
                let meaning = codes::connection_code_meaning(*code);
                write!(f, "{who} closed the connection ({meaning}, code {code:#x})")?;
                if !reason.is_empty() {
                    write!(f, ": {reason}")?;
                }
                Ok(())
            }
            Kind::TimedOut => write!(
                f,
                "nothing heard from {} for the idle timeout: it vanished, or the network \
                 between is down",
                self.other_side()
            ),
            Kind::Reset => write!(
                f,
                "{} forgot the connection (stateless reset): it restarted",
                self.other_side()
            ),
            Kind::Transport(e) => write!(f, "the connection failed: {e}"),
            Kind::StreamEnded(e) => write!(f, "the connection ended: {e}"),
        }
    }
}

impl std::error::Error for ConnectionError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicates_and_words_follow_the_close() {
        let going_away = ConnectionError::from_quinn(
            &quinn::ConnectionError::LocallyClosed,
            Side::Acceptor,
            Some((codes::CONN_GOING_AWAY, "server shutting down".into())),
        );
        assert!(going_away.is_going_away() && going_away.is_local());
        assert_eq!(
            going_away.to_string(),
            "the server closed the connection (going away, code 0x1): server shutting down"
        );
        let timed_out =
            ConnectionError::from_quinn(&quinn::ConnectionError::TimedOut, Side::Dialer, None);
        assert!(timed_out.is_timeout() && !timed_out.is_local());
        assert_eq!(timed_out.code(), None);
        assert!(
            timed_out
                .to_string()
                .contains("nothing heard from the server")
        );
        let ended = ConnectionError::from_stream("peer closed".into(), Side::Acceptor, None);
        assert!(!ended.is_local() && ended.code().is_none());
        assert_eq!(ended.to_string(), "the connection ended: peer closed");
    }
}
