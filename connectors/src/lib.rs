//! Moving payloads between stages.
//!
//! Owns: the [`Connector`] trait and its transports. In-process handover shares the payload's
//! `Arc`'d buffer (no copy). Shared memory and TCP transports move bytes between processes and
//! hosts; they arrive with multi-process execution and are refused by name until then.
//!
//! Must not know: the stage graph, engines, HTTP.

use omnistage_stages::deploy::ConnectorKind;
use omnistage_stages::Payload;

/// Why a connector could not be built or could not move a payload.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConnectorError {
    #[error("connector `{0}` is not available in this build yet: only `inproc` edges can run; use connector = \"inproc\"")]
    Unavailable(&'static str),
}

/// Moves one payload across an edge and returns it as the consumer sees it.
pub trait Connector: Send + Sync {
    fn kind(&self) -> ConnectorKind;

    /// Hands `payload` to the consumer side.
    fn deliver(&self, payload: Payload) -> Result<Payload, ConnectorError>;
}

/// Same-process handover: the consumer gets the producer's buffer itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct InprocConnector;

impl Connector for InprocConnector {
    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Inproc
    }

    fn deliver(&self, payload: Payload) -> Result<Payload, ConnectorError> {
        Ok(payload)
    }
}

/// Builds the connector an edge asks for.
pub fn connector_for(kind: ConnectorKind) -> Result<Box<dyn Connector>, ConnectorError> {
    match kind {
        ConnectorKind::Inproc => Ok(Box::new(InprocConnector)),
        ConnectorKind::Shm => Err(ConnectorError::Unavailable("shm")),
        ConnectorKind::Tcp => Err(ConnectorError::Unavailable("tcp")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use omnistage_stages::HiddenStates;

    #[test]
    fn inproc_handover_shares_the_buffer() {
        let hidden = HiddenStates::new(vec![1.0; 4096], 64);
        let delivered = connector_for(ConnectorKind::Inproc)
            .unwrap()
            .deliver(Payload::Hidden(hidden.clone()))
            .unwrap();
        match delivered {
            Payload::Hidden(h) => assert!(std::sync::Arc::ptr_eq(&h.data, &hidden.data)),
            other => panic!("expected hidden states, got {other:?}"),
        }
    }

    #[test]
    fn unbuilt_transports_are_refused_by_name() {
        let err = connector_for(ConnectorKind::Shm).err().unwrap();
        assert!(err.to_string().contains("shm"));
        assert!(connector_for(ConnectorKind::Tcp).is_err());
    }
}
