//! [`ShmConnector`]: the [`Connector`] trait over a shared-memory channel within one process.

use super::{channel, ShmError, ShmReceiver, ShmSender};
use crate::{Connector, ConnectorError};
use omnistage_stages::deploy::ConnectorKind;
use omnistage_stages::Payload;
use std::sync::Mutex;

/// Ring size [`crate::connector_for`] gives a shm edge. Pages are only committed as the ring is
/// written, and an idle ring restarts at offset 0, so a small payload touches little of it.
pub const DEFAULT_CAPACITY: usize = 256 << 20;

/// Delivers a payload through shared memory: encode → write into the ring → read → decode. The
/// consumer gets its own copy (no shared `Arc`), exactly what a stage in another process would see.
#[derive(Debug)]
pub struct ShmConnector {
    ends: Mutex<(ShmSender, ShmReceiver)>,
}

impl ShmConnector {
    /// A connector with a ring of `capacity` bytes.
    pub fn new(capacity: usize) -> Result<Self, ShmError> {
        Ok(Self {
            ends: Mutex::new(channel(capacity)?),
        })
    }

    pub fn capacity(&self) -> usize {
        self.ends.lock().map_or(0, |e| e.0.capacity())
    }
}

pub(crate) fn to_connector_error(e: ShmError) -> ConnectorError {
    ConnectorError::Transport {
        connector: "shm",
        reason: e.to_string(),
    }
}

impl Connector for ShmConnector {
    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Shm
    }

    fn deliver(&self, payload: Payload) -> Result<Payload, ConnectorError> {
        // A poisoned lock only means another deliver panicked mid-way; the ring state is still
        // consistent at message granularity, so keep going.
        let mut ends = self.ends.lock().unwrap_or_else(|p| p.into_inner());
        let (tx, rx) = &mut *ends;
        tx.send(&payload).map_err(to_connector_error)?;
        rx.recv().map_err(to_connector_error)
    }
}
