//! The proxy-wasm header-map ("pairs") serialization, shared by host and guest.
//!
//! Layout (all integers u32 little-endian): `count`, then `count` pairs of
//! `(key_len, value_len)`, then for each pair the key bytes, a NUL, the value
//! bytes and a NUL. Lengths exclude the NULs. An empty map is 4 zero bytes; an
//! empty input is also read as an empty map.

use alloc::vec::Vec;

/// Largest number of pairs accepted when decoding.
pub const MAX_PAIRS: usize = 1024;

/// Why a pairs buffer could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairsError {
    /// The buffer ends before the data it announces.
    Truncated,
    /// More than [`MAX_PAIRS`] pairs.
    TooMany,
    /// A key or value is not followed by its NUL terminator.
    MissingNul,
}

/// Serializes pairs.
pub fn encode<'a, I, K, V>(pairs: I) -> Vec<u8>
where
    I: IntoIterator<Item = (K, V)> + Clone,
    K: AsRef<[u8]> + 'a,
    V: AsRef<[u8]> + 'a,
{
    let mut count = 0u32;
    let mut data_len = 0usize;
    for (k, v) in pairs.clone() {
        count += 1;
        data_len += k.as_ref().len() + v.as_ref().len() + 2;
    }
    let mut out = Vec::with_capacity(4 + 8 * count as usize + data_len);
    out.extend_from_slice(&count.to_le_bytes());
    for (k, v) in pairs.clone() {
        out.extend_from_slice(&(k.as_ref().len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

/// Decodes pairs, borrowing from `buf`.
pub fn decode(buf: &[u8]) -> Result<Vec<(&[u8], &[u8])>, PairsError> {
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    let count = read_u32(buf, 0)? as usize;
    if count > MAX_PAIRS {
        return Err(PairsError::TooMany);
    }
    let mut sizes_at = 4usize;
    let mut data_at = 4usize
        .checked_add(count.checked_mul(8).ok_or(PairsError::Truncated)?)
        .ok_or(PairsError::Truncated)?;
    if data_at > buf.len() {
        return Err(PairsError::Truncated);
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let klen = read_u32(buf, sizes_at)? as usize;
        let vlen = read_u32(buf, sizes_at + 4)? as usize;
        sizes_at += 8;
        let key = take(buf, data_at, klen)?;
        data_at += klen + 1;
        let value = take(buf, data_at, vlen)?;
        data_at += vlen + 1;
        out.push((key, value));
    }
    Ok(out)
}

fn read_u32(buf: &[u8], at: usize) -> Result<u32, PairsError> {
    let end = at.checked_add(4).ok_or(PairsError::Truncated)?;
    let bytes = buf.get(at..end).ok_or(PairsError::Truncated)?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn take(buf: &[u8], at: usize, len: usize) -> Result<&[u8], PairsError> {
    let end = at.checked_add(len).ok_or(PairsError::Truncated)?;
    let data = buf.get(at..end).ok_or(PairsError::Truncated)?;
    match buf.get(end) {
        Some(0) => Ok(data),
        Some(_) => Err(PairsError::MissingNul),
        None => Err(PairsError::Truncated),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_example() {
        let bytes = encode([("a", "1"), ("b", "22")]);
        let expected: &[u8] = &[
            2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, b'a', 0, b'1', 0, b'b', 0, b'2',
            b'2', 0,
        ];
        assert_eq!(bytes, expected);
        let back = decode(&bytes).unwrap_or_default();
        assert_eq!(back, [(&b"a"[..], &b"1"[..]), (&b"b"[..], &b"22"[..])]);
    }

    #[test]
    fn rejects_hostile_input() {
        assert_eq!(decode(&[]), Ok(Vec::new()));
        assert_eq!(decode(&[0, 0, 0, 0]), Ok(Vec::new()));
        assert_eq!(decode(&[1, 0, 0]), Err(PairsError::Truncated));
        assert_eq!(decode(&[0xff, 0xff, 0xff, 0xff]), Err(PairsError::TooMany));
        // One pair claiming a 4 GiB key.
        let mut b = encode([("k", "v")]);
        b[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&b), Err(PairsError::Truncated));
        // Missing NUL.
        let mut b = encode([("k", "v")]);
        let n = b.len();
        b[n - 1] = b'x';
        assert_eq!(decode(&b), Err(PairsError::MissingNul));
    }
}
