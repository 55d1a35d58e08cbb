//! The switch's uplink to a Linux TAP device: the I/O server as its guests'
//! gateway. Frames the switch sends to the uplink port are written to the
//! TAP; a pump thread reads what the host's stack (or a bridge the TAP is
//! enslaved to) sends and forwards it into the switch like any port's TX.
//!
//! The TAP carries plain Ethernet frames (`IFF_NO_PI`, no vnet header): no
//! offload is offered to the guests, so every frame is complete as it is.
//! The host side is the operator's: address, bridge, or moving the TAP to
//! another network namespace (its file descriptor keeps working there).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::port::Port;
use super::switch::Switch;
use super::uplink::{Uplink, UplinkError};

/// How often the pump looks at its stop flag while the TAP is quiet.
const POLL: Duration = Duration::from_millis(100);
/// Read buffer: larger than any frame a TAP hands out at a 64 KiB MTU, so
/// an oversized frame arrives whole and the switch counts it.
const READ_BUF: usize = 65_536 + 64;

/// Why a TAP could not be opened or joined to the switch.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, longer than 15 bytes or holds a NUL.
    #[error("TAP name {0:?} is empty, too long (15 bytes at most) or has a NUL")]
    BadName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun (needs the tun module): {0}")]
    Open(io::Error),
    /// TUNSETIFF failed (no CAP_NET_ADMIN, or the name is busy).
    #[error("cannot create TAP {name:?} (needs CAP_NET_ADMIN; a busy name is refused): {err}")]
    Create {
        /// The TAP's name.
        name: String,
        /// The ioctl's error.
        err: io::Error,
    },
    /// The pump thread did not spawn (the port was removed again).
    #[error("cannot start the TAP pump thread: {0}")]
    Thread(io::Error),
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates (or attaches to a persistent) TAP device `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let bad = || TapError::BadName(name.to_string());
        let cname = CString::new(name).map_err(|_| bad())?;
        let bytes = cname.as_bytes_with_nul();
        if bytes.len() < 2 || bytes.len() > libc::IFNAMSIZ {
            return Err(bad());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        // SAFETY: ifreq is plain old data: all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is and
        // which outlives the call; the fd is the tun device just opened.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if r < 0 {
            return Err(TapError::Create {
                name: name.to_string(),
                err: io::Error::last_os_error(),
            });
        }
        tracing::info!(tap = name, "TAP device open");
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits up to `timeout` for a frame to read.
    fn readable(&self, timeout: Duration) -> io::Result<bool> {
        let mut p = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one pollfd, valid for the call.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(r > 0 && p.revents & libc::POLLIN != 0)
    }
}

impl Uplink for Tap {
    fn transmit(&self, frame: &[u8]) -> Result<(), UplinkError> {
        // A TAP takes a frame per write, whole or not at all.
        match (&self.file).write(frame) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(UplinkError::Full),
            Err(e) => Err(UplinkError::Io(e)),
        }
    }
}

/// A TAP joined to a switch as its uplink port, with the pump thread that
/// forwards the TAP's frames into the switch. Dropping it removes the port
/// and stops the thread; the TAP goes away with its last descriptor unless
/// it was made persistent.
pub struct TapUplink {
    port: Arc<Port>,
    switch: Arc<Switch>,
    stop: Arc<AtomicBool>,
    pump: Option<JoinHandle<()>>,
}

impl TapUplink {
    /// Opens TAP `name` and joins it to `switch`.
    pub fn start(switch: &Arc<Switch>, name: &str) -> Result<Self, TapError> {
        let tap = Arc::new(Tap::open(name)?);
        let port = switch.add_uplink(&format!("tap:{name}"), tap.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let pump = {
            let (switch, port, stop) = (switch.clone(), port.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("vrio-tap-{name}"))
                .spawn(move || pump(&tap, &switch, &port, &stop))
        };
        let pump = match pump {
            Ok(p) => p,
            Err(e) => {
                switch.remove_port(port.id());
                return Err(TapError::Thread(e));
            }
        };
        Ok(Self {
            port,
            switch: switch.clone(),
            stop,
            pump: Some(pump),
        })
    }

    /// The uplink's switch port (its counters are the TAP's traffic).
    pub fn port(&self) -> &Arc<Port> {
        &self.port
    }
}

impl Drop for TapUplink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(p) = self.pump.take() {
            let _ = p.join();
        }
        self.switch.remove_port(self.port.id());
    }
}

/// Reads frames off the TAP until `stop`; each goes through the switch's
/// checks like a guest's (length, group source), then is switched.
fn pump(tap: &Tap, switch: &Switch, port: &Port, stop: &AtomicBool) {
    let mut buf = vec![0u8; READ_BUF];
    while !stop.load(Ordering::Acquire) {
        match tap.readable(POLL) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                tracing::error!(tap = tap.name(), error = %e, "cannot poll the TAP; the uplink stops");
                return;
            }
        }
        // Drain what is there before polling again.
        loop {
            match (&tap.file).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let _ = switch.forward(port, buf[..n].to_vec());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(tap = tap.name(), error = %e, "cannot read the TAP; the uplink stops");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for n in ["", "a-name-of-sixteen", "nul\0inside"] {
            assert!(
                matches!(Tap::open(n), Err(TapError::BadName(_))),
                "{n:?} accepted"
            );
        }
    }
}
