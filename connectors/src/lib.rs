//! Moving payloads between stages.
//!
//! Owns: the [`Connector`] trait and its transports. In-process handover shares the payload's
//! `Arc`'d buffer (no copy). Shared memory and TCP transports move bytes between processes and
//! hosts: `wire` encodes payloads to bytes, `shm` moves them through a shared-memory ring between
//! processes (also usable in one process as [`shm::ShmConnector`]), and `tcp` is an authenticated,
//! framed, bounded link between hosts. Payloads for a stage in a worker process cross in that
//! worker's link to the gateway (shared memory for a child, TCP for a remote worker), so at the
//! gateway a `tcp` edge — one whose end is `remote = true`, as validation requires — is a move.
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
        ConnectorKind::Tcp => Ok(Box::new(WorkerLinkConnector)),
    }
}

/// A `tcp` edge at the gateway: its remote end's worker link carries the bytes (authenticated
/// TCP frames), so handing the payload to that link is a move.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerLinkConnector;

impl Connector for WorkerLinkConnector {
    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Tcp
    }

    fn deliver(&self, payload: Payload) -> Result<Payload, ConnectorError> {
        Ok(payload)
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
    fn a_tcp_edge_hands_the_payload_to_its_worker_link() {
        let hidden = HiddenStates::new(vec![2.0; 64], 8);
        let tcp = connector_for(ConnectorKind::Tcp).unwrap();
        assert_eq!(tcp.kind(), ConnectorKind::Tcp);
        match tcp.deliver(Payload::Hidden(hidden.clone())).unwrap() {
            Payload::Hidden(h) => assert!(std::sync::Arc::ptr_eq(&h.data, &hidden.data)),
            other => panic!("expected hidden states, got {other:?}"),
        }
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
