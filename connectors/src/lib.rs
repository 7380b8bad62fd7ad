//! Moving payloads between stages.
//!
//! Owns: the [`Connector`] trait and its transports. In-process handover shares the payload's
//! `Arc`'d buffer (no copy). Shared memory and TCP transports move bytes between processes and
//! hosts: `wire` encodes payloads to bytes, `shm` moves them through a shared-memory ring between
//! processes (also usable in one process as [`shm::ShmConnector`]), and `tcp` is an authenticated,
//! framed, bounded link between hosts. Worker processes that use them come with multi-process
//! execution; until then a `tcp` edge is refused by name.
//!
//! Must not know: the stage graph, engines, HTTP.

pub mod discovery;
pub mod remote;
pub mod shm;
pub mod tcp;
pub mod wire;

use omnistage_stages::deploy::ConnectorKind;
use omnistage_stages::Payload;

/// Why a connector could not be built or could not move a payload.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConnectorError {
    #[error("connector `{0}` is not available in this build yet: only `inproc` edges can run; use connector = \"inproc\"")]
    Unavailable(&'static str),
    #[error("connector `{connector}` failed: {reason}")]
    Transport {
        connector: &'static str,
        reason: String,
    },
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
        ConnectorKind::Shm => Ok(Box::new(
            shm::ShmConnector::new(shm::DEFAULT_CAPACITY).map_err(shm::to_connector_error)?,
        )),
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
        let err = connector_for(ConnectorKind::Tcp).err().unwrap();
        assert!(err.to_string().contains("tcp"));
    }

    #[test]
    fn shm_connector_delivers_a_copy() {
        let hidden = HiddenStates::new((0..4096).map(|i| i as f32).collect(), 64);
        let shm = connector_for(ConnectorKind::Shm).unwrap();
        assert_eq!(shm.kind(), ConnectorKind::Shm);
        for _ in 0..3 {
            match shm.deliver(Payload::Hidden(hidden.clone())).unwrap() {
                Payload::Hidden(h) => {
                    assert_eq!(h, hidden);
                    assert!(!std::sync::Arc::ptr_eq(&h.data, &hidden.data));
                }
                other => panic!("expected hidden states, got {other:?}"),
            }
        }
    }
}
