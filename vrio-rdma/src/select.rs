//! Back-end selection.

use crate::api::{Backend, Domain, FabricError};

/// Opens a domain on `backend`. `device` names the RDMA device for `verbs`
/// (the first one if `None`); `soft` and `shm` ignore it.
pub fn open(backend: Backend, device: Option<&str>) -> Result<Box<dyn Domain>, FabricError> {
    match backend {
        Backend::Soft => crate::soft::open_domain(),
        Backend::Shm => crate::shm::open_domain(),
        Backend::Verbs => open_verbs(device),
    }
}

#[cfg(feature = "verbs")]
fn open_verbs(device: Option<&str>) -> Result<Box<dyn Domain>, FabricError> {
    crate::verbs::open_domain(device)
}

#[cfg(not(feature = "verbs"))]
fn open_verbs(_device: Option<&str>) -> Result<Box<dyn Domain>, FabricError> {
    Err(FabricError::NoDevice(
        "vrio-rdma was built without the `verbs` feature".into(),
    ))
}

/// Real verbs when there is an RDMA device, else `soft`. Returns the
/// back-end it picked.
pub fn open_auto() -> Result<(Backend, Box<dyn Domain>), FabricError> {
    match open(Backend::Verbs, None) {
        Ok(d) => Ok((Backend::Verbs, d)),
        Err(FabricError::NoDevice(why)) => {
            tracing::info!("no RDMA device ({why}); using the soft fabric");
            Ok((Backend::Soft, open(Backend::Soft, None)?))
        }
        Err(e) => Err(e),
    }
}

impl std::str::FromStr for crate::api::Backend {
    type Err = FabricError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "soft" => Ok(Backend::Soft),
            "verbs" => Ok(Backend::Verbs),
            "shm" => Ok(Backend::Shm),
            other => Err(FabricError::InvalidRequest(format!(
                "unknown back-end {other:?} (soft, shm or verbs)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_opens_and_names_parse() {
        assert!(open(Backend::Soft, None).is_ok());
        assert_eq!("soft".parse::<Backend>().ok(), Some(Backend::Soft));
        assert_eq!("verbs".parse::<Backend>().ok(), Some(Backend::Verbs));
        assert_eq!("shm".parse::<Backend>().ok(), Some(Backend::Shm));
        assert!(open(Backend::Shm, None).is_ok());
        assert!("ib".parse::<Backend>().is_err());
    }

    #[test]
    fn auto_falls_back_to_soft_without_a_device() {
        // This host has no RDMA device (see docs/fabric.md); inside the rxe
        // guest the verbs branch is taken instead.
        let (backend, _d) = open_auto().unwrap();
        let has_device = std::path::Path::new("/sys/class/infiniband")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some());
        if cfg!(feature = "verbs") && has_device {
            assert_eq!(backend, Backend::Verbs);
        } else {
            assert_eq!(backend, Backend::Soft);
        }
    }
}
