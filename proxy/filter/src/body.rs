//! [`BodyBuf`]: the body bytes a filter phase sees, copied only when written.

use std::fmt;
use std::ops::Deref;

use bytes::{Bytes, BytesMut};

/// A body chunk (or what a filter buffered) as the filter chain hands it on.
///
/// A chunk read from a connection shares that connection's read buffer, so it
/// cannot be written in place. It stays shared while filters only read it, and
/// is copied into a buffer of its own on the first write ([`BodyBuf::edit`]);
/// later writes reuse that buffer. Most filters never write the body, so a
/// chain passes it on without copying, however large it is. As small as the
/// `Bytes` it holds: it is moved through every filter of a chain.
#[derive(Default, Clone)]
pub struct BodyBuf(Bytes);

impl BodyBuf {
    /// An empty buffer.
    pub const fn new() -> BodyBuf {
        BodyBuf(Bytes::new())
    }

    /// Edits the bytes in place: a shared chunk is copied first, a buffer this
    /// one owns alone is edited where it is.
    pub fn edit<R>(&mut self, f: impl FnOnce(&mut BytesMut) -> R) -> R {
        let mut m = match std::mem::take(&mut self.0).try_into_mut() {
            Ok(m) => m,
            Err(shared) => BytesMut::from(&shared[..]),
        };
        let r = f(&mut m);
        self.0 = m.freeze();
        r
    }

    /// Appends `data`: the first bytes of an empty buffer are taken as they are.
    pub fn extend(&mut self, data: Bytes) {
        if self.0.is_empty() {
            self.0 = data;
        } else {
            self.extend_from_slice(&data);
        }
    }

    /// Appends a copy of `data`.
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        if !data.is_empty() {
            self.edit(|m| m.extend_from_slice(data));
        }
    }

    /// Empties the buffer.
    pub fn clear(&mut self) {
        self.0 = Bytes::new();
    }

    /// Takes the bytes, leaving the buffer empty.
    pub fn take(&mut self) -> Bytes {
        std::mem::take(&mut self.0)
    }
}

impl Deref for BodyBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Bytes> for BodyBuf {
    fn from(b: Bytes) -> Self {
        BodyBuf(b)
    }
}

impl fmt::Debug for BodyBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BodyBuf").field("len", &self.0.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_chunk_is_copied_on_the_first_write_only() {
        let read_buf = Bytes::from_static(b"hello world");
        let chunk = read_buf.slice(0..5);
        let mut b = BodyBuf::from(chunk.clone());
        assert_eq!(&b[..], b"hello");
        // Reading and taking copy nothing: the same bytes come back.
        assert_eq!(b.clone().take().as_ptr(), chunk.as_ptr());
        b.edit(|m| m.extend_from_slice(b"!"));
        assert_ne!(b.as_ptr(), chunk.as_ptr());
        assert_eq!(&b[..], b"hello!");
        // A second write edits the copy where it is.
        let copy = b.as_ptr();
        b.edit(|m| m[0] = b'H');
        assert_eq!(b.as_ptr(), copy);
        assert_eq!(&b[..], b"Hello!");
        // The read buffer it came from is untouched.
        assert_eq!(&read_buf[..], b"hello world");
    }

    #[test]
    fn extend_takes_the_first_chunk_and_appends_the_rest() {
        let mut b = BodyBuf::new();
        let first = Bytes::from_static(b"ab");
        b.extend(first.clone());
        assert_eq!(b.as_ptr(), first.as_ptr());
        b.extend(Bytes::from_static(b"cd"));
        b.extend(Bytes::new());
        assert_eq!(&b[..], b"abcd");
        assert_eq!(&b.take()[..], b"abcd");
        assert!(b.is_empty());
        b.extend_from_slice(b"");
        assert!(b.is_empty());
    }

    #[test]
    fn a_unique_chunk_becomes_writable_without_a_copy() {
        let v = Bytes::from(b"xyz".to_vec());
        let ptr = v.as_ptr();
        let mut b = BodyBuf::from(v);
        assert_eq!(b.edit(|m| m.as_ptr()), ptr);
        b.clear();
        assert!(b.is_empty());
    }
}
