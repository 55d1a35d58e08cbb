//! `ibv_wc_status` to [`WcStatus`].

use crate::api::WcStatus;
use rdma_mummy_sys::ibv_wc_status as s;

/// Maps a provider's `ibv_wc_status` code to a [`WcStatus`]; codes vrio does
/// not distinguish become [`WcStatus::Other`].
pub fn map_status(code: u32) -> WcStatus {
    match code {
        s::IBV_WC_SUCCESS => WcStatus::Success,
        s::IBV_WC_REM_ACCESS_ERR => WcStatus::RemoteAccessError,
        s::IBV_WC_LOC_PROT_ERR => WcStatus::LocalProtectionError,
        s::IBV_WC_WR_FLUSH_ERR => WcStatus::Flushed,
        s::IBV_WC_RETRY_EXC_ERR => WcStatus::RetryExceeded,
        s::IBV_WC_RNR_RETRY_EXC_ERR => WcStatus::RnrRetryExceeded,
        s::IBV_WC_REM_OP_ERR | s::IBV_WC_REM_INV_REQ_ERR => WcStatus::RemoteOperationError,
        other => WcStatus::Other(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_every_named_status() {
        for (code, status) in [
            (s::IBV_WC_SUCCESS, WcStatus::Success),
            (s::IBV_WC_REM_ACCESS_ERR, WcStatus::RemoteAccessError),
            (s::IBV_WC_LOC_PROT_ERR, WcStatus::LocalProtectionError),
            (s::IBV_WC_WR_FLUSH_ERR, WcStatus::Flushed),
            (s::IBV_WC_RETRY_EXC_ERR, WcStatus::RetryExceeded),
            (s::IBV_WC_RNR_RETRY_EXC_ERR, WcStatus::RnrRetryExceeded),
            (s::IBV_WC_REM_OP_ERR, WcStatus::RemoteOperationError),
            (s::IBV_WC_REM_INV_REQ_ERR, WcStatus::RemoteOperationError),
        ] {
            assert_eq!(map_status(code), status, "ibv_wc_status {code}");
        }
    }

    #[test]
    fn others_keep_their_code() {
        assert_eq!(
            map_status(s::IBV_WC_LOC_LEN_ERR),
            WcStatus::Other(s::IBV_WC_LOC_LEN_ERR)
        );
        assert_eq!(map_status(9999), WcStatus::Other(9999));
    }
}
