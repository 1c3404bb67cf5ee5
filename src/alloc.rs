//! The global allocator: mimalloc, called the way std's `System` allocator
//! calls glibc's `malloc`.
//!
//! The `mimalloc` crate's allocator sends every allocation through
//! `mi_malloc_aligned`, whatever its alignment. mimalloc v3 takes its plain
//! path there only when the block size is a power of two; any other size (a
//! 1,792-byte `HeaderMap` table, a 48-byte `Rc` box) goes through an
//! over-allocating fallback: ~740 more instructions per proxied request here
//! (`bench/instructions.sh`), and larger blocks than the size asks for
//! (mimalloc_rust PR #170). An alignment mimalloc's size classes already give
//! takes `mi_malloc` instead; any other keeps the aligned call.
//!
//! This is the binary's one `unsafe` module (the other is the SDK's wasm
//! import glue): a `GlobalAlloc` is an unsafe trait over raw pointers.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment of every mimalloc block of at least this size
/// (`MI_MAX_ALIGN_SIZE`): size classes above it are multiples of it, and a
/// page's first block is aligned to it. Smaller blocks are aligned to their
/// size class (8), which covers any alignment a Rust layout of that size can
/// ask (a size is a multiple of its alignment).
const NATURAL_ALIGN: usize = 16;

/// Whether a plain allocation of `size` bytes is aligned enough for `align`.
fn natural(size: usize, align: usize) -> bool {
    align <= NATURAL_ALIGN && align <= size
}

/// mimalloc as the global allocator.
pub struct MiMalloc;

// SAFETY: every pointer handed out comes from mimalloc, with at least the
// layout's size and alignment (plain calls only where `natural` holds, see
// `NATURAL_ALIGN`), and every pointer taken back is one of those: `mi_free`
// and `mi_realloc*` accept a block from any of mimalloc's allocation calls.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain FFI calls; a null result is the allocation failure std expects.
        unsafe {
            if natural(layout.size(), layout.align()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if natural(layout.size(), layout.align()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract).
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's
        // contract); the new block keeps the alignment.
        unsafe {
            if natural(new_size, layout.align()) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_have_the_layouts_alignment_and_keep_their_bytes() {
        let a = MiMalloc;
        for align in [1usize, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [align, 2 * align, 3 * align, 24, 48, 100, 1000, 1792, 4000, 70_000] {
                if size % align != 0 {
                    continue;
                }
                let Ok(layout) = Layout::from_size_align(size, align) else { continue };
                // SAFETY: a non-zero-size layout; the block is written within its
                // size, read back, grown, and freed once with its layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    std::ptr::write_bytes(p, 0xa5, size);
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zeroed: size {size} align {align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    a.dealloc(z, layout);
                    let grown = a.realloc(p, layout, size * 3);
                    assert_eq!(grown as usize % align, 0, "realloc: size {size} align {align}");
                    assert!(std::slice::from_raw_parts(grown, size).iter().all(|&b| b == 0xa5));
                    let bigger = Layout::from_size_align(size * 3, align).unwrap_or(layout);
                    a.dealloc(grown, bigger);
                }
            }
        }
    }
}
