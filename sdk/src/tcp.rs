//! The per-connection handle [`Tcp`] given to [`StreamContext`](crate::StreamContext)
//! callbacks.

use sluice_abi::{BufferType, StreamType};

use crate::context::Action;
use crate::error::{Error, HostError};
use crate::sys;

/// One TCP connection being filtered.
#[derive(Debug)]
pub struct Tcp {
    pub(crate) id: u32,
    pub(crate) data_size: usize,
}

impl Tcp {
    /// The context id.
    pub fn id(&self) -> u32 {
        self.id
    }

    fn read(&self, buffer: BufferType) -> Result<Vec<u8>, HostError> {
        sys::get_buffer_bytes(buffer.as_u32(), 0, self.data_size)
            .map(Option::unwrap_or_default)
            .map_err(sys::fail("proxy_get_buffer_bytes", format!("{buffer:?}")))
    }

    /// The downstream data buffered (in `on_downstream_data`).
    pub fn downstream_data(&self) -> Result<Vec<u8>, HostError> {
        self.read(BufferType::DownstreamData)
    }

    /// The upstream data buffered (in `on_upstream_data`).
    pub fn upstream_data(&self) -> Result<Vec<u8>, HostError> {
        self.read(BufferType::UpstreamData)
    }

    /// Replaces the downstream data buffered.
    pub fn set_downstream_data(&self, data: &[u8]) -> Result<(), HostError> {
        sys::set_buffer_bytes(BufferType::DownstreamData.as_u32(), 0, self.data_size, data)
            .map_err(sys::fail("proxy_set_buffer_bytes", "downstream data"))
    }

    /// Resumes the downstream direction.
    pub fn resume_downstream(&self) -> Result<(), HostError> {
        sys::continue_stream(StreamType::Downstream.as_u32())
            .map_err(sys::fail("proxy_continue_stream", "downstream"))
    }

    /// Closes the downstream connection.
    pub fn close_downstream(&self) -> Result<(), HostError> {
        sys::close_stream(StreamType::Downstream.as_u32())
            .map_err(sys::fail("proxy_close_stream", "downstream"))
    }

    /// Closes the upstream connection.
    pub fn close_upstream(&self) -> Result<(), HostError> {
        sys::close_stream(StreamType::Upstream.as_u32()).map_err(sys::fail("proxy_close_stream", "upstream"))
    }

    /// The default error policy: close the connection.
    pub fn fail_closed(&mut self, _error: &Error) -> Action {
        let _ = self.close_downstream();
        Action::Pause
    }
}
