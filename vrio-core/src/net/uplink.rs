//! The switch's way out of the server: a TAP device (`tap.rs`), a capture
//! in tests. An uplink port has no fixed MAC (anything behind it may send).

use std::collections::VecDeque;
use std::sync::Mutex;

/// Why an uplink refused a frame (the switch counts it as a drop).
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// No room now (a full capture, a TAP that would block).
    #[error("uplink is full")]
    Full,
    /// Writing the frame failed.
    #[error("uplink i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Where frames leaving the switch go. `transmit` must not block: a full
/// uplink refuses the frame and the switch counts the drop.
pub trait Uplink: Send + Sync {
    /// Sends one whole frame, or refuses it.
    fn transmit(&self, frame: &[u8]) -> Result<(), UplinkError>;
}

/// A bounded in-memory uplink: keeps what it was sent, for tests.
#[derive(Debug)]
pub struct CaptureUplink {
    frames: Mutex<VecDeque<Vec<u8>>>,
    capacity: usize,
}

impl CaptureUplink {
    /// A capture that holds at most `capacity` frames.
    pub fn new(capacity: usize) -> Self {
        Self {
            frames: Mutex::new(VecDeque::new()),
            capacity,
        }
    }
    /// Takes everything captured so far.
    pub fn take(&self) -> Vec<Vec<u8>> {
        self.frames
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect()
    }
}

impl Uplink for CaptureUplink {
    fn transmit(&self, frame: &[u8]) -> Result<(), UplinkError> {
        let mut q = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= self.capacity {
            return Err(UplinkError::Full);
        }
        q.push_back(frame.to_vec());
        Ok(())
    }
}
