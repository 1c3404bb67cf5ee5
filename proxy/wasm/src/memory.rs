//! Guest memory access for host calls: bounds-checked reads and writes, and
//! handing bytes to the guest through its allocator. No unsafe code: wasmtime's
//! `Memory::data`/`data_and_store_mut` give checked slices.

use sluice_abi::Status;
use wasmtime::{Caller, Memory};

use crate::state::{Callback, VmState};

/// A host call's failure: a status for the guest, or a trap (the guest's
/// allocator trapped, or the guest must be stopped).
pub(crate) enum HostErr {
    Status(Status),
    Trap(wasmtime::Error),
}

impl From<Status> for HostErr {
    fn from(s: Status) -> Self {
        HostErr::Status(s)
    }
}

impl From<wasmtime::Error> for HostErr {
    fn from(e: wasmtime::Error) -> Self {
        HostErr::Trap(e)
    }
}

pub(crate) type HostResult<T = ()> = Result<T, HostErr>;

/// Turns a host call's result into the i32 status the guest gets.
pub(crate) fn status(r: HostResult) -> wasmtime::Result<i32> {
    match r {
        Ok(()) => Ok(Status::Ok as i32),
        Err(HostErr::Status(s)) => Ok(s as i32),
        Err(HostErr::Trap(e)) => Err(e),
    }
}

pub(crate) fn memory(caller: &Caller<'_, VmState>) -> Result<Memory, Status> {
    caller.data().memory.ok_or(Status::InvalidMemoryAccess)
}

/// The guest range `[ptr, ptr+len)`, checked. `(0, 0)` is an empty slice.
pub(crate) fn range(mem_len: usize, ptr: i32, len: i32) -> Result<std::ops::Range<usize>, Status> {
    let start = ptr as u32 as usize;
    let len = len as u32 as usize;
    let end = start.checked_add(len).ok_or(Status::InvalidMemoryAccess)?;
    if end > mem_len {
        return Err(Status::InvalidMemoryAccess);
    }
    Ok(start..end)
}

/// Reads a guest slice.
pub(crate) fn slice(data: &[u8], ptr: i32, len: i32) -> Result<&[u8], Status> {
    let r = range(data.len(), ptr, len)?;
    Ok(&data[r])
}

/// Copies a guest slice out.
pub(crate) fn read_vec(caller: &Caller<'_, VmState>, ptr: i32, len: i32) -> Result<Vec<u8>, Status> {
    let mem = memory(caller)?;
    Ok(slice(mem.data(caller), ptr, len)?.to_vec())
}

pub(crate) fn write_bytes(data: &mut [u8], ptr: i32, bytes: &[u8]) -> Result<(), Status> {
    let r = range(data.len(), ptr, bytes.len() as i32)?;
    data[r].copy_from_slice(bytes);
    Ok(())
}

pub(crate) fn write_u32(data: &mut [u8], ptr: i32, v: u32) -> Result<(), Status> {
    write_bytes(data, ptr, &v.to_le_bytes())
}

pub(crate) fn write_u64(data: &mut [u8], ptr: i32, v: u64) -> Result<(), Status> {
    write_bytes(data, ptr, &v.to_le_bytes())
}

/// Stores a scalar at a guest out-pointer.
pub(crate) fn store_u32(caller: &mut Caller<'_, VmState>, ptr: i32, v: u32) -> HostResult {
    let mem = memory(caller)?;
    write_u32(mem.data_mut(caller), ptr, v)?;
    Ok(())
}

pub(crate) fn store_u64(caller: &mut Caller<'_, VmState>, ptr: i32, v: u64) -> HostResult {
    let mem = memory(caller)?;
    write_u64(mem.data_mut(caller), ptr, v)?;
    Ok(())
}

/// Hands `len` bytes to the guest: allocates exactly `len` bytes with the guest's
/// allocator, lets `fill` write them (with access to the host state), and stores
/// the pointer and length at `ret_ptr`/`ret_size`. `len == 0` stores (0, 0)
/// without allocating.
pub(crate) fn give(
    caller: &mut Caller<'_, VmState>,
    len: usize,
    ret_ptr: i32,
    ret_size: i32,
    fill: impl FnOnce(&mut [u8], &mut VmState),
) -> HostResult {
    let mem = memory(caller)?;
    {
        // Check the out-pointers first so that a hostile call leaks no allocation.
        let data = mem.data(&*caller);
        range(data.len(), ret_ptr, 4)?;
        range(data.len(), ret_size, 4)?;
    }
    if len == 0 {
        let data = mem.data_mut(&mut *caller);
        write_u32(data, ret_ptr, 0)?;
        write_u32(data, ret_size, 0)?;
        return Ok(());
    }
    let len32 = i32::try_from(len).map_err(|_| Status::InvalidMemoryAccess)?;
    let ptr = allocate(caller, len32)?;
    // Re-read the memory after the call: the allocator may have grown it.
    let (data, state) = mem.data_and_store_mut(&mut *caller);
    let r = range(data.len(), ptr, len32)?;
    fill(&mut data[r], state);
    write_u32(data, ret_ptr, ptr as u32)?;
    write_u32(data, ret_size, len as u32)?;
    Ok(())
}

/// Like [`give`] for bytes the host already has.
pub(crate) fn give_bytes(
    caller: &mut Caller<'_, VmState>,
    bytes: &[u8],
    ret_ptr: i32,
    ret_size: i32,
) -> HostResult {
    give(caller, bytes.len(), ret_ptr, ret_size, |dst, _| dst.copy_from_slice(bytes))
}

/// Calls the guest allocator (a nested guest call: it must not call back into
/// the dispatcher, which the Rust SDK's allocator does not).
fn allocate(caller: &mut Caller<'_, VmState>, len: i32) -> HostResult<i32> {
    // Taken out for the call and put back, not cloned: a clone of a typed
    // function counts references to its type.
    let alloc = caller.data_mut().alloc.take().ok_or(Status::InvalidMemoryAccess)?;
    let saved = caller.data().frame;
    caller.data_mut().frame.callback = Callback::Allocate;
    let ptr = alloc.call(&mut *caller, len);
    let st = caller.data_mut();
    st.frame = saved;
    st.alloc = Some(alloc);
    let ptr = ptr?;
    if ptr == 0 {
        return Err(Status::InvalidMemoryAccess.into());
    }
    Ok(ptr)
}
